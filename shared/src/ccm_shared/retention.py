"""Retention of the messaging tables: without it every service's outbox and inbox grow forever
(1.27 million outbox rows in one test database), and so does what their indexes and backups
carry.

- An outbox row is deleted ``CCM_OUTBOX_RETENTION_DAYS`` after it was published to Kafka (its
  ``sent_at``); a row not yet published is never deleted, whatever its age.
- An inbox row (the id of an applied or dead-lettered event) is deleted
  ``CCM_INBOX_RETENTION_DAYS`` after it was processed. A consumer recognises a redelivered event
  by this row, so the retention must be longer than the topics' retention in Kafka (7 days by
  default; 30 days here).

Rows go in batches, each in a transaction of its own, and one process per schema prunes at a time
(advisory lock; the others skip the pass). Times are the wall clock's, as the rows' are.

A pass costs what it deletes, not the size of the table (which holds a week of events or a month
of ids): the outbox is walked from its oldest row in id order (ids follow ``created_at``) and the
walk stops at the first page with nothing to delete; the inbox is read through its index on
``processed_at``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import and_, delete, select, tuple_

from ccm_shared.db import Database, xact_lock
from ccm_shared.tables import inbox_table, outbox_table

log = structlog.get_logger(__name__)

INTERVAL_SECONDS = 3600.0
BATCH = 5000


@dataclass(frozen=True)
class Pruned:
    outbox: int = 0
    inbox: int = 0


async def prune(db: Database, *, outbox_days: float, inbox_days: float,
                now: datetime | None = None, batch: int = BATCH) -> Pruned:
    """Delete what the retention allows, in batches; how many rows of each table went.
    A retention of 0 days keeps the table's rows forever."""
    now = now or datetime.now(UTC)
    out = inn = 0
    if outbox_days > 0:
        out = await _prune_outbox(db, now - timedelta(days=outbox_days), batch)
    if inbox_days > 0:
        i = inbox_table
        old = (select(i.c.consumer, i.c.event_id)
               .where(i.c.processed_at < now - timedelta(days=inbox_days)).limit(batch))
        gone = delete(i).where(tuple_(i.c.consumer, i.c.event_id).in_(old))

        async def inbox_page(conn) -> tuple[int, bool]:  # noqa: ANN001
            count = (await conn.execute(gone)).rowcount
            return count, count == batch

        inn = await in_batches(db, inbox_page)
    return Pruned(out, inn)


async def _prune_outbox(db: Database, cutoff: datetime, batch: int) -> int:
    """Published rows sent before ``cutoff``, walking pages of the oldest rows in id order."""
    o = outbox_table
    after = 0

    async def page(conn) -> tuple[int, bool]:  # noqa: ANN001
        nonlocal after
        rows = (await conn.execute(
            select(o.c.id, and_(o.c.sent_at.is_not(None), o.c.sent_at < cutoff).label("due"))
            .where(o.c.id > after).order_by(o.c.id).limit(batch))).all()
        if not rows:
            return 0, False
        after = rows[-1].id
        due = [r.id for r in rows if r.due]
        if due:
            await conn.execute(delete(o).where(o.c.id.in_(due)))
        # A page with nothing due is the young end of the table (or rows not yet published,
        # which go once published): the walk stops there.
        return len(due), bool(due) and len(rows) == batch

    return await in_batches(db, page)


async def in_batches(db: Database, page, *, lock: str | None = None) -> int:  # noqa: ANN001
    """Run ``page`` (deleted, more to do) in transactions of its own until it says done, under
    the advisory lock ``lock`` (default: the schema's retention), not waited for: another
    process holding it is pruning the same tables."""
    deleted = 0
    while True:
        async with db.engine.begin() as conn:
            if not await xact_lock(conn, lock or f"ccm-retention:{db.schema}", wait=False):
                return deleted  # another process is pruning this schema
            count, more = await page(conn)
        deleted += count
        if not more:
            return deleted
        await asyncio.sleep(0)  # let requests and consumers in between batches


async def run_retention(db: Database, stopping: asyncio.Event, *, outbox_days: float,
                        inbox_days: float, interval: float = INTERVAL_SECONDS) -> None:
    """Background job: prune at start and then every ``interval`` seconds until stopping."""
    from ccm_shared.service import every  # service imports this module

    async def one_pass() -> None:
        pruned = await prune(db, outbox_days=outbox_days, inbox_days=inbox_days)
        if pruned.outbox or pruned.inbox:
            log.info("messaging retention", schema=db.schema, outbox_rows=pruned.outbox,
                     inbox_rows=pruned.inbox)

    await every(stopping, interval, one_pass,
                failed="messaging retention failed; retrying later", level="warning")
