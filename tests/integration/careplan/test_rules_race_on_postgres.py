"""Rules changes racing other work on real PostgreSQL (read committed): of two changes at once,
the one that waited decides whether the clinical supervisor changed against the rules it actually
replaced (the other's), not against the rules it read before it waited; a plan's event and a
scheduler pass act on the rules current once they hold the plan, not on rules read before."""

import asyncio
import json
from datetime import UTC, date, datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import select, text

from ccm_careplan.adapters.orm import trackers
from ccm_careplan.bootstrap import SERVICE
from ccm_careplan.domain.rules import ReviewRules
from ccm_careplan.service_layer import scheduler
from ccm_careplan.service_layer.commands import replace_rules
from ccm_careplan.service_layer.common import event_id, tracker_id
from ccm_careplan.service_layer.scheduler import run_scheduler_pass
from ccm_careplan.service_layer.tracking import make_handler
from ccm_shared.tables import outbox_table
from tests.support.infra import api_on_postgres
from tests.unit.careplan import factories as f

pytestmark = pytest.mark.asyncio(loop_scope="session")
T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)
LATE = datetime(2027, 2, 20, 15, 0, tzinfo=UTC)
FIRST = "Practitioner/sup-first"
OTHER = "Practitioner/sup-other"


@pytest_asyncio.fixture(loop_scope="session")
async def escalated(infra):
    """A practice at rules revision 1 (supervisor FIRST) with one plan escalated in its current
    cycle: ``(runtime, practice, the escalation's idempotency key)``."""
    async with api_on_postgres(infra.database_url, SERVICE, "rrace") as (rt, client, practice,
                                                                        headers):
        put = await client.put(f"/v1/practices/{practice}/care-plan-rules", headers=headers,
                               json={"clinical_supervisor": FIRST})
        assert put.status_code == 200 and put.headers["etag"] == '"1"', put.text
        handler = make_handler(lambda: T0)
        for event in (f.patient(practice, at=T0),
                      f.care_plan(practice, "CarePlan/cp-1", at=T0, author=None, care_team=())):
            async with rt.db.unit_of_work() as uow:
                await handler(event, uow)
                await uow.commit()
        assert (await run_scheduler_pass(rt.db, LATE, practices=[practice])).sent == 1
        [escalation] = [e for e in await emitted(rt, practice)
                        if e["type"] == "careplan.review.escalated.v1"]
        yield rt, practice, escalation["data"]["idempotencyKey"]


async def emitted(rt, practice: str) -> list[dict]:  # noqa: ANN001
    async with rt.db.engine.connect() as conn:
        rows = (await conn.execute(select(outbox_table.c.payload).where(
            outbox_table.c.tenant == practice).order_by(outbox_table.c.id))).scalars().all()
    return [json.loads(p) for p in rows]


async def change_rules(rt, practice: str, supervisor: str | None) -> int:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        revision = await replace_rules(uow, practice, ReviewRules(clinical_supervisor=supervisor),
                                       if_match=None, now=LATE)
        await uow.commit()
    return revision


