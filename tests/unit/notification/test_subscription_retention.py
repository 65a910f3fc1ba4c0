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
