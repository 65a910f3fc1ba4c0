"""Old and new, delivered and undelivered subscription rows, for the subscriptions' retention
(shared by the SQLite unit test and the PostgreSQL integration test)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from ccm_notification.adapters.orm import (
    subscription_deliveries,
    subscription_events,
    subscriptions,
)
from ccm_notification.subscriptions.retention import SubscriptionsPruned
from ccm_notification.subscriptions.service import NewSubscription, create_subscription
from ccm_shared.db import Database

__all__ = ["SubscriptionsPruned", "kept", "make"]
DAY = timedelta(days=1)
# (number, delivered days ago or None: pending, created days ago)
ACTIVE_EVENTS = [(1, 100, 101), (2, 95, 95), (3, 10, 10), (4, None, 200), (5, None, 1)]
# (number, attempt, outcome, days ago)
ACTIVE_ATTEMPTS = [(1, 1, "retry", 101), (1, 2, "delivered", 100), (2, 1, "delivered", 95),
                   (3, 1, "delivered", 10), (4, 1, "retry", 150), (4, 2, "paused", 120)]
PAUSED_EVENTS = [(1, None, 300)]
PAUSED_ATTEMPTS = [(1, 1, "paused", 300)]


async def _subscription(db: Database, practice: str, now: datetime, events, attempts,  # noqa: ANN001
                        status: str) -> str:
    async with db.unit_of_work() as uow:
        row, _ = await create_subscription(
            uow, practice, NewSubscription(["billing.invoice.issued.v1"], "https://x.test/h",
                                           "id-only"),
            secret_key="k" * 32, limit=20, now=now - 400 * DAY)
        delivered = max([n for n, at, _ in events if at is not None], default=0)
        await uow.session.execute(update(subscriptions).where(subscriptions.c.id == row.id)
                                  .values(status=status, last_event_number=len(events),
                                          delivered_through=delivered))
        for number, delivered_ago, created_ago in events:
            await uow.session.execute(subscription_events.insert().values(
                subscription_id=row.id, number=number, practice=practice,
                event_id=f"{row.id}-{number}", event_type="billing.invoice.issued.v1",
                body={"eventNumber": number}, attempts=1,
                status="pending" if delivered_ago is None else "delivered",
                created_at=now - created_ago * DAY,
                delivered_at=None if delivered_ago is None else now - delivered_ago * DAY))
        for number, attempt, outcome, ago in attempts:
            await uow.session.execute(subscription_deliveries.insert().values(
                subscription_id=row.id, practice=practice, number=number, attempt=attempt,
                outcome=outcome, response="200" if outcome == "delivered" else "503",
                latency_ms=5, at=now - ago * DAY))
        await uow.commit()
    return row.id


async def make(db: Database, practice: str, now: datetime) -> tuple[str, str]:
    """An active subscription (events 1-3 delivered 100, 95 and 10 days ago; 4 pending since
    200 days, 5 since yesterday) and a paused one (its one event pending for 300 days)."""
    active = await _subscription(db, practice, now, ACTIVE_EVENTS, ACTIVE_ATTEMPTS, "active")
    paused = await _subscription(db, practice, now, PAUSED_EVENTS, PAUSED_ATTEMPTS, "paused")
    return active, paused


async def kept(db: Database, sub: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The subscription's event numbers and (number, attempt) of its delivery log."""
    async with db.unit_of_work() as uow:
        events = (await uow.session.execute(
            select(subscription_events.c.number).where(
                subscription_events.c.subscription_id == sub)
            .order_by(subscription_events.c.number))).scalars().all()
        attempts = (await uow.session.execute(
            select(subscription_deliveries.c.number, subscription_deliveries.c.attempt).where(
                subscription_deliveries.c.subscription_id == sub)
            .order_by(subscription_deliveries.c.id))).all()
    return list(events), [tuple(a) for a in attempts]
