"""The subscriptions' retention on the embedded SQLite (as in development) and its wiring:
``SUBSCRIPTION_RETENTION_DAYS`` (90 by default, 0 keeps everything) runs an hourly pass."""

from __future__ import annotations

from datetime import UTC, datetime

from ccm_notification.bootstrap import SERVICE
from ccm_notification.config import NotificationSettings
from ccm_notification.subscriptions.retention import SubscriptionsPruned, prune_subscriptions
from ccm_shared.tenancy import Pricing, create_practice
from tests.support.embedded import embedded_runtime
from tests.unit.notification import retention_scenario as scenario

NOW = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
JOB = "notification-subscription-retention"


async def test_old_delivered_rows_go_and_undelivered_and_recent_ones_stay_on_sqlite(tmp_path):
    rt = await embedded_runtime(tmp_path, SERVICE, clock=lambda: NOW)
    try:
        await create_practice(rt.db.engine, practice_id="acme", name="Acme",
                              timezone="America/New_York", pricing=Pricing())
        active, paused = await scenario.make(rt.db, "acme", NOW)
        assert await prune_subscriptions(rt.db, days=0, now=NOW) == SubscriptionsPruned()
        assert await prune_subscriptions(rt.db, days=90, now=NOW, batch=2) == \
            SubscriptionsPruned(events=2, deliveries=3)
        assert await scenario.kept(rt.db, active) == ([3, 4, 5], [(3, 1), (4, 1), (4, 2)])
        assert await scenario.kept(rt.db, paused) == ([1], [(1, 1)])
        # a longer retention deletes nothing more (what is left is younger, or undelivered)
        assert await prune_subscriptions(rt.db, days=100, now=NOW) == SubscriptionsPruned()
    finally:
        await rt.db.dispose()


def test_the_retention_defaults_to_90_days(monkeypatch):
    monkeypatch.delenv("CCM_NOTIFICATION_SUBSCRIPTION_RETENTION_DAYS", raising=False)
    assert NotificationSettings().subscription_retention_days == 90
    monkeypatch.setenv("CCM_NOTIFICATION_SUBSCRIPTION_RETENTION_DAYS", "0")
    assert NotificationSettings().subscription_retention_days == 0


async def test_the_pass_runs_unless_the_retention_is_zero(tmp_path, monkeypatch):
    for days, runs in (("90", True), ("0", False)):
        monkeypatch.setenv("CCM_NOTIFICATION_SUBSCRIPTION_RETENTION_DAYS", days)
        rt = await embedded_runtime(tmp_path / days, SERVICE, clock=lambda: NOW)
        try:
            assert (JOB in [job.name for job in SERVICE.background(rt)]) is runs
        finally:
            await rt.state.pop("http_client").aclose()
            await rt.db.dispose()


async def test_the_attempts_at_a_notification_go_with_it_not_before(tmp_path):
    """Attempts made 150 and 120 days ago at a notification delivered 10 days ago (a
    subscription paused for months) stay while it stays: its log goes with it (found by
    review: they were deleted by their own age)."""
    rt = await embedded_runtime(tmp_path, SERVICE, clock=lambda: NOW)
    try:
        await create_practice(rt.db.engine, practice_id="acme", name="Acme",
                              timezone="America/New_York", pricing=Pricing())
        sub = await scenario._subscription(
            rt.db, "acme", NOW, [(1, 10, 150)],
            [(1, 1, "retry", 150), (1, 2, "paused", 120), (1, 3, "delivered", 10)], "active")
        await prune_subscriptions(rt.db, days=90, now=NOW)
        assert await scenario.kept(rt.db, sub) == ([1], [(1, 1), (1, 2), (1, 3)])
        await prune_subscriptions(rt.db, days=5, now=NOW)  # delivered 10 days ago: all go
        assert await scenario.kept(rt.db, sub) == ([], [])
    finally:
        await rt.db.dispose()
