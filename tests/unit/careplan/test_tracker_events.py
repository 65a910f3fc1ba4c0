"""Ingest's events keep the tracker right: duplicates, out-of-order versions, review evidence,
clinical changes, patient and practitioner facts."""

from datetime import UTC, datetime, timedelta

from ccm_careplan.service_layer.common import tracker_id
from tests.unit.careplan import factories as f

T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)
PLAN = "CarePlan/cp-1"


async def detail(cp, plan=PLAN, practice="alpha"):
    r = await cp.client.get(f"/v1/care-plans/{tracker_id(practice, plan)}",
                            headers=cp.auth(practice))
    assert r.status_code == 200, r.text
    return r.json()


async def test_duplicate_and_out_of_order_versions_leave_the_tracker_correct(careplan):
    cp = careplan
    v1 = f.care_plan("alpha", PLAN, version="1", at=T0, care_team=("Practitioner/rn-1",))
    v2 = f.care_plan("alpha", PLAN, kind="revised", version="2", at=T0 + timedelta(days=40),
                     care_team=("Practitioner/rn-2",))
    v3 = f.care_plan("alpha", PLAN, kind="revised", version="3", at=T0 + timedelta(days=80),
                     care_team=("Practitioner/rn-3",), review={
                         "date": "2026-03-20", "reviewer": "Practitioner/dr-lee"})
    # Arrival order 3, 1, 2, then each again under a new event id, then a redelivery.
    for event in (v3, v1, v2):
        await cp.deliver(event)
    for event in (v1, v2, v3):
        await cp.deliver(event.model_copy(update={"id": event.id + "-again"}))
    await cp.deliver(v3)

    t = await detail(cp)
    assert t["current_version"] == "3" and t["care_team"] == ["Practitioner/rn-3"]
    assert t["created"] == "2026-03-26"  # v3 carries its own created date (the factory's)
    assert t["last_review"] == "2026-03-20" and t["next_review_due"] == "2027-03-20"
    assert t["signoff"] == {"status": "signed", "by": "Practitioner/dr-lee", "date": "2026-03-20"}
    assert [(v["version_id"], v["applied"]) for v in t["versions"]] == [
        ("1", False), ("2", False), ("3", True)]
    assert len(t["reviews"]) == 1 and t["reviews"][0]["source"] == "ehr"
    assert len(await cp.emitted("careplan.plan.distributed.v1")) == 1
    assert len(await cp.emitted("careplan.review.completed.v1")) == 1
    assert cp.runtime.consumers[0].stats.duplicates == 1


async def test_a_revision_without_review_evidence_brings_the_review_forward(careplan):
    cp = careplan
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0, care_team=("Practitioner/rn-1",)))
    await cp.deliver(f.care_plan("alpha", PLAN, kind="revised", version="2",
                                 at=T0 + timedelta(days=100), created="2026-01-05",
                                 care_team=("Practitioner/rn-1", "Practitioner/rn-2")))
    t = await detail(cp)
    assert t["early_review"] == {"reason": "plan-revised", "date": "2026-04-15"}
    assert t["next_review_due"] == "2026-05-15"
    assert t["signoff"]["status"] == "awaiting"
    distributed = await cp.emitted("careplan.plan.distributed.v1")
    assert [e["data"]["versionId"] for e in distributed] == ["1", "2"]
    assert distributed[1]["data"]["recipients"] == [
        "Practitioner/rn-1", "Practitioner/rn-2", "Practitioner/dr-lee"]


async def test_a_new_chronic_condition_brings_the_review_forward_once(careplan):
    cp = careplan
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0, addresses=("Condition/known",)))
    await cp.deliver(f.condition("alpha", "Condition/known", at=T0 + timedelta(days=10)))
    await cp.deliver(f.condition("alpha", "Condition/flu", at=T0 + timedelta(days=11),
                                 chronic=False))
    assert (await detail(cp))["early_review"] is None  # addressed already, or not chronic
    await cp.deliver(f.condition("alpha", "Condition/ckd", at=T0 + timedelta(days=20)))
    await cp.deliver(f.condition("alpha", "Condition/ckd", version="2",
                                 at=T0 + timedelta(days=50)))
    t = await detail(cp)
    assert t["early_review"] == {"reason": "new-chronic-condition", "date": "2026-01-25"}
    assert t["next_review_due"] == "2026-02-24"


