"""A step with nobody to receive it is not counted as sent: reminders of a plan without a
responsible provider wait (shown in the tracker) and go out on the first pass after one is
known; an escalation sent before the practice had a supervisor is announced again, naming
the supervisor, when the rules get one (embedded SQLite, in-process bus)."""

from datetime import UTC, datetime

from ccm_careplan.service_layer.common import tracker_id
from tests.unit.careplan import factories as f

T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)  # plans created then are due 2027-01-05
LATE = datetime(2027, 2, 20, 15, 0, tzinfo=UTC)  # 46 days overdue: reminders and escalation
ESCALATED = "careplan.review.escalated.v1"
TO_PROVIDER = ("careplan.review.due.v1", "careplan.review.reminder.v1",
               "careplan.review.overdue.v1")


async def plan_without_provider(cp) -> str:  # noqa: ANN001
    """CarePlan/cp-1 with no author, its patient with no general practitioner."""
    await cp.deliver(f.patient("alpha", at=T0))
    await cp.deliver(f.care_plan("alpha", "CarePlan/cp-1", at=T0, author=None, care_team=()))
    return tracker_id("alpha", "CarePlan/cp-1")


async def detail(cp, tracker: str) -> dict:  # noqa: ANN001
    r = await cp.client.get(f"/v1/care-plans/{tracker}", headers=cp.auth())
    assert r.status_code == 200, r.text
    return r.json()


async def test_reminders_with_no_responsible_provider_wait_and_say_why(careplan):
    cp = careplan
    tracker = await plan_without_provider(cp)
    result = await cp.scheduler(LATE)
    assert result.held > 0
    for kind in TO_PROVIDER:
        assert await cp.emitted(kind) == [], kind
    # the supervisor still hears of it
    [escalation] = await cp.emitted(ESCALATED)
    assert escalation["data"]["responsibleProvider"] is None
    cp.clock.now = LATE
    plan = await detail(cp, tracker)
    assert plan["reminders_sent"] == 0
    assert {n["kind"] for n in plan["notifications"]} == {"escalated"}
    assert plan["notices_held"].startswith("no responsible provider")
    page = (await cp.client.get("/v1/practices/alpha/care-plans", headers=cp.auth())).json()
    assert page["items"][0]["notices_held"] == plan["notices_held"]
    # a second pass the same day does not record them either
    await cp.scheduler(LATE)
    assert await cp.emitted("careplan.review.reminder.v1") == []


async def test_the_waiting_reminders_go_out_once_a_provider_is_known(careplan):
    cp = careplan
    tracker = await plan_without_provider(cp)
    await cp.scheduler(LATE)
    await cp.deliver(f.patient("alpha", at=LATE, gps=("Practitioner/dr-kim",), version="2"))
    later = LATE.replace(hour=16)
    await cp.scheduler(later)
    # one message, the latest: the due and overdue notices it supersedes are not sent
    assert await cp.emitted("careplan.review.due.v1") == []
    assert await cp.emitted("careplan.review.overdue.v1") == []
    reminder, = await cp.emitted("careplan.review.reminder.v1")
    assert reminder["data"]["responsibleProvider"] == "Practitioner/dr-kim"
    assert reminder["data"]["daysOverdue"] == 46
    cp.clock.now = later
    plan = await detail(cp, tracker)
    assert plan["notices_held"] is None and plan["reminders_sent"] == 1
    await cp.scheduler(later)  # nothing twice
    assert len(await cp.emitted("careplan.review.reminder.v1")) == 1


async def test_a_plan_with_a_provider_shows_nothing_held(careplan):
    cp = careplan
    await cp.deliver(f.care_plan("alpha", "CarePlan/cp-2", at=T0))
    await cp.scheduler(LATE)
    cp.clock.now = LATE
    plan = await detail(cp, tracker_id("alpha", "CarePlan/cp-2"))
    assert plan["notices_held"] is None and plan["reminders_sent"] > 0


async def put_rules(cp, **rules) -> None:  # noqa: ANN001, ANN003
    r = await cp.client.put("/v1/practices/alpha/care-plan-rules", headers=cp.auth(),
                            json=rules)
    assert r.status_code == 200, r.text


async def test_a_supervisor_set_after_an_escalation_is_named_in_it_again(careplan):
    """The walkthrough: the first pass escalated before the practice had a supervisor."""
    cp = careplan
    await cp.deliver(f.care_plan("alpha", "CarePlan/cp-1", at=T0))
    await cp.deliver(f.care_plan("alpha", "CarePlan/cp-3", at=LATE, patient="Patient/p3"))
    await cp.scheduler(LATE)
    [first] = await cp.emitted(ESCALATED)
    assert first["data"]["supervisor"] is None
    cp.clock.now = LATE.replace(hour=17)
    await put_rules(cp, clinical_supervisor="Practitioner/dr-sup")
    first_again, second = await cp.emitted(ESCALATED)
    assert first_again == first
    assert second["data"]["idempotencyKey"] == first["data"]["idempotencyKey"]
    assert second["id"] != first["id"]  # a new event, or notification's inbox would drop it
    assert second["data"]["supervisor"] == "Practitioner/dr-sup"
    assert second["data"]["step"] == first["data"]["step"] and second["subject"] == "Patient/p1"
    # the same supervisor again, or a rule change without one, announces nothing more
    await put_rules(cp, clinical_supervisor="Practitioner/dr-sup")
    await put_rules(cp, clinical_supervisor="Practitioner/dr-sup", overdue_reminder_every_days=5)
    assert len(await cp.emitted(ESCALATED)) == 2
    plan = await detail(cp, tracker_id("alpha", "CarePlan/cp-1"))
    assert plan["escalation_level"] == 1 and len(plan["escalations"]) == 1  # no new step
