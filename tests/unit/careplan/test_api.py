"""The coordinator's view over HTTP: filters, paging, history, reviews, rules, the CSV report."""

import csv
import io
from datetime import UTC, date, datetime, timedelta

import pytest

from ccm_careplan.service_layer.common import tracker_id
from ccm_shared.tenancy import create_token
from tests.unit.careplan import factories as f

NOW = datetime(2027, 3, 1, 15, 0, tzinfo=UTC)  # 09:00 in Chicago


async def seed(cp):
    """Plans due in 100 days, in 10 days, overdue 5 days, overdue 40 days (escalated)."""
    cp.clock.now = NOW
    for name, due_in in (("later", 100), ("soon", 10), ("late", -5), ("very-late", -40)):
        created = date(2027, 3, 1) + timedelta(days=due_in) - timedelta(days=365)
        await cp.deliver(f.care_plan("alpha", f"CarePlan/{name}", patient=f"Patient/{name}",
                                     at=datetime.combine(created, datetime.min.time(), UTC)
                                     + timedelta(hours=15)))
    await cp.scheduler()


async def names(cp, query=""):
    r = await cp.client.get(f"/v1/practices/alpha/care-plans{query}", headers=cp.auth())
    assert r.status_code == 200, r.text
    return [i["care_plan"].removeprefix("CarePlan/") for i in r.json()["items"]], r.json()


@pytest.mark.parametrize(("query", "expected"), [
    ("", ["very-late", "late", "soon", "later"]),
    ("?review=due", ["soon"]),
    ("?review=due-within:120", ["soon", "later"]),
    ("?review=overdue", ["very-late", "late"]),
    ("?review=escalated", ["very-late"]),
    ("?review=awaiting-signoff&sort=-next_review_due", ["later", "soon", "late", "very-late"]),
    ("?sort=patient&limit=2&offset=1", ["later", "soon"]),
    ("?patient=Patient/late", ["late"]),
])
async def test_the_tracker_filters_and_sorts(careplan, query, expected):
    await seed(careplan)
    assert (await names(careplan, query))[0] == expected


async def test_the_page_says_at_once_what_needs_attention(careplan):
    await seed(careplan)
    _, page = await names(careplan, "?limit=3")
    assert page["counts"] == {"due": 1, "overdue": 2, "escalated": 1, "awaiting-signoff": 4}
    assert page["total"] == 4 and page["next_offset"] == 3 and page["as_of"] == "2027-03-01"
    worst = page["items"][0]
    assert worst["review_state"] == "escalated" and worst["days_overdue"] == 40
    assert worst["escalation_level"] == 1 and worst["responsible_provider"] == "Practitioner/dr-lee"


@pytest.mark.parametrize("query", [
    "?review=soonish", "?review=due-within:x", "?sort=colour", "?limit=0", "?limit=501",
    "?offset=-1",
    "?review=due-within:%C2%B2",  # "²".isdigit() is true, int("²") raises
    "?review=due-within:%D9%A3",  # Arabic-Indic three: int() takes it, the filter must not
    "?review=due-within:3661", "?review=due-within:-1", "?review=due-within:+30",
    "?review=due-within:" + "9" * 5000,  # int() refuses more than 4,300 digits
    "?offset=9223372036854775808",  # past SQLite's and PostgreSQL's 64-bit OFFSET
    "?offset=1000001",
])
async def test_bad_list_parameters_answer_422(careplan, query):
    r = await careplan.client.get(f"/v1/practices/alpha/care-plans{query}",
                                  headers=careplan.auth())
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


async def test_the_largest_offset_and_due_window_are_accepted(careplan):
    await seed(careplan)
    assert (await names(careplan, "?offset=1000000"))[0] == []
    assert (await names(careplan, "?review=due-within:3660"))[0] == ["soon", "later"]