async def test_closed_plans_and_inactive_patients_get_no_reminders(careplan):
    cp = careplan
    await cp.deliver(f.care_plan("alpha", "CarePlan/closed", at=T0, patient="Patient/a"))
    await cp.deliver(f.care_plan("alpha", "CarePlan/closed", kind="closed", version="2",
                                 at=T0 + timedelta(days=5), patient="Patient/a",
                                 status="revoked"))
    await cp.deliver(f.care_plan("alpha", "CarePlan/deceased", at=T0, patient="Patient/b"))
    await cp.deliver(f.patient("alpha", "Patient/b", at=T0 + timedelta(days=3), deceased=True))
    await cp.deliver(f.care_plan("alpha", "CarePlan/open", at=T0, patient="Patient/c"))
    result = await cp.scheduler(datetime(2027, 3, 1, 15, tzinfo=UTC))
    trackers = {e["data"]["tracker"] for e in await cp.emitted()
                if e["type"].startswith("careplan.review.")}
    assert trackers == {tracker_id("alpha", "CarePlan/open")} and result.trackers == 1
    assert (await detail(cp, "CarePlan/deceased"))["review_state"] == "inactive"
    assert (await detail(cp, "CarePlan/closed"))["status"] == "revoked"


async def test_an_inactive_author_hands_reminders_to_the_patients_general_practitioner(careplan):
    cp = careplan
    await cp.deliver(f.patient("alpha", at=T0, gps=("Practitioner/gp-1",)))
    await cp.deliver(f.care_plan("alpha", PLAN, at=T0))
    await cp.deliver(f.practitioner("alpha", "Practitioner/dr-lee", at=T0, active=False))
    await cp.deliver(f.practitioner("alpha", "Practitioner/dr-lee", at=T0 - timedelta(days=9),
                                    active=True, version="0"))  # older: ignored
    await cp.scheduler(datetime(2026, 12, 10, 15, tzinfo=UTC))
    reminder, = await cp.emitted("careplan.review.reminder.v1")
    assert reminder["data"]["responsibleProvider"] == "Practitioner/gp-1"


async def test_events_of_one_practice_never_touch_another(careplan):
    cp = careplan
    await cp.deliver(f.care_plan("beta", PLAN, at=T0))
    r = await cp.client.get(f"/v1/care-plans/{tracker_id('beta', PLAN)}", headers=cp.auth())
    assert r.status_code == 404
    assert (await cp.client.get("/v1/practices/alpha/care-plans", headers=cp.auth())
            ).json()["total"] == 0
    assert (await detail(cp, practice="beta"))["care_plan"] == PLAN


async def test_plans_dated_at_the_ends_of_the_calendar_are_tracked_not_dead_lettered(careplan):
    """Found by fuzzing: a plan created on 9999-12-31 (ingest accepts it) raised "year 10000 is
    out of range" working out its review, and its creation event was dead-lettered; a version
    of 0001-01-01T00:00Z is a day before the calendar in the practice's zone (Chicago)."""
    cp = careplan
    await cp.deliver(f.care_plan("alpha", "CarePlan/last", at=T0, created="9999-12-31"))
    last = await detail(cp, "CarePlan/last")
    assert last["next_review_due"] == "9999-12-31" and last["review_state"] == "current"
    # On its due day the review is due, never overdue: there is no day after it.
    result = await cp.scheduler(datetime(9999, 12, 31, 12, tzinfo=UTC))
    assert result.failed == [] and result.sent == 1  # the due notice supersedes reminder 3
    assert [e["data"]["dueDate"] for e in await cp.emitted("careplan.review.due.v1")] == [
        "9999-12-31"]
    assert await cp.emitted("careplan.review.overdue.v1") == []

    await cp.deliver(f.care_plan("alpha", "CarePlan/first", at=datetime(1, 1, 1, tzinfo=UTC)))
    first = await detail(cp, "CarePlan/first")
    assert first["created"] == "0001-01-01" and first["next_review_due"] == "0002-01-01"
    assert [v["last_updated"][:10] for v in first["versions"]] == ["0001-01-01"]
    assert cp.runtime.consumers[0].stats.dead_lettered == 0
