"""Publish/subscribe transports: Apache Kafka (production) and an in-process bus.

The in-process bus exists only for unit tests and the embedded single-process mode; every
integration test runs on Kafka. Both honour the same contract: ``send_batch`` returns only when
every message is durably accepted (Kafka: acks=all) and raises otherwise; a source hands out
messages per partition in order and moves its committed position only on ``commit``.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from ccm_shared.events import Message

log = structlog.get_logger(__name__)


@dataclass(frozen=True, order=True)
class Partition:
    topic: str
    partition: int


class MessageSource(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def poll(self, timeout: float, max_records: int) -> dict[Partition, list[Message]]: ...
    async def commit(self, offsets: dict[Partition, int]) -> None: ...
    def assignment(self) -> set[Partition]: ...
    async def lag(self) -> dict[Partition, int]: ...


class Transport(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send_batch(self, messages: Sequence[Message]) -> None: ...
    def source(self, topics: Sequence[str], group_id: str) -> MessageSource: ...
    async def ensure_topics(self, topics: Sequence[str], **options) -> None: ...


# --------------------------------------------------------------------------------------------
# Apache Kafka
# --------------------------------------------------------------------------------------------

# The largest event, as JSON: a 10,000-patient practice's Invoice is ~3 MB (~180 bytes a
# line). Kafka's defaults stop at 1 MB a record; over it the relay could never publish the
# event and every later one of the service waited behind it. Producers accept records of this
# size and compress them (CCM_KAFKA_COMPRESSION, lz4 by default: ~4x on Invoices), and the
# topics accept record batches of this size (``TOPIC_CONFIG``; the Strimzi KafkaTopics and the
# compose topics say the same).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
TOPIC_CONFIG = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
_CREATED, _ALREADY_EXISTS = 0, 36  # Kafka CreateTopics error codes


class KeyHashPartitioner:
    """aiokafka's default partitioner (a key's murmur2 hash, as in Kafka's Java client, so a
    key keeps its partition), each key's hash remembered: the hash is pure Python in aiokafka
    and was a quarter of the relay's publishing time, while the keys (practice and patient)
    repeat."""

    def __init__(self, remembered: int = 16_384) -> None:  # ~3.5 MB of keys at most
        from aiokafka.partitioner import DefaultPartitioner, murmur2

        self._default = DefaultPartitioner()
        self._hash = functools.lru_cache(maxsize=remembered)(murmur2)

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return self._default(key, all_partitions, available)
        return all_partitions[(self._hash(bytes(key)) & 0x7FFFFFFF) % len(all_partitions)]


class KafkaTransport:
    """aiokafka with an idempotent, acks=all producer and manually committed consumer groups."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str = "ccm",
        security_protocol: str = "PLAINTEXT",
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        ssl_cafile: str | None = None,
        request_timeout_ms: int = 30_000,
        default_partitions: int = 3,
        compression: str = "lz4",
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.client_id = client_id
        self.security_protocol = security_protocol
        self.sasl_mechanism = sasl_mechanism
        self.sasl_username = sasl_username
        self.sasl_password = sasl_password
        self.ssl_cafile = ssl_cafile
        self.request_timeout_ms = request_timeout_ms
        self.default_partitions = default_partitions
        self.compression = None if compression == "none" else compression
        self._producer = None
        self._lock = asyncio.Lock()

    def connection_options(self) -> dict:
        """Bootstrap and security options shared by producer, consumers and admin client."""
        options: dict = dict(
            bootstrap_servers=self.bootstrap_servers, security_protocol=self.security_protocol
        )
        if "SSL" in self.security_protocol:
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile)
        if self.security_protocol.startswith("SASL"):
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return options

    def producer_options(self) -> dict:
        """The producer settings; the benchmark's bare loop uses the very same."""
        return dict(
            **self.connection_options(),
            client_id=f"{self.client_id}-producer",
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=512 * 1024,
            partitioner=KeyHashPartitioner(),
            compression_type=self.compression,
            max_request_size=MAX_MESSAGE_BYTES,
            request_timeout_ms=self.request_timeout_ms,
        )

    async def _get_producer(self):  # noqa: ANN202
        from aiokafka import AIOKafkaProducer

        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(**self.producer_options())
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def _reset_producer(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), timeout=10)
            except Exception:  # noqa: BLE001 - a broken producer is discarded either way
                log.debug("discarding broken producer")

    async def start(self) -> None:
        await self._get_producer()

    async def stop(self) -> None:
        await self._reset_producer()

    async def send_batch(self, messages: Sequence[Message]) -> None:
        producer = await self._get_producer()
        try:
            futures = [
                await producer.send(m.topic, value=m.value, key=m.key, headers=list(m.headers))
                for m in messages
            ]
            await asyncio.gather(*futures)
        except BaseException:
            # A new producer id after any failure: the next attempt resends the whole batch in
            # order, and consumers' inboxes absorb what was already delivered.
            await self._reset_producer()
            raise

    async def ensure_topics(
        self,
        topics: Sequence[str],
        *,
        partitions: int | None = None,
        replication_factor: int = 1,
        config: dict[str, str] | None = None,
    ) -> None:
        """Create the topics that do not exist yet (production creates them with Strimzi, but
        not the per-practice feeds). A topic the broker refuses to create raises. Topics that
        exist with a record limit under ``MAX_MESSAGE_BYTES`` (created by a version before the
        limit was raised) have it raised, their other settings kept."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import TopicAlreadyExistsError, for_code

        admin = AIOKafkaAdminClient(
            **self.connection_options(), client_id=f"{self.client_id}-admin"
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = [t for t in topics if t not in existing]
            await _raise_record_limits(admin, [t for t in dict.fromkeys(topics) if t in existing])
            if wanted:
                try:
                    response = await admin.create_topics(
                        [
                            NewTopic(
                                t,
                                partitions or self.default_partitions,
                                replication_factor,
                                topic_configs={**TOPIC_CONFIG, **(config or {})},
                            )
                            for t in wanted
                        ]
                    )
                except TopicAlreadyExistsError:
                    return
                # Per topic: created, or created meanwhile by another process, else refused.
                for topic, code, *_ in response.topic_errors:
                    if code not in (_CREATED, _ALREADY_EXISTS):
                        # Kafka's own error for the code: whether it is worth waiting out
                        # (a timeout, no controller yet) is its ``retriable``.
                        raise for_code(code)(f"could not create topic {topic}: error code {code}")
                log.info("topics created", count=len(wanted))
        finally:
            await admin.close()

    async def ping(self) -> None:
        """Kafka answers: a metadata request for no topic (the brokers only) to one broker. Not
        every topic's metadata: each practice has topics of its own (its feed), and with
        thousands of them that answer took longer than a readiness probe waits."""
        from aiokafka.protocol.metadata import MetadataRequest

        client = (await self._get_producer()).client
        node = client.get_random_node()
        if node is None:
            raise ConnectionError("no Kafka broker is known")
        await client.send(node, MetadataRequest([]))  # readiness bounds how long it waits

    def source(self, topics: Sequence[str], group_id: str) -> KafkaSource:
        return KafkaSource(self, topics, group_id)

    async def partitions_of(self, topics: Sequence[str] | None,
                            unknown: list[str] | None = None) -> list:
        """The partitions (aiokafka ``TopicPartition``) of those of ``topics`` that exist, in
        (topic, partition) order; ``None``: of every topic. Unknown topics are not created (a
        metadata request for them would create them on a broker that auto-creates topics);
        they go to ``unknown``."""
        from aiokafka import TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**self.connection_options(),
                                    client_id=f"{self.client_id}-admin")
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            topics = sorted(existing) if topics is None else topics
            known = [t for t in topics if t in existing]
            if unknown is not None:
                unknown += [t for t in topics if t not in existing]
            described = await admin.describe_topics(known) if known else []
        finally:
            await admin.close()
        return [TopicPartition(d["topic"], p["partition"]) for d in described
                if d.get("error_code") == 0
                for p in sorted(d["partitions"], key=lambda p: p["partition"])]

    async def newest(self, topics: Sequence[str], per_partition: int, timeout: float = 10.0,
                     unknown: list[str] | None = None,
                     incomplete: list[str] | None = None) -> list[Message]:
        """The last ``per_partition`` messages of each partition of ``topics``, in (topic,
        partition, offset) order: read without a consumer group (nothing committed, no
        subscriber disturbed). Unknown topics give nothing and are not created (a metadata
        request for them would create them on a broker that auto-creates topics); they go to
        ``unknown``, and partitions not read to their end within ``timeout`` seconds to
        ``incomplete`` (``topic[partition]``)."""
        from aiokafka import AIOKafkaConsumer

        partitions = await self.partitions_of(topics, unknown)
        if not partitions:
            return []
        # An offset out of range when fetched (retention deleted it after the partition's start
        # was read) resumes at the earliest left: those are then the newest there are.
        consumer = AIOKafkaConsumer(**self.connection_options(), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    client_id=f"{self.client_id}-newest",
                                    request_timeout_ms=self.request_timeout_ms)
        await consumer.start()
        try:
            consumer.assign(partitions)
            ends = await consumer.end_offsets(partitions)
            starts = await consumer.beginning_offsets(partitions)
            wanted = {}
            for tp in partitions:
                first = max(starts[tp], ends[tp] - per_partition)
                if first < ends[tp]:
                    consumer.seek(tp, first)
                    wanted[tp] = ends[tp]
            found: list[Message] = []
            deadline = asyncio.get_running_loop().time() + timeout
            while wanted and asyncio.get_running_loop().time() < deadline:
                batches = await consumer.getmany(*wanted, timeout_ms=500)
                for tp, records in batches.items():
                    found += [_message(r) for r in records if r.offset < wanted.get(tp, -1)]
                # Read to its end by the consumer's position, not the last record's offset: a
                # compacted topic's last offsets, or a transaction marker, hold no record.
                for tp in list(wanted):
                    if await consumer.position(tp) >= wanted[tp]:
                        del wanted[tp]
            if incomplete is not None:
                incomplete += [f"{tp.topic}[{tp.partition}]" for tp in wanted]
            return sorted(found, key=lambda m: (m.topic, m.partition, m.offset))
        finally:
            await consumer.stop()


def _message(record) -> Message:  # noqa: ANN001 - an aiokafka ConsumerRecord
    return Message(topic=record.topic, partition=record.partition, offset=record.offset,
                   key=record.key, value=record.value, headers=tuple(record.headers or ()))


_DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs config_source: set on the topic itself
_UNKNOWN_TOPIC = 3  # UNKNOWN_TOPIC_OR_PARTITION


async def _raise_record_limits(admin, topics: list[str]) -> None:  # noqa: ANN001
    """``max.message.bytes`` of each topic raised to ``MAX_MESSAGE_BYTES`` where it is lower
    (never lowered). AlterConfigs replaces a topic's whole set of overrides (aiokafka has no
    IncrementalAlterConfigs), so the topic's own overrides are read and sent back with it. A
    broker that refuses to show or change a topic's settings (ACLs: DescribeConfigs and
    AlterConfigs) leaves it as it was: a warning names the topics that may still refuse large
    events, and the service starts."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    if not topics:
        return
    described = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    changes, unread = [], []
    for response in described:
        if response.API_VERSION == 0:  # brokers before Kafka 1.1 do not say where a value is set
            continue
        for code, _message, _kind, topic, entries in response.resources:
            if code and code != _UNKNOWN_TOPIC:  # e.g. 29: not authorised to read its settings
                unread.append((topic, code))
                continue
            limits = [value for name, value, *_ in entries if name == "max.message.bytes"]
            if code or not limits or limits[0] is None or int(limits[0]) >= MAX_MESSAGE_BYTES:
                continue  # gone since it was listed, or large enough
            own = {name: value for name, value, _ro, source, sensitive, *_ in entries
                   if source == _DYNAMIC_TOPIC_CONFIG and not sensitive}
            if any(source == _DYNAMIC_TOPIC_CONFIG and sensitive
                   for _n, _v, _ro, source, sensitive, *_ in entries):
                log.warning("topic record limit not raised: it has a secret setting this "
                            "client cannot send back", topic=topic, limit=int(limits[0]))
                continue
            changes.append(ConfigResource(ConfigResourceType.TOPIC, topic,
                                          {**own, **TOPIC_CONFIG}))
    refused = []
    if changes:
        for response in await admin.alter_configs(changes):
            refused += [(topic, code) for code, _message, _kind, topic in response.resources
                        if code]
    if unread or refused:
        log.warning("topic record limit not checked or not raised: events over 1 MB may be "
                    "refused there", topics=[t for t, _ in unread + refused],
                    error_codes=sorted({c for _, c in unread + refused}))
    raised = len(changes) - len(refused)
    if raised:
        log.info("topic record limits raised", count=raised, max_message_bytes=MAX_MESSAGE_BYTES)


