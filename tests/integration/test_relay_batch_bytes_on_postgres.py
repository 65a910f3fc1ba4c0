"""The relay's byte bound on PostgreSQL (octet_length: bytes, not characters), pipelined
batches still in id order and each event published once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select

from ccm_shared.outbox import OutboxRelay
from ccm_shared.tables import outbox_table
from ccm_shared.transport import InProcessTransport

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOPIC = "tests.thing.happened.v1"


class RecordingTransport(InProcessTransport):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[bytes]] = []

    async def send_batch(self, messages):  # noqa: ANN001, ANN201
        self.batches.append([m.value for m in messages])
        return await super().send_batch(messages)


async def test_batches_are_bounded_by_bytes_and_keep_their_order(pg_db):
    payloads = [f"{n:02d}" + "é" * 999 for n in range(7)]  # 2000 bytes, 1001 characters each
    async with pg_db.engine.begin() as conn:
        await conn.execute(insert(outbox_table), [
            {"event_id": str(uuid.uuid4()), "tenant": "acme", "topic": TOPIC, "key": "p1",
             "event_type": TOPIC, "payload": p, "created_at": datetime.now(UTC)}
            for p in payloads])
    transport = RecordingTransport()
    relay = OutboxRelay(pg_db, transport, batch_size=100, max_batch_bytes=4500)
    assert await relay.publish_pass() == 7
    assert [len(b) for b in transport.batches] == [2, 2, 2, 1]
    assert [v.decode() for b in transport.batches for v in b] == payloads
    async with pg_db.engine.connect() as conn:
        unsent = (await conn.execute(select(outbox_table.c.id).where(
            outbox_table.c.sent_at.is_(None)))).all()
    assert unsent == []
    assert await relay.publish_pass() == 0  # marked sent: not published again
