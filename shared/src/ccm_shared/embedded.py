"""The embedded bus: a durable log in the SQLite files of the embedded mode (``ccm up``).

Same contract as Kafka: ``send_batch`` returns once the messages are stored; a consumer group
reads each topic in order from its committed position and moves it only on ``commit``. Because
the log is in the database, a restart loses nothing in flight and separate processes on one
machine can share it. One partition per topic (order per key is then total order). It exists for
the single-machine embedded mode only; production and every integration test use Kafka.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ccm_shared.db import create_engine_for
from ccm_shared.events import Message
from ccm_shared.tables import BigId
from ccm_shared.transport import Partition

bus_metadata = MetaData(schema="platform")
bus_messages = Table(
    "bus_messages",
    bus_metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("topic", String(249), nullable=False, index=True),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    Column("headers", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
bus_offsets = Table(
    "bus_offsets",
    bus_metadata,
    Column("group_id", String(200), nullable=False),
    Column("topic", String(249), nullable=False),
    Column("position", Integer, nullable=False),
    PrimaryKeyConstraint("group_id", "topic"),
)


class EmbeddedLogTransport:
    def __init__(self, database_url: str, poll_interval: float = 0.1) -> None:
        self.engine = create_engine_for(database_url, schema=None)
        self.poll_interval = poll_interval
        self._ready = False
        self._changed = asyncio.Event()

    async def start(self) -> None:
        if not self._ready:
            async with self.engine.begin() as conn:
                await conn.run_sync(bus_metadata.create_all)
            self._ready = True

    async def stop(self) -> None:
        await self.engine.dispose()
        self._ready = False

    async def ensure_topics(self, topics: Sequence[str], **options) -> None:
        await self.start()

    async def send_batch(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        await self.start()
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(bus_messages),
                [
                    {
                        "topic": m.topic,
                        "key": m.key,
                        "value": m.value,
                        "headers": json.dumps([[k, v.decode()] for k, v in m.headers]),
                        "created_at": now,
                    }
                    for m in messages
                ],
            )
        self._changed.set()

    async def newest(self, topics: Sequence[str], per_partition: int, timeout: float = 10.0,
                     unknown: list[str] | None = None,
                     incomplete: list[str] | None = None) -> list[Message]:
        """``KafkaTransport.newest`` on the log (``ccm events`` without Kafka): the last
        ``per_partition`` messages of each topic (its one partition), oldest first, nothing
        committed; a topic without a message goes to ``unknown``. Read at once: nothing is
        ever ``incomplete``."""
        await self.start()
        found: list[Message] = []
        async with self.engine.connect() as conn:
            for topic in dict.fromkeys(topics):
                rows = (await conn.execute(
                    select(bus_messages).where(bus_messages.c.topic == topic)
                    .order_by(bus_messages.c.id.desc()).limit(per_partition))).all()
                if not rows and unknown is not None:
                    unknown.append(topic)
                found += [_message(r) for r in reversed(rows)]
        return found

    async def messages(self, topic: str) -> list[Message]:
        """Every message of a topic (for tests and diagnostics)."""
        source = EmbeddedLogSource(self, [topic], group_id="__inspect__")
        out: list[Message] = []
        while batch := await source.poll(0, 10_000):
            for msgs in batch.values():
                out.extend(msgs)
        return out

    def source(self, topics: Sequence[str], group_id: str) -> EmbeddedLogSource:
        return EmbeddedLogSource(self, topics, group_id)


def _message(row: Any) -> Message:
    """A ``bus_messages`` row as the message a consumer gets (its id is its offset)."""
    return Message(topic=row.topic, key=row.key, value=row.value,
                   headers=tuple((k, v.encode()) for k, v in json.loads(row.headers)),
                   partition=0, offset=row.id)


class EmbeddedLogSource:
    def __init__(self, bus: EmbeddedLogTransport, topics: Sequence[str], group_id: str) -> None:
        self.bus = bus
        self.topics = list(topics)
        self.group_id = group_id
        self._positions: dict[str, int] = {}

    async def start(self) -> None:
        await self.bus.start()
        async with self.bus.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(bus_offsets.c.topic, bus_offsets.c.position).where(
                        bus_offsets.c.group_id == self.group_id
                    )
                )
            ).all()
        committed = {r.topic: r.position for r in rows}
        self._positions = {t: committed.get(t, 0) for t in self.topics}

    async def stop(self) -> None:
        return None

    async def _read(self, max_records: int) -> dict[Partition, list[Message]]:
        out: dict[Partition, list[Message]] = {}
        async with self.bus.engine.connect() as conn:
            for topic in self.topics:
                if max_records <= 0:
                    break
                rows = (
                    await conn.execute(
                        select(bus_messages)
                        .where(
                            bus_messages.c.topic == topic,
                            bus_messages.c.id >= self._positions.get(topic, 0),
                        )
                        .order_by(bus_messages.c.id)
                        .limit(max_records)
                    )
                ).all()
                if not rows:
                    continue
                out[Partition(topic, 0)] = [_message(r) for r in rows]
                self._positions[topic] = rows[-1].id + 1
                max_records -= len(rows)
        return out

    async def poll(self, timeout: float, max_records: int) -> dict[Partition, list[Message]]:
        if not self._positions:
            await self.start()
        batch = await self._read(max_records)
        if batch or timeout <= 0:
            return batch
        self.bus._changed.clear()
        try:
            await asyncio.wait_for(self.bus._changed.wait(), timeout=min(timeout, 1.0))
        except TimeoutError:
            pass
        return await self._read(max_records)

    async def commit(self, offsets: dict[Partition, int]) -> None:
        async with self.bus.engine.begin() as conn:
            for p, position in offsets.items():
                await conn.execute(
                    sqlite_insert(bus_offsets)
                    .values(group_id=self.group_id, topic=p.topic, position=position)
                    .on_conflict_do_update(
                        index_elements=["group_id", "topic"], set_={"position": position}
                    )
                )

    def assignment(self) -> set[Partition]:
        return {Partition(t, 0) for t in self.topics}

    async def lag(self) -> dict[Partition, int]:
        out = {}
        async with self.bus.engine.connect() as conn:
            for topic in self.topics:
                count = (
                    await conn.execute(
                        select(func.count()).where(
                            bus_messages.c.topic == topic,
                            bus_messages.c.id >= self._positions.get(topic, 0),
                        )
                    )
                ).scalar_one()
                out[Partition(topic, 0)] = count
        return out
