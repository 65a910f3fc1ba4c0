"""`ccm events`: the newest events of topics on real Apache Kafka, read without a consumer group
(the README's way to see what ingest sent when no Kafka CLI is installed)."""

import json
import os
import subprocess
import sys

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from ccm_shared.events import Message

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_newest_gives_the_last_messages_of_each_partition_and_commits_nothing(
        infra, kafka, topic):
    await kafka.ensure_topics([topic])
    sent = [Message(topic, json.dumps({"n": n}).encode(), f"key-{n % 2}".encode(),
                    (("ce_tenant", b"alpha" if n % 2 else b"beta"),)) for n in range(10)]
    await kafka.send_batch(sent)
    unknown = f"{topic}.unknown"
    found = await kafka.newest([topic, unknown], 2)
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap_servers)
    await admin.start()
    try:
        assert unknown not in await admin.list_topics()  # read, never created
    finally:
        await admin.close()
    by_partition: dict[int, list[int]] = {}
    for m in found:
        by_partition.setdefault(m.partition, []).append(json.loads(m.value)["n"])
    # Two keys: at most two partitions, each its own last two messages, oldest first.
    expected: dict[int, list[int]] = {}
    for n in range(10):
        part = next(m.partition for m in found if json.loads(m.value)["n"] % 2 == n % 2)
        expected.setdefault(part, []).append(n)
    assert by_partition == {p: ns[-2:] for p, ns in expected.items()}
    assert await kafka.newest([topic], 2) == found  # read again: nothing was consumed

    env = {**os.environ, "CCM_KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers}
    env.pop("CCM_DATABASE_URL", None)
    out = subprocess.run([sys.executable, "-m", "ccm_shared.cli", "events", topic, "--last",
                          "5", "--practice", "alpha"], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    out_unknown = subprocess.run([sys.executable, "-m", "ccm_shared.cli", "events", unknown],
                                 capture_output=True, text=True, env=env, timeout=120,
                                 check=True)
    assert f"no topic {unknown!r}" in out_unknown.stderr
    assert "partial" not in out.stderr
    # Given no time, nothing arrives: said, not passed off as the newest events.
    incomplete: list[str] = []
    assert await kafka.newest([topic], 2, timeout=0, incomplete=incomplete) == []
    assert sorted(incomplete) == sorted(f"{topic}[{p}]" for p in by_partition)
    hurried = subprocess.run([sys.executable, "-m", "ccm_shared.cli", "events", topic,
                              "--timeout", "0"], capture_output=True, text=True, env=env,
                             timeout=120, check=True)
    assert "the list below is partial" in hurried.stderr and hurried.stdout == ""
    assert [line["event"]["n"] for line in lines] == [1, 3, 5, 7, 9]
    assert {line["key"] for line in lines} == {"key-1"}
    assert "5 event(s)" in out.stderr


async def test_newest_reads_what_is_left_when_retention_deleted_the_first_wanted_offsets(
        infra, kafka, topic, monkeypatch):
    """Retention can delete a partition's first wanted offsets between reading where it starts
    and fetching: the newest records still there are read, not skipped as if the partition had
    nothing (the consumer's reset on an offset out of range is to the earliest, not the end)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin.records_to_delete import RecordsToDelete

    await kafka.ensure_topics([topic])
    await kafka.send_batch([Message(topic, json.dumps({"n": n}).encode(), b"one-key")
                            for n in range(10)])
    (partition,) = {m.partition for m in await kafka.newest([topic], 10)}
    tp = TopicPartition(topic, partition)
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(6)})  # as retention would
    finally:
        await admin.close()

    async def read_before_the_deletion(self, partitions):  # noqa: ANN001, ANN202
        return {p: 0 for p in partitions}  # the log start as it was just before

    monkeypatch.setattr(AIOKafkaConsumer, "beginning_offsets", read_before_the_deletion)
    found = await kafka.newest([topic], 8)
    assert [json.loads(m.value)["n"] for m in found] == [6, 7, 8, 9]
