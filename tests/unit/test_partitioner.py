"""The relay's partitioner keeps every key on the partition Kafka's Java client (and aiokafka's
default partitioner) would choose, so remembering hashes moves no key between partitions."""

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from ccm_shared.transport import KafkaTransport, KeyHashPartitioner

# murmur2 of these keys, as Kafka's Java client computes them (its UtilsTest), as signed ints.
JAVA_MURMUR2 = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


@pytest.mark.parametrize(("key", "java_hash"), JAVA_MURMUR2)
@pytest.mark.parametrize("partitions", [1, 3, 12, 50])
def test_partition_is_javas(key, java_hash, partitions):
    chosen = KeyHashPartitioner()(key, list(range(partitions)), list(range(partitions)))
    assert chosen == (java_hash & 0x7FFFFFFF) % partitions


@given(keys=st.lists(st.binary(max_size=80), min_size=1, max_size=30),
       partitions=st.integers(min_value=1, max_value=64))
def test_same_partition_as_aiokafkas_default_every_time(keys, partitions):
    remembered, default = KeyHashPartitioner(remembered=8), DefaultPartitioner()
    all_partitions = list(range(partitions))
    for key in keys + keys:  # the second time from what was remembered (or evicted)
        assert remembered(key, all_partitions, all_partitions) == \
            default(key, all_partitions, all_partitions)


def test_a_key_less_message_goes_to_an_available_partition():
    assert KeyHashPartitioner()(None, [0, 1, 2], [2]) == 2


def test_the_producer_uses_it():
    assert isinstance(KafkaTransport("k:9092").producer_options()["partitioner"],
                      KeyHashPartitioner)


def test_a_bytearray_key_goes_where_its_bytes_go():
    parts = list(range(7))
    assert KeyHashPartitioner()(bytearray(b"tenant:patient"), parts, parts) == \
        DefaultPartitioner()(b"tenant:patient", parts, parts)
