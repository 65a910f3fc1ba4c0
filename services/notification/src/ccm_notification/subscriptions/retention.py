"""Retention of the practice subscriptions' stored notifications (``subscription_events``: a full
copy of each event per subscription) and their delivery log (``subscription_deliveries``):
without it both grow forever.

``CCM_NOTIFICATION_SUBSCRIPTION_RETENTION_DAYS`` (0: kept forever) after an event was
**delivered** (acknowledged by the receiver), its notification and the log of its attempts are
deleted. An event a subscription has not delivered yet (pending: its number above the
subscription's ``delivered_through``, e.g. while it is paused) is never deleted, whatever its
age, nor are the attempts made at it.

The pass is the platform's messaging retention's (``ccm_shared.retention``): batches of
``BATCH`` rows, each in a transaction of its own, under the same per-schema advisory lock (one
process prunes a schema at a time, the messaging tables or these), every hour. A pass reads what
it deletes through the indexes of ``notification_0008`` (``delivered_at``, ``at``), not the
tables; the only rows it reads and keeps are old attempts at events still pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete, select, tuple_

from ccm_notification.adapters.orm import (
    subscription_deliveries,
    subscription_events,
    subscriptions,
)
from ccm_shared.db import Database
from ccm_shared.retention import BATCH, INTERVAL_SECONDS, in_batches
from ccm_shared.service import every

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SubscriptionsPruned:
    events: int = 0
    deliveries: int = 0


async def prune_subscriptions(db: Database, *, days: float, now: datetime,
                              batch: int = BATCH) -> SubscriptionsPruned:
    """Delete the notifications delivered more than ``days`` before ``now`` and the attempts at
    them, in batches; how many rows of each went. ``days`` 0 keeps everything."""
    if days <= 0:
        return SubscriptionsPruned()
    cutoff = now - timedelta(days=days)
    s = subscriptions
    ev, dl = subscription_events.alias("ev"), subscription_deliveries.alias("dl")
    # Delivered (acknowledged) and at or below the subscription's cursor: never a pending one.
    old_events = (
        select(ev.c.subscription_id, ev.c.number)
        .join(s, s.c.id == ev.c.subscription_id)
        .where(ev.c.status == "delivered", ev.c.delivered_at < cutoff,
               ev.c.number <= s.c.delivered_through)
        .limit(batch)
    )
    e = subscription_events
    events_gone = delete(e).where(tuple_(e.c.subscription_id, e.c.number).in_(old_events))
    old_attempts = (
        select(dl.c.id)
        .join(s, s.c.id == dl.c.subscription_id)
        .where(dl.c.at < cutoff, dl.c.number <= s.c.delivered_through)
        .limit(batch)
    )
    d = subscription_deliveries
    attempts_gone = delete(d).where(d.c.id.in_(old_attempts))

    def pages(statement):  # noqa: ANN001, ANN202
        async def page(conn) -> tuple[int, bool]:  # noqa: ANN001
            count = (await conn.execute(statement)).rowcount
            return count, count == batch

        return page

    events = await in_batches(db, pages(events_gone))
    deliveries = await in_batches(db, pages(attempts_gone))
    return SubscriptionsPruned(events, deliveries)


async def run_subscription_retention(
    db: Database, stopping: asyncio.Event, *, days: float, clock: Callable[[], datetime],
    interval: float = INTERVAL_SECONDS,
) -> None:
    """Background job: prune at start and then every ``interval`` seconds until stopping."""

    async def one_pass() -> None:
        pruned = await prune_subscriptions(db, days=days, now=clock())
        if pruned.events or pruned.deliveries:
            log.info("subscription retention", schema=db.schema, event_rows=pruned.events,
                     delivery_rows=pruned.deliveries)

    await every(stopping, interval, one_pass,
                failed="subscription retention failed; retrying later", level="warning")