class KafkaSource:
    def __init__(self, transport: KafkaTransport, topics: Sequence[str], group_id: str) -> None:
        self.transport = transport
        self.topics = list(topics)
        self.group_id = group_id
        self._consumer = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            *self.topics,
            **self.transport.connection_options(),
            client_id=f"{self.transport.client_id}-{self.group_id}",
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            metadata_max_age_ms=5_000,
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def poll(self, timeout: float, max_records: int) -> dict[Partition, list[Message]]:
        batches = await self._consumer.getmany(
            timeout_ms=int(timeout * 1000), max_records=max_records
        )
        out: dict[Partition, list[Message]] = {}
        for tp, records in batches.items():
            out[Partition(tp.topic, tp.partition)] = [_message(r) for r in records]
        return out

    async def commit(self, offsets: dict[Partition, int]) -> None:
        from aiokafka import TopicPartition

        assigned = self.assignment()
        still = {
            TopicPartition(p.topic, p.partition): off for p, off in offsets.items() if p in assigned
        }
        if still:
            await self._consumer.commit(still)

    def assignment(self) -> set[Partition]:
        if self._consumer is None:
            return set()
        return {Partition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def lag(self) -> dict[Partition, int]:
        from aiokafka import TopicPartition

        out: dict[Partition, int] = {}
        for p in self.assignment():
            tp = TopicPartition(p.topic, p.partition)
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except Exception:  # noqa: BLE001 - position unknown during a rebalance
                continue
            out[p] = max(high - position, 0)
        return out


# --------------------------------------------------------------------------------------------
# In-process bus (unit tests, embedded single-process mode)
# --------------------------------------------------------------------------------------------


class InProcessTransport:
    """Partitioned, ordered, replayable logs in memory, with committed positions per group."""

    def __init__(self, partitions: int = 3) -> None:
        self.partitions = partitions
        self.logs: dict[Partition, list[Message]] = defaultdict(list)
        self.committed: dict[tuple[str, Partition], int] = {}
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ensure_topics(self, topics: Sequence[str], **options) -> None:
        return None

    def partition_for(self, key: bytes | None) -> int:
        return zlib.crc32(key) % self.partitions if key else 0

    async def send_batch(self, messages: Sequence[Message]) -> None:
        async with self._changed:
            for m in messages:
                part = Partition(m.topic, self.partition_for(m.key))
                log_ = self.logs[part]
                log_.append(
                    Message(
                        topic=m.topic,
                        value=m.value,
                        key=m.key,
                        headers=m.headers,
                        partition=part.partition,
                        offset=len(log_),
                    )
                )
            self._changed.notify_all()

    def messages(self, topic: str) -> list[Message]:
        """Every message of a topic, partition by partition (for tests)."""
        return [m for p in sorted(self.logs) if p.topic == topic for m in self.logs[p]]

    def source(self, topics: Sequence[str], group_id: str) -> InProcessSource:
        return InProcessSource(self, topics, group_id)


class InProcessSource:
    def __init__(self, bus: InProcessTransport, topics: Sequence[str], group_id: str) -> None:
        self.bus = bus
        self.topics = list(topics)
        self.group_id = group_id
        self._positions: dict[Partition, int] = {}

    async def start(self) -> None:
        self._positions = {}

    async def stop(self) -> None:
        return None

    def _partitions(self) -> list[Partition]:
        return [Partition(t, i) for t in self.topics for i in range(self.bus.partitions)]

    def _position(self, p: Partition) -> int:
        if p not in self._positions:
            self._positions[p] = self.bus.committed.get((self.group_id, p), 0)
        return self._positions[p]

    def _ready(self, max_records: int) -> dict[Partition, list[Message]]:
        out: dict[Partition, list[Message]] = {}
        budget = max_records
        for p in self._partitions():
            pos = self._position(p)
            pending = self.bus.logs.get(p, [])[pos : pos + budget]
            if pending:
                out[p] = list(pending)
                self._positions[p] = pos + len(pending)
                budget -= len(pending)
            if budget <= 0:
                break
        return out

    async def poll(self, timeout: float, max_records: int) -> dict[Partition, list[Message]]:
        async with self.bus._changed:
            ready = self._ready(max_records)
            if ready:
                return ready
            try:
                await asyncio.wait_for(self.bus._changed.wait(), timeout=timeout)
            except TimeoutError:
                return {}
            return self._ready(max_records)

    async def commit(self, offsets: dict[Partition, int]) -> None:
        for p, off in offsets.items():
            self.bus.committed[(self.group_id, p)] = off

    def assignment(self) -> set[Partition]:
        return set(self._partitions())

    async def lag(self) -> dict[Partition, int]:
        return {p: len(self.bus.logs.get(p, [])) - self._position(p) for p in self._partitions()}

    def rewind_to_committed(self) -> None:
        """Forget uncommitted progress, as a restarted consumer would (for tests)."""
        self._positions = {}
