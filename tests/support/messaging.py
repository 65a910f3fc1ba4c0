"""Test doubles that are real code: a tiny 'service' schema with an effects table."""

from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, insert, select

from ccm_shared.db import Database, UnitOfWork
from ccm_shared.events import CloudEvent
from ccm_shared.tables import BigId, add_messaging_tables

metadata = MetaData()
add_messaging_tables(metadata)
# No unique constraint on purpose: an effect applied twice shows up as two rows.
effects = Table(
    "effects",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("subject", String(200), nullable=True),
    Column("sequence", BigInteger, nullable=True),
    Column("value", Integer, nullable=True),
)
state = Table(
    "state",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("value", Integer, nullable=False),
)


def make_event(tenant: str = "acme", patient: str | None = "p1", value: int = 0, **kw) -> CloudEvent:
    return CloudEvent(
        source="/tests",
        type=kw.pop("type", "tests.thing.happened.v1"),
        tenant=tenant,
        subject=f"Patient/{patient}" if patient else None,
        data={"value": value, **kw.pop("data", {})},
        **kw,
    )


async def record_effect(event: CloudEvent, uow: UnitOfWork) -> None:
    """The handler under test: one effect row per applied event."""
    if event.type == "tests.poison.v1":
        raise RuntimeError("this event always fails")
    await uow.session.execute(
        insert(effects).values(
            event_id=event.id,
            tenant=event.tenant,
            subject=event.subject,
            sequence=event.sequence,
            value=event.data.get("value"),
        )
    )


async def write_state_and_event(db: Database, topic: str, event: CloudEvent, *, commit: bool):
    async with db.unit_of_work() as uow:
        await uow.session.execute(
            insert(state).values(id=str(uuid.uuid4()), tenant=event.tenant, value=1)
        )
        stored = await uow.outbox.add(topic, event)
        if commit:
            await uow.commit()
    return stored


async def effect_rows(db: Database) -> list:
    async with db.engine.connect() as conn:
        return (await conn.execute(select(effects).order_by(effects.c.id))).all()


async def state_count(db: Database) -> int:
    async with db.engine.connect() as conn:
        return len((await conn.execute(select(state.c.id))).all())
