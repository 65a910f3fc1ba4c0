"""Retention of the practice subscriptions' stored notifications (``subscription_events``: a full
copy of each event per subscription) and their delivery log (``subscription_deliveries``):
without it both grow forever.

``CCM_NOTIFICATION_SUBSCRIPTION_RETENTION_DAYS`` (0: kept forever) after an event was
**delivered** (acknowledged by the receiver), its notification and the log of its attempts are
deleted. An event a subscription has not delivered yet (pending: its number above the
subscription's ``delivered_through``, e.g. while it is paused) is never deleted, whatever its
age, nor are the attempts made at it.

The pass runs as the platform's messaging retention does (``ccm_shared.retention.in_batches``):
batches of ``BATCH`` notifications, each deleted with the attempts at it in a transaction of
its own, under an advisory lock of its own (one process prunes these at a time; sharing the
messaging retention's lock, a pass that met it was skipped for an hour), every hour. A pass
reads what it deletes through the indexes of ``notification_0008`` (``delivered_at``; the
attempts by subscription and number), not the tables.
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
    ev = subscription_events.alias("ev")
    # Delivered (acknowledged) and at or below the subscription's cursor: never a pending one.
    old_events = (
        select(ev.c.subscription_id, ev.c.number)
        .join(s, s.c.id == ev.c.subscription_id)
        .where(ev.c.status == "delivered", ev.c.delivered_at < cutoff,
               ev.c.number <= s.c.delivered_through)
        .limit(batch)
    )
    e, d = subscription_events, subscription_deliveries
    counts = {"events": 0, "deliveries": 0}

    async def page(conn) -> tuple[int, bool]:  # noqa: ANN001
        """A batch of old notifications and the attempts at them, together: an attempt goes
        with its notification, however old the attempt (a subscription paused for months
        keeps its failures' log while it keeps the notification)."""
        keys = [tuple(k) for k in (await conn.execute(old_events)).all()]
        if not keys:
            return 0, False
        counts["deliveries"] += (await conn.execute(delete(d).where(
            tuple_(d.c.subscription_id, d.c.number).in_(keys)))).rowcount
        counts["events"] += (await conn.execute(delete(e).where(
            tuple_(e.c.subscription_id, e.c.number).in_(keys)))).rowcount
        return len(keys), len(keys) == batch

    await in_batches(db, page, lock=f"ccm-subscription-retention:{db.schema}")
    events, deliveries = counts["events"], counts["deliveries"]
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
