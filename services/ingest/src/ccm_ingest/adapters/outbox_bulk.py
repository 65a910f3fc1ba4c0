"""Outbox rows for many events: one sequence upsert for every patient of the batch, and rows
the caller inserts with its own (``bulk.insert_all``), instead of two statements per event
(``Outbox.add``).

The rows are exactly what ``ccm_shared.outbox.Outbox.add`` writes (same table, same columns,
same per-(tenant, subject) sequence counter, the same correlation id), so the relay and every
consumer see no difference. ccm_shared has no bulk form yet; this is it, for one service.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_ingest.adapters.bulk import qualified, service_schema
from ccm_ingest.adapters.orm import event_sequences
from ccm_shared.events import CloudEvent
from ccm_shared.observability import current_correlation_id


async def reserve_sequences(session: AsyncSession, tenant: str,
                            wanted: dict[str, int]) -> dict[str, int]:
    """The first of ``wanted[subject]`` consecutive sequence numbers for each subject.

    Subjects are upserted in sorted order, so concurrent batches lock their counters in the
    same order (no deadlock); the row locks serialise writers of one patient, as ``Outbox.add``.
    """
    if not wanted:
        return {}
    subjects = sorted(wanted)
    if session.bind.dialect.name == "postgresql":
        table = qualified(await service_schema(session), event_sequences.name)
        conn = await session.connection()
        rows = (await conn.exec_driver_sql(
            f"INSERT INTO {table} AS s (tenant, subject, last) "
            "SELECT $1, u.subject, u.n FROM unnest($2::text[], $3::bigint[]) AS u(subject, n) "
            "ON CONFLICT (tenant, subject) DO UPDATE SET last = s.last + excluded.last "
            "RETURNING s.subject, s.last",
            (tenant, subjects, [wanted[s] for s in subjects]))).all()
    else:
        stmt = sqlite.insert(event_sequences).values(
            [{"tenant": tenant, "subject": s, "last": wanted[s]} for s in subjects])
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant", "subject"],
            set_={"last": event_sequences.c["last"] + stmt.excluded["last"]},
        ).returning(event_sequences.c.subject, event_sequences.c["last"])
        rows = (await session.execute(stmt)).all()
    return {row[0]: row[1] - wanted[row[0]] + 1 for row in rows}


async def stage_events(session: AsyncSession, tenant: str, events: list[CloudEvent],
                       ) -> tuple[list[CloudEvent], list[dict[str, Any]]]:
    """``events`` (all of ``tenant``, in this order) with their patients' next sequence numbers
    reserved, and the outbox rows that publish them on their own topics after commit."""
    if not events:
        return [], []
    subjects = Counter(e.subject or "" for e in events if e.sequence is None and e.patient)
    first = await reserve_sequences(session, tenant, dict(subjects))
    cid = current_correlation_id()
    stored = []
    for event in events:
        updates: dict[str, object] = {}
        if event.sequence is None and event.patient is not None:
            subject = event.subject or ""
            updates["sequence"] = first[subject]
            first[subject] += 1
        if event.correlationid is None and cid:
            updates["correlationid"] = cid
        stored.append(event.model_copy(update=updates) if updates else event)
    created = datetime.now(UTC)
    return stored, [{
        "event_id": e.id, "tenant": e.tenant, "topic": e.type, "key": e.kafka_key(),
        "event_type": e.type, "payload": e.to_json().decode(),
        "correlation_id": e.correlationid, "created_at": created,
    } for e in stored]

