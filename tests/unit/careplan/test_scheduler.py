"""The scheduler as a background job, and across restarts."""

import asyncio
from datetime import UTC, datetime

from ccm_careplan.service_layer import scheduler
from ccm_careplan.service_layer.common import tracker_id
from ccm_careplan.service_layer.scheduler import run_scheduler_pass
from ccm_shared.db import Database
from tests.unit.careplan import factories as f

T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)


async def test_the_background_job_runs_passes_on_the_injected_clock(careplan, monkeypatch):
    cp = careplan
    await cp.deliver(f.care_plan("alpha", "CarePlan/cp-1", at=T0))
    monkeypatch.setenv("CCM_CAREPLAN_SCHEDULER_INTERVAL_SECONDS", "0.05")
    cp.runtime.state.pop("settings", None)
    cp.clock.now = datetime(2027, 1, 6, 15, tzinfo=UTC)  # one day overdue
    await cp.runtime.start(consumers=False, relay=False)
    try:
        for _ in range(100):
            if await cp.emitted("careplan.review.overdue.v1"):
                break
            await asyncio.sleep(0.05)
    finally:
        await cp.runtime.stop()
    overdue, = await cp.emitted("careplan.review.overdue.v1")
    assert overdue["data"]["daysOverdue"] == 1 and overdue["time"].startswith("2027-01-06")


async def test_a_restarted_scheduler_neither_repeats_nor_loses_a_step(careplan):
    cp = careplan
    await cp.deliver(f.care_plan("alpha", "CarePlan/cp-1", at=T0))
    db = cp.runtime.db
    for day in (6, 7, 8):  # the 30-day reminder goes out on Dec 6, 2026
        await run_scheduler_pass(db, datetime(2026, 12, day, 15, tzinfo=UTC))
    # The process dies; a new one starts on the same database after the 14- and 7-day marks.
    restarted = Database(db.url, schema="careplan")
    try:
        first = await run_scheduler_pass(restarted, datetime(2026, 12, 30, 15, tzinfo=UTC))
        again = await run_scheduler_pass(restarted, datetime(2026, 12, 30, 16, tzinfo=UTC))
    finally:
        await restarted.dispose()
    assert (first.sent, first.superseded, again.sent, again.superseded) == (1, 1, 0, 0)
    reminders = await cp.emitted("careplan.review.reminder.v1")
    assert [(e["data"]["step"], e["time"][:10]) for e in reminders] == [
        (1, "2026-12-06"), (3, "2026-12-30")]
    history = (await cp.client.get(f"/v1/care-plans/{tracker_id('alpha', 'CarePlan/cp-1')}",
                                   headers=cp.auth())).json()["notifications"]
    assert [(n["kind"], n["step"], n["sent"]) for n in history if n["kind"] == "reminder"] == [
        ("reminder", 1, True), ("reminder", 2, False), ("reminder", 3, True)]


async def test_one_practice_failing_its_pass_does_not_stop_the_others(careplan, monkeypatch):
    cp = careplan
    for practice in ("alpha", "beta"):
        await cp.deliver(f.care_plan(practice, "CarePlan/cp-1", at=T0))
    original = scheduler._practice_pass

    async def alpha_breaks(db, practice, *args):  # noqa: ANN001, ANN202
        if practice == "alpha":
            raise RuntimeError("alpha's data is broken")
        return await original(db, practice, *args)

    monkeypatch.setattr(scheduler, "_practice_pass", alpha_breaks)
    result = await run_scheduler_pass(cp.runtime.db, datetime(2026, 12, 6, 15, tzinfo=UTC))
    assert result.failed == ["alpha"] and result.sent == 1
    (reminder,) = await cp.emitted("careplan.review.reminder.v1")
    assert reminder["tenant"] == "beta"