async def waiting_for(rt, holder, work) -> asyncio.Task:  # noqa: ANN001
    """``work`` started as a task, once it waits for a lock the unit of work ``holder`` holds."""
    pid = (await holder.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    task = asyncio.create_task(work)
    async with rt.db.engine.connect() as conn:
        for _ in range(1000):
            waiting = (await conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE :holder = ANY(pg_blocking_pids(pid))"), {"holder": pid})).scalar_one()
            if waiting or task.done():
                break
            await conn.rollback()  # pg_stat_activity is read once per transaction
            await asyncio.sleep(0.02)
    assert not task.done(), task.exception()  # it went on while the holder held the lock
    assert waiting, "it never waited for the holder's lock"
    return task


@pytest.mark.parametrize(("first_sets", "then_sets", "reannounced"), [
    # the same new supervisor twice: the second replaced rules already naming it
    (OTHER, OTHER, False),
    # back to the supervisor both read: the second replaced rules naming OTHER
    (OTHER, FIRST, True),
    # the supervisor removed, then set again: the second replaced rules naming no one
    (None, FIRST, True),
])
async def test_a_rules_change_that_waited_compares_the_supervisor_it_replaced(
        escalated, first_sets, then_sets, reannounced):
    rt, practice, key = escalated
    async with rt.db.unit_of_work() as first:  # a change, held open with the rules row locked
        assert await replace_rules(first, practice, ReviewRules(clinical_supervisor=first_sets),
                                   if_match=None, now=LATE) == 2
        second = await waiting_for(rt, first, change_rules(rt, practice, then_sets))
        await first.commit()
    assert await second == 3
    again = [e for e in await emitted(rt, practice) if e["id"] == event_id(f"{key}:rules:3")]
    assert len(again) == (1 if reannounced else 0), again
    if reannounced:
        assert again[0]["data"]["supervisor"] == then_sets
        assert again[0]["data"]["idempotencyKey"] == key


# Events and scheduler passes that run while the rules change: they act on the rules read after
# the plan's lock (the change's recomputation is then either before them or after them), never
# on rules read before waiting for it.

@pytest_asyncio.fixture(loop_scope="session")
async def tracked(infra):
    """A practice on the default rules with one plan created at T0 (due 2027-01-05):
    ``(runtime, practice, tracker)``."""
    async with api_on_postgres(infra.database_url, SERVICE, "rrace") as (rt, _, practice, _h):
        await apply(rt, f.patient(practice, at=T0), f.care_plan(practice, "CarePlan/cp-1", at=T0))
        tracker = tracker_id(practice, "CarePlan/cp-1")
        assert (await plan(rt, tracker))["next_review_due"] == date(2027, 1, 5)
        yield rt, practice, tracker


async def apply(rt, *events) -> None:  # noqa: ANN001
    handler = make_handler(lambda: T0)
    for event in events:
        async with rt.db.unit_of_work() as uow:
            await handler(event, uow)
            await uow.commit()


async def plan(rt, tracker: str) -> dict:  # noqa: ANN001
    async with rt.db.engine.connect() as conn:
        return dict((await conn.execute(select(trackers).where(trackers.c.id == tracker))
                     ).one()._mapping)


async def test_a_plan_version_that_waited_for_a_rules_change_is_scheduled_by_the_new_rules(
        tracked):
    rt, practice, tracker = tracked
    async with rt.db.unit_of_work() as change:  # reviews every 6 months: due 2026-07-05
        await replace_rules(change, practice, ReviewRules(review_interval_months=6),
                            if_match=None, now=T0)
        revised = await waiting_for(rt, change, apply(rt, f.care_plan(
            practice, "CarePlan/cp-1", kind="revised", version="2", at=T0 + timedelta(hours=1))))
        await change.commit()
    await revised
    row = await plan(rt, tracker)
    assert (row["current_version"], row["next_review_due"]) == ("2", date(2026, 7, 5))


async def test_a_chronic_condition_that_waited_for_a_rules_change_follows_the_new_rules(tracked):
    rt, practice, tracker = tracked
    async with rt.db.unit_of_work() as change:  # no early review for a new chronic condition
        await replace_rules(change, practice,
                            ReviewRules(early_review_on_new_chronic_condition=False),
                            if_match=None, now=T0)
        condition = await waiting_for(rt, change, apply(rt, f.condition(
            practice, "Condition/c-1", at=T0 + timedelta(days=40))))
        await change.commit()
    await condition
    row = await plan(rt, tracker)
    assert (row["early_trigger"], row["next_review_due"]) == (None, date(2027, 1, 5))


async def test_a_scheduler_pass_names_the_supervisor_set_after_it_began(escalated, monkeypatch):
    rt, practice, _ = escalated
    read = scheduler.load_rules
    changed = []

    async def rules_then_a_change(session, of: str):  # noqa: ANN001, ANN202
        rules = await read(session, of)
        if not changed:  # the supervisor changes once the pass has read the rules
            changed.append(await change_rules(rt, practice, OTHER))
        return rules

    monkeypatch.setattr(scheduler, "load_rules", rules_then_a_change)
    result = await run_scheduler_pass(rt.db, LATE + timedelta(days=30), practices=[practice])
    assert changed == [2] and result.sent == 1
    latest = [e for e in await emitted(rt, practice)
              if e["type"] == "careplan.review.escalated.v1"][-1]
    assert (latest["data"]["step"], latest["data"]["supervisor"]) == (2, OTHER)


@pytest.mark.parametrize("first", [False, True])
async def test_a_plan_created_during_a_rules_change_is_scheduled_by_the_new_rules(tracked, first):
    """``first``: the practice's first rules, with no stored row for the new plan to wait on
    (it kept the defaults' due date: the change's advisory lock closes that gap)."""
    rt, practice, _ = tracked
    if not first:
        assert await change_rules(rt, practice, None) == 1  # rules stored
    async with rt.db.unit_of_work() as change:  # reviews every 6 months
        await replace_rules(change, practice, ReviewRules(review_interval_months=6),
                            if_match=None, now=T0)
        created = await waiting_for(rt, change, apply(rt, f.care_plan(
            practice, "CarePlan/cp-2", at=T0)))
        await change.commit()
    await created
    row = await plan(rt, tracker_id(practice, "CarePlan/cp-2"))
    assert row["next_review_due"] == date(2026, 7, 5)
