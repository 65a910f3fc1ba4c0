"""The outbox relay bounds each batch by bytes as well as by count: a thousand multi-megabyte
events (a month-close burst of Invoices) were read into one batch, beyond the relay's memory.
The bound keeps what the relay guarantees: every event published once per pass, in id order,
nothing skipped, and a batch holds at least one event however large it is."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from ccm_shared.db import Database
from ccm_shared.outbox import MAX_BATCH_BYTES, OutboxRelay
from ccm_shared.tables import outbox_table
from ccm_shared.transport import InProcessTransport
from tests.support.messaging import metadata

TOPIC = "tests.thing.happened.v1"


class RecordingTransport(InProcessTransport):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[bytes]] = []

    async def send_batch(self, messages):  # noqa: ANN001, ANN201
        self.batches.append([m.value for m in messages])
        return await super().send_batch(messages)


async def _relay_run(payloads: list[str], *, batch_size: int, max_bytes: int):
    with tempfile.TemporaryDirectory() as folder:
        db = Database(f"sqlite+aiosqlite:///{folder}/platform.db", schema="ingest")
        try:
            async with db.engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
                if payloads:
                    await conn.execute(insert(outbox_table), [
                        {"event_id": str(uuid.uuid4()), "tenant": "acme", "topic": TOPIC,
                         "key": "p1", "event_type": TOPIC, "payload": p,
                         "created_at": datetime.now(UTC)} for p in payloads])
            transport = RecordingTransport()
            relay = OutboxRelay(db, transport, batch_size=batch_size, max_batch_bytes=max_bytes)
            published = await relay.publish_pass()
            async with db.engine.connect() as conn:
                unsent = (await conn.execute(select(outbox_table.c.id).where(
                    outbox_table.c.sent_at.is_(None)))).all()
            return published, transport.batches, len(unsent)
        finally:
            await db.dispose()


def _check(payloads: list[str], batch_size: int, max_bytes: int) -> list[list[bytes]]:
    published, batches, unsent = asyncio.run(
        _relay_run(payloads, batch_size=batch_size, max_bytes=max_bytes))
    # Every event once, in order, in one pass; nothing left unsent.
    assert [v.decode() for b in batches for v in b] == payloads
    assert published == len(payloads) and unsent == 0
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        if len(batch) > 1:  # counted in bytes (UTF-8), not characters
            assert sum(len(v) for v in batch) <= max_bytes, [len(v) for v in batch]
    return batches


def test_a_batch_stops_before_the_event_that_would_pass_the_byte_bound():
    kb = "x" * 1000
    batches = _check([kb] * 10, batch_size=100, max_bytes=3500)
    assert [len(b) for b in batches] == [3, 3, 3, 1]


def test_bytes_not_characters_are_counted():
    two_byte = "é" * 500  # 500 characters, 1000 bytes
    batches = _check([two_byte] * 4, batch_size=100, max_bytes=2000)
    assert [len(b) for b in batches] == [2, 2]


def test_an_event_larger_than_the_bound_goes_alone():
    batches = _check(["a" * 50, "b" * 5000, "c" * 50], batch_size=100, max_bytes=1000)
    assert [len(b) for b in batches] == [1, 1, 1]


def test_the_count_still_bounds_small_events():
    batches = _check(["{}"] * 7, batch_size=3, max_bytes=MAX_BATCH_BYTES)
    assert [len(b) for b in batches] == [3, 3, 1]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=3000), max_size=30),
       batch_size=st.integers(min_value=1, max_value=8),
       max_bytes=st.integers(min_value=1, max_value=6000),
       wide=st.booleans())
def test_every_event_is_published_once_in_order_within_both_bounds(
        sizes, batch_size, max_bytes, wide):
    char = "ü" if wide else "y"
    payloads = [f"{n}:" + char * size for n, size in enumerate(sizes)]
    _check(payloads, batch_size, max_bytes)
