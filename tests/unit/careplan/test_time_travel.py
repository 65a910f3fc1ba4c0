"""A year and a half of daily scheduler passes on four plans, with the clock injected."""

from datetime import UTC, date, datetime, timedelta

from ccm_careplan.service_layer.common import tracker_id
from tests.unit.careplan import factories as f

RULES = {
    "reminder_days_before_due": [14],
    "overdue_reminder_every_days": 7,
    "escalate_after_days_overdue": 21,
    "escalate_after_reminders": 6,
    "clinical_supervisor": "Practitioner/sup-1",
}


def at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 15, 0, tzinfo=UTC)  # 09:00 in Chicago


async def review(cp, plan: str, day: date, outcome: str = "approved"):
    r = await cp.client.post(f"/v1/care-plans/{tracker_id('alpha', plan)}/reviews",
                             json={"reviewer": "Practitioner/dr-lee", "date": day.isoformat(),
                                   "outcome": outcome}, headers=cp.auth())
    assert r.status_code == 201, r.text
    return r.json()


async def test_a_year_of_reviews_on_time_late_escalated_and_brought_forward(careplan):
    cp = careplan
    put = await cp.client.put("/v1/practices/alpha/care-plan-rules", json=RULES, headers=cp.auth())
    assert put.status_code == 200, put.text
    actions = {
        date(2026, 1, 5): [f.care_plan("alpha", "CarePlan/ontime", at=at(date(2026, 1, 5)),
                                       patient="Patient/a"),
                           f.care_plan("alpha", "CarePlan/early", at=at(date(2026, 1, 5)),
                                       patient="Patient/d")],
        date(2026, 2, 1): [f.care_plan("alpha", "CarePlan/late", at=at(date(2026, 2, 1)),
                                       patient="Patient/b")],
        date(2026, 3, 1): [f.care_plan("alpha", "CarePlan/escalated", at=at(date(2026, 3, 1)),
                                       patient="Patient/c")],
        date(2026, 6, 1): [f.condition("alpha", "Condition/ckd", at=at(date(2026, 6, 1)),
                                       patient="Patient/d")],
    }
    reviews = {
        date(2026, 6, 25): "CarePlan/early",
        date(2026, 12, 28): "CarePlan/ontime",
        date(2027, 2, 10): "CarePlan/late",
        date(2027, 4, 1): "CarePlan/escalated",
    }
    day = date(2026, 1, 5)
    while day <= date(2027, 4, 30):
        cp.clock.now = at(day)
        for event in actions.get(day, []):
            await cp.deliver(event)
        if day in reviews:
            await review(cp, reviews[day], day)
        await cp.scheduler()
        day += timedelta(days=1)

    names = {tracker_id("alpha", p): p.removeprefix("CarePlan/") for p in
             ("CarePlan/ontime", "CarePlan/late", "CarePlan/escalated", "CarePlan/early")}
    got = [(names[e["data"]["tracker"]], e["type"].split(".")[2], e["data"]["step"],
            e["data"]["dueDate"], e["time"][:10])
           for e in await cp.emitted() if e["type"].startswith("careplan.review.")]
    expected = [
        ("early", "reminder", 1, "2026-07-01", "2026-06-17"),
        ("early", "completed", 0, "2026-07-01", "2026-06-25"),
        ("ontime", "reminder", 1, "2027-01-05", "2026-12-22"),
        ("ontime", "completed", 0, "2027-01-05", "2026-12-28"),
        ("late", "reminder", 1, "2027-02-01", "2027-01-18"),
        ("late", "due", 0, "2027-02-01", "2027-02-01"),
        ("late", "overdue", 0, "2027-02-01", "2027-02-02"),
        ("late", "reminder", 2, "2027-02-01", "2027-02-08"),
        ("late", "completed", 0, "2027-02-01", "2027-02-10"),
        ("late", "resolved", 0, "2027-02-01", "2027-02-10"),
        ("escalated", "reminder", 1, "2027-03-01", "2027-02-15"),
        ("escalated", "due", 0, "2027-03-01", "2027-03-01"),
        ("escalated", "overdue", 0, "2027-03-01", "2027-03-02"),
        ("escalated", "reminder", 2, "2027-03-01", "2027-03-08"),
        ("escalated", "reminder", 3, "2027-03-01", "2027-03-15"),
        ("escalated", "reminder", 4, "2027-03-01", "2027-03-22"),
        ("escalated", "escalated", 1, "2027-03-01", "2027-03-23"),
        ("escalated", "reminder", 5, "2027-03-01", "2027-03-29"),
        ("escalated", "completed", 0, "2027-03-01", "2027-04-01"),
        ("escalated", "resolved", 1, "2027-03-01", "2027-04-01"),
    ]
    assert got == expected

    escalation = next(e for e in await cp.emitted("careplan.review.escalated.v1"))
    assert escalation["data"]["supervisor"] == "Practitioner/sup-1"
    assert escalation["data"]["responsibleProvider"] == "Practitioner/dr-lee"
    assert escalation["data"]["daysOverdue"] == 22
    assert escalation["data"]["idempotencyKey"] == (
        f"alpha:{tracker_id('alpha', 'CarePlan/escalated')}:escalated:2027-03-01:1")

    tracker = (await cp.client.get(f"/v1/care-plans/{tracker_id('alpha', 'CarePlan/escalated')}",
                                   headers=cp.auth())).json()
    assert tracker["last_review"] == "2027-04-01"
    assert tracker["next_review_due"] == "2028-04-01"
    assert tracker["escalation_level"] == 0 and tracker["review_state"] == "current"
    assert [n["kind"] for n in tracker["escalations"]] == ["escalated"]
    early = (await cp.client.get(f"/v1/care-plans/{tracker_id('alpha', 'CarePlan/early')}",
                                 headers=cp.auth())).json()
    assert early["next_review_due"] == "2027-06-25" and early["early_review"] is None
