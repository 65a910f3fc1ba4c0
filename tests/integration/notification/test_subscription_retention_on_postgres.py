"""The subscriptions' retention on real PostgreSQL: notifications delivered longer ago than
``SUBSCRIPTION_RETENTION_DAYS`` go with the log of their attempts, in batches; an undelivered
one (however old, a paused subscription's too) and a recent one stay, and so does what the
receiver can still replay."""

from datetime import UTC, datetime

import pytest
import pytest_asyncio

from ccm_notification.bootstrap import SERVICE
from ccm_notification.subscriptions.retention import prune_subscriptions
from tests.support.infra import api_on_postgres
from tests.unit.notification import retention_scenario as scenario

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    async with api_on_postgres(infra.database_url, SERVICE, "subret") as (
            rt, client, practice, headers):
        yield rt, client, practice, headers


async def test_old_delivered_rows_go_and_undelivered_and_recent_ones_stay(api):
    rt, client, practice, headers = api
    now = datetime.now(UTC)
    active, paused = await scenario.make(rt.db, practice, now)
    assert await prune_subscriptions(rt.db, days=0, now=now) == \
        scenario.SubscriptionsPruned()  # 0: kept forever
    assert await scenario.kept(rt.db, active) == (
        [1, 2, 3, 4, 5], [(1, 1), (1, 2), (2, 1), (3, 1), (4, 1), (4, 2)])

    pruned = await prune_subscriptions(rt.db, days=90, now=now, batch=2)  # several batches
    # (at least: the database is shared, other tests' old delivered rows may go too)
    assert pruned.events >= 2 and pruned.deliveries >= 3
    assert await scenario.kept(rt.db, active) == ([3, 4, 5], [(3, 1), (4, 1), (4, 2)])
    assert await scenario.kept(rt.db, paused) == ([1], [(1, 1)])
    await prune_subscriptions(rt.db, days=90, now=now, batch=2)  # the next pass: the same
    assert await scenario.kept(rt.db, active) == ([3, 4, 5], [(3, 1), (4, 1), (4, 2)])
    assert await scenario.kept(rt.db, paused) == ([1], [(1, 1)])

    # what the receiver can still replay: the kept ones, the first number showing the gap
    r = await client.get(f"/v1/practices/{practice}/subscriptions/{active}/events?since=0",
                         headers=headers)
    assert r.status_code == 200, r.text
    assert [e["eventNumber"] for e in r.json()["events"]] == [3, 4, 5]
    status = (await client.get(f"/v1/practices/{practice}/subscriptions/{active}/status",
                               headers=headers)).json()
    assert (status["lastEventNumber"], status["deliveredThrough"], status["lagEvents"]) == (
        5, 3, 2)