async def test_the_overdue_report_lists_late_plans_most_overdue_first(careplan):
    await seed(careplan)
    r = await careplan.client.get("/v1/practices/alpha/care-plans/overdue.csv",
                                  headers=careplan.auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(row["care_plan"], row["days_overdue"], row["escalation_level"]) for row in rows] == [
        ("CarePlan/very-late", "40", "1"), ("CarePlan/late", "5", "0")]
    other = await careplan.client.get("/v1/practices/beta/care-plans/overdue.csv",
                                      headers=careplan.auth())
    assert other.status_code == 404


async def test_a_signed_review_de_escalates_and_restarts_the_clock(careplan):
    cp = careplan
    await seed(cp)
    tid = tracker_id("alpha", "CarePlan/very-late")
    r = await cp.client.post(f"/v1/care-plans/{tid}/reviews", headers=cp.auth(), json={
        "reviewer": "Practitioner/dr-lee", "outcome": "approved-with-changes",
        "notes": "adjusted BP goals"})
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["last_review"] == "2027-03-01" and t["next_review_due"] == "2028-03-01"
    assert t["review_state"] == "current" and t["escalation_level"] == 0
    assert t["reviews"][0]["days_overdue"] == 40 and t["reviews"][0]["notes"] == "adjusted BP goals"
    resolved, = await cp.emitted("careplan.review.resolved.v1")
    assert resolved["data"]["step"] == 1 and resolved["data"]["daysOverdue"] == 40
    assert (await names(cp, "?review=escalated"))[0] == []


async def test_a_declined_sign_off_keeps_the_review_open(careplan):
    cp = careplan
    await seed(cp)
    tid = tracker_id("alpha", "CarePlan/late")
    r = await cp.client.post(f"/v1/care-plans/{tid}/reviews", headers=cp.auth(), json={
        "reviewer": "Practitioner/dr-lee", "outcome": "declined", "date": "2027-02-27"})
    assert r.status_code == 201
    assert r.json()["signoff"]["status"] == "declined" and r.json()["review_state"] == "overdue"
    assert await cp.emitted("careplan.review.completed.v1") == []


@pytest.mark.parametrize(("body", "status"), [
    ({"reviewer": "Practitioner/x", "outcome": "approved", "date": "2027-03-02"}, 422),  # future
    ({"reviewer": "Patient/x", "outcome": "approved"}, 422),
    ({"reviewer": "Practitioner/x", "outcome": "fine"}, 422),
    ({"reviewer": "Practitioner/x", "outcome": "approved", "extra": 1}, 422),
    ({"reviewer": "Practitioner/x", "outcome": "approved", "date": "yesterday"}, 422),
    # The plan was created on 2026-02-24: no review of it can be older.
    ({"reviewer": "Practitioner/x", "outcome": "approved", "date": "0001-01-01"}, 422),
    ({"reviewer": "Practitioner/x", "outcome": "approved", "date": "2026-02-23"}, 422),
    ({"reviewer": "Practitioner/x", "outcome": "declined", "date": "2026-02-23"}, 422),
])
async def test_bad_reviews_are_refused_and_change_nothing(careplan, body, status):
    cp = careplan
    await seed(cp)
    tid = tracker_id("alpha", "CarePlan/late")
    r = await cp.client.post(f"/v1/care-plans/{tid}/reviews", headers=cp.auth(), json=body)
    assert r.status_code == status, r.text
    t = (await cp.client.get(f"/v1/care-plans/{tid}", headers=cp.auth())).json()
    assert t["reviews"] == [] and t["review_state"] == "overdue"


async def approved_on(cp, tid: str, day: str):  # noqa: ANN001, ANN201
    """POST an approved review of tracker ``tid`` dated ``day``: the answer."""
    return await cp.client.post(f"/v1/care-plans/{tid}/reviews", headers=cp.auth(), json={
        "reviewer": "Practitioner/x", "outcome": "approved", "date": day})


async def test_reviews_of_closed_plans_conflict_and_earlier_reviews_are_refused(careplan):
    cp = careplan
    await seed(cp)
    tid = tracker_id("alpha", "CarePlan/soon")
    ok = await cp.client.post(f"/v1/care-plans/{tid}/reviews", headers=cp.auth(),
                              json={"reviewer": "Practitioner/x", "outcome": "approved"})
    assert ok.status_code == 201
    earlier = await approved_on(cp, tid, "2027-02-01")
    assert earlier.status_code == 422 and "before the last" in earlier.json()["detail"]
    await cp.deliver(f.care_plan("alpha", "CarePlan/soon", kind="closed", version="9",
                                 status="completed", at=NOW, patient="Patient/soon"))
    closed = await cp.client.post(f"/v1/care-plans/{tid}/reviews", headers=cp.auth(),
                                  json={"reviewer": "Practitioner/x", "outcome": "approved"})
    assert closed.status_code == 409
    elsewhere = await cp.client.post(f"/v1/care-plans/{tid}/reviews", headers=cp.auth("beta"),
                                     json={"reviewer": "Practitioner/x", "outcome": "approved"})
    assert elsewhere.status_code == 404


async def test_a_review_on_the_day_the_plan_was_created_is_accepted(careplan):
    cp = careplan
    await seed(cp)
    tid = tracker_id("alpha", "CarePlan/late")
    r = await approved_on(cp, tid, "2026-02-24")
    assert r.status_code == 201, r.text
    assert r.json()["last_review"] == "2026-02-24" and r.json()["next_review_due"] == "2027-02-24"


async def test_a_plan_without_a_creation_date_takes_no_review_before_it_was_first_seen(careplan):
    cp = careplan
    cp.clock.now = NOW
    await cp.deliver(f.care_plan("alpha", "CarePlan/undated", created="",
                                 at=datetime(2026, 6, 10, 15, 0, tzinfo=UTC)))
    tid = tracker_id("alpha", "CarePlan/undated")
    plan = (await cp.client.get(f"/v1/care-plans/{tid}", headers=cp.auth())).json()
    assert plan["created"] is None
    before = await approved_on(cp, tid, "2026-06-09")
    assert before.status_code == 422 and "2026-06-10" in before.json()["detail"]
    on = await approved_on(cp, tid, "2026-06-10")
    assert on.status_code == 201, on.text


async def test_a_plan_starting_later_can_be_reviewed_from_the_day_it_was_first_seen(careplan):
    cp = careplan
    cp.clock.now = NOW
    event = f.care_plan("alpha", "CarePlan/planned", created="",
                        at=datetime(2027, 2, 1, 15, 0, tzinfo=UTC))
    event.data["period"]["start"] = "2027-04-01"  # intended start, still ahead
    await cp.deliver(event)
    tid = tracker_id("alpha", "CarePlan/planned")
    assert (await cp.client.get(f"/v1/care-plans/{tid}", headers=cp.auth())).json()[
        "created"] == "2027-04-01"
    early = await approved_on(cp, tid, "2027-01-31")
    assert early.status_code == 422 and "2027-02-01" in early.json()["detail"]
    r = await approved_on(cp, tid, "2027-02-01")
    assert r.status_code == 201, r.text


async def test_care_team_members_acknowledge_the_version_they_received(careplan):
    cp = careplan
    await seed(cp)
    tid = tracker_id("alpha", "CarePlan/soon")
    ack = await cp.client.post(f"/v1/care-plans/{tid}/acknowledgements", headers=cp.auth(),
                               json={"recipient": "Practitioner/rn-diaz"})
    assert ack.status_code == 204
    stranger = await cp.client.post(f"/v1/care-plans/{tid}/acknowledgements", headers=cp.auth(),
                                    json={"recipient": "Practitioner/nobody"})
    assert stranger.status_code == 404
    dist = (await cp.client.get(f"/v1/care-plans/{tid}", headers=cp.auth())).json()["distribution"]
    assert dist["acknowledged"] == 1 and len(dist["recipients"]) == 2
    listed, = (await cp.client.get("/v1/practices/alpha/care-plans?patient=Patient/soon",
                                   headers=cp.auth())).json()["items"]
    assert listed["distribution"] == {"recipients": 2, "acknowledged": 1}


async def test_rules_are_visible_with_defaults_and_changeable_per_practice(careplan):
    cp = careplan
    await seed(cp)
    got = await cp.client.get("/v1/practices/alpha/care-plan-rules", headers=cp.auth())
    assert got.status_code == 200 and got.headers["etag"] == '"0"'
    body = got.json()
    assert body["is_default"] and body["rules"]["reminder_days_before_due"] == [30, 14, 7]
    assert body["warnings"]  # no supervisor yet
    put = await cp.client.put("/v1/practices/alpha/care-plan-rules", headers={
        **cp.auth(), "If-Match": '"0"'}, json={"review_interval_months": 6,
                                              "clinical_supervisor": "Practitioner/sup-1"})
    assert put.status_code == 200, put.text
    assert put.json()["revision"] == 1 and put.json()["warnings"] == []
    stale = await cp.client.put("/v1/practices/alpha/care-plan-rules", headers={
        **cp.auth(), "If-Match": '"0"'}, json={})
    assert stale.status_code == 412
    # A six-month interval makes every plan (created 265 to 405 days ago) overdue at once.
    assert (await names(cp, "?review=overdue"))[0] == ["very-late", "late", "soon", "later"]
    beta = await cp.client.get("/v1/practices/beta/care-plan-rules", headers=cp.auth("beta"))
    assert beta.json()["is_default"]
    foreign = await cp.client.put("/v1/practices/beta/care-plan-rules", headers=cp.auth(), json={})
    assert foreign.status_code == 404


@pytest.mark.parametrize("body", [
    {"reminder_days_before_due": [14, 14]}, {"review_interval_months": 0},
    {"overdue_reminder_every_days": -1}, {"clinical_supervisor": "Organization/1"},
    {"reminder_days_before_due": "30"}, {"unknown_rule": 3},
    # JSON types other than integers are refused, not coerced
    {"review_interval_months": "3"}, {"review_interval_months": True},
    {"escalate_after_reminders": 8.0}, {"reminder_days_before_due": ["30"]},
    {"reminder_days_before_due": [True]}, {"early_review_on_plan_revision": "yes"},
    {"early_review_on_new_chronic_condition": 0},
])
async def test_unusable_rules_answer_422_and_leave_the_rules_alone(careplan, body):
    cp = careplan
    r = await cp.client.put("/v1/practices/alpha/care-plan-rules", headers=cp.auth(), json=body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    got = await cp.client.get("/v1/practices/alpha/care-plan-rules", headers=cp.auth())
    assert got.json()["is_default"]


@pytest.mark.parametrize("if_match", [
    b'"\xb2"',  # latin-1 "²": isdigit() but not int()
    b'"\xd9\xa3"',  # not an ASCII digit either
    b'"' + b"1" * 5000 + b'"',  # int() refuses more than 4,300 digits
    b'"-1"', b'"x"', b'""', b"*",
])
async def test_a_malformed_if_match_answers_412_and_changes_nothing(careplan, if_match):
    cp = careplan
    r = await cp.client.put("/v1/practices/alpha/care-plan-rules",
                            headers={**cp.auth(), "If-Match": if_match},
                            json={"review_interval_months": 6})
    assert r.status_code == 412 and r.headers["content-type"] == "application/problem+json"
    got = await cp.client.get("/v1/practices/alpha/care-plan-rules", headers=cp.auth())
    assert got.json()["is_default"]


async def test_a_weak_if_match_is_accepted(careplan):
    cp = careplan
    r = await cp.client.put("/v1/practices/alpha/care-plan-rules",
                            headers={**cp.auth(), "If-Match": 'W/"0"'}, json={})
    assert r.status_code == 200 and r.headers["etag"] == '"1"'


async def test_a_token_without_the_careplan_scope_is_forbidden(careplan):
    cp = careplan
    token = await create_token(cp.runtime.db.engine, practice_id="alpha", scopes=("billing",))
    r = await cp.client.get("/v1/practices/alpha/care-plans",
                            headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    assert (await cp.client.get("/v1/practices/alpha/care-plans")).status_code == 401
