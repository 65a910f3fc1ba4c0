"""The audit packet's evidence for each month is what the month's billing decision was taken on:
the care plan in force (as known at close, however late it was received, said plainly), the
chronic Conditions eligibility was judged on, the time log as locked at close with later
corrections apart, and an audit-trail section that claims no more than it holds."""

from __future__ import annotations

import json
import re
import zlib
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import delete, select

from ccm_billing.adapters import orm
from ccm_billing.domain.model import Month
from tests.unit.billing import compliance_events as cev
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver

PACKET = "/v1/practices/alpha/patients/p1/audit-packet"
TIME_LOG = "/v1/practices/alpha/patients/p1/time-log"


def pdf_text(content: bytes) -> str:
    """The text shown on a PDF's pages (fpdf2: Flate streams of ``(…) Tj`` strings), one
    string per line, whitespace collapsed so wrapped paragraphs read as written."""
    shown = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", content, re.S):
        try:
            page = zlib.decompress(stream)
        except zlib.error:
            continue
        for text in re.findall(rb"\(((?:[^()\\]|\\.)*)\)\s*Tj", page):
            shown.append(re.sub(rb"\\(.)", rb"\1", text).decode("latin-1"))
    return re.sub(r"\s+", " ", " ".join(shown))


def care_plan(practice, patient, pid, *, version, updated, status="active",  # noqa: ANN001, ANN201
              created="2024-06-10", review=None):
    kind = ("closed" if status in ("revoked", "completed", "entered-in-error")
            else "created" if version == 1 else "revised")
    return ev.event(practice, f"ingest.care-plan.{kind}.v1", patient, {
        "source": cev.src("CarePlan", pid, version, updated), "carePlan": f"CarePlan/{pid}",
        "patient": f"Patient/{patient}", "status": status, "intent": "plan", "created": created,
        "period": {}, "author": None, "careTeam": [], "addresses": [], "categories": [],
        "review": {"date": review, "reviewer": None} if review else None})


def condition(practice, patient, cid, *, version=1, updated="2024-06-01T12:00:00Z",  # noqa: ANN001, ANN201
              chronic=True, clinical="active", verification="confirmed", code="E11.9"):
    return ev.event(practice, "ingest.condition.upserted.v1", patient, {
        "source": cev.src("Condition", cid, version, updated), "condition": f"Condition/{cid}",
        "patient": f"Patient/{patient}", "clinicalStatus": clinical,
        "verificationStatus": verification, "categories": [],
        "code": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code,
                  "display": f"condition {code}"}],
        "onset": "2019-04-02", "chronic": chronic, "deleted": False})


async def february(billing, *, plan: bool = True) -> None:
    """p1 of alpha: consent in January, two chronic conditions and one acute, 45 minutes of staff
    time in February 2025; the care plan (created in the EHR on 2024-06-10) is pushed only on
    1 March, after the month ended and before it closed; February is closed on 2 March."""
    clock = billing.state["clock"]
    clock.now = datetime(2025, 2, 20, 15, tzinfo=UTC)
    await deliver(billing, ev.patient("alpha", "p1"),
                  cev.consent("alpha", "p1", "c1", obtained="2025-01-10T10:00:00-05:00"),
                  ev.role("alpha", "nurse-1", "clinical-staff",
                          practitioner="Practitioner/nurse-1"),
                  condition("alpha", "p1", "k1", code="E11.9"),
                  condition("alpha", "p1", "k2", code="I10"),
                  condition("alpha", "p1", "k3", code="J06.9", chronic=False),
                  cev.time_logged("alpha", "p1", "e1", 1500, "2025-02-03T10:00:00-05:00"),
                  cev.time_logged("alpha", "p1", "e2", 1200, "2025-02-17T10:00:00-05:00"))
    if plan:
        clock.now = datetime(2025, 3, 1, 15, tzinfo=UTC)
        await deliver(billing, care_plan("alpha", "p1", "cp1", version=1,
                                         updated="2025-03-01T14:00:00Z"))
    clock.now = datetime(2025, 3, 2, 15, tzinfo=UTC)
    closed = await api(billing).post("/v1/practices/alpha/billing-periods/2025-02/close")
    assert closed.status_code == 200, closed.text


async def packet(billing, first: str, last: str | None = None) -> tuple[dict, dict, dict]:
    """(the Bundle, its resources by fullUrl's key, the Lists by month)."""
    r = await api(billing).get(PACKET, params={"from": first, "to": last or first})
    assert r.status_code == 200, r.text
    doc = r.json()
    Bundle.model_validate(doc)
    assert doc["type"] == "collection"
    by_key = {e["fullUrl"].removeprefix("urn:ccm:"): e["resource"] for e in doc["entry"]}
    lists = {x["title"].removeprefix("CCM records "): [i["item"]["reference"] for i in x["entry"]]
             for x in by_key.values() if x["resourceType"] == "List"}
    return doc, by_key, lists


def decision_ext(by_key: dict, refs: list[str]) -> dict[str, list]:
    """The month's Basic decision's sub-extensions by url (each a list of its values)."""
    (basic,) = [by_key[r] for r in refs if r.startswith("Basic/")]
    out: dict[str, list] = {}
    for x in basic["extension"][0]["extension"]:
        value = ({y["url"]: next(v for k, v in y.items() if k.startswith("value"))
                  for y in x["extension"]} if "extension" in x
                 else next(v for k, v in x.items() if k.startswith("value")))
        out.setdefault(x["url"], []).append(value)
    return out


async def pdf(billing, first: str, last: str | None = None) -> str:
    r = await api(billing).get(PACKET, params={"from": first, "to": last or first, "format": "pdf"})
    assert r.status_code == 200 and r.content.startswith(b"%PDF-"), r.text
    return pdf_text(r.content)


async def test_a_care_plan_received_after_the_month_but_before_its_close_is_its_evidence(billing):
    """The walkthrough's defect: February was billed on a plan pushed on 1 March. The packet
    holds that plan in February's List, says the decision found it in force, and says plainly
    that it was received after the month's services."""
    await february(billing)
    wl = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-02/worklist")).json()
    (row,) = wl["patients"]
    assert "care-plan-missing" not in row["blockers"] and row["codes"]  # billed on the plan
    _, by_key, lists = await packet(billing, "2025-02")
    assert "CarePlan/cp1/_history/1" in lists["2025-02"]
    plan = by_key["CarePlan/cp1/_history/1"]
    assert (plan["status"], plan["created"], plan["meta"]["versionId"]) == (
        "active", "2024-06-10", "1")
    said = decision_ext(by_key, lists["2025-02"])
    (judged,) = said["carePlan"]
    assert judged["reference"] == {"reference": "CarePlan/cp1/_history/1"}
    assert judged["inForce"] is True and judged["receivedAfterMonth"] is True
    assert said["evidenceAsOf"] == ["2025-03-02T15:00:00+00:00"]
    assert "evidenceCheck" not in said  # the evidence agrees with the decision
    provenance = [by_key[r] for r in lists["2025-02"] if r.startswith("Provenance/")
                  and by_key[r]["target"][0]["reference"] == "CarePlan/cp1/_history/1"]
    assert [p["recorded"] for p in provenance] == ["2025-03-01T14:00:00+00:00"]
    text = await pdf(billing, "2025-02")
    care_plan_part = text.split("Care plan The care plan(s)")[1].split("Review evidence")[0]
    assert "None on record" not in care_plan_part
    assert "CarePlan/cp1 1 active 2024-06-10" in care_plan_part
    assert ("CarePlan/cp1 version 1 was received on 2025-03-01, after this month's services "
            "(the month ended 2025-02-28)") in care_plan_part


async def test_a_month_without_a_care_plan_says_so_and_a_plan_received_after_close_apart(billing):
    """No plan when February closed (care-plan-missing): none is evidence of February; the plan
    pushed after the close is shown as received later, not as what the decision relied on."""
    await february(billing, plan=False)
    billing.state["clock"].now = datetime(2025, 3, 5, 15, tzinfo=UTC)
    await deliver(billing, care_plan("alpha", "p1", "cp1", version=1,
                                     updated="2025-03-05T14:00:00Z"))
    _, by_key, lists = await packet(billing, "2025-02")
    said = decision_ext(by_key, lists["2025-02"])
    assert "carePlan" not in said  # the decision judged no plan
    assert "CarePlan/cp1/_history/1" in lists["2025-02"]  # shown, as received later
    text = await pdf(billing, "2025-02")
    assert "not on record as this patient's when the month was decided: received or " in text
    assert "care-plan-missing" in text


async def test_a_care_plan_voided_after_close_keeps_the_version_judged_and_shows_the_void(billing):
    await february(billing)
    billing.state["clock"].now = datetime(2025, 3, 10, 15, tzinfo=UTC)
    await deliver(billing, care_plan("alpha", "p1", "cp1", version=2, status="entered-in-error",
                                     updated="2025-03-10T14:00:00Z"))
    _, by_key, lists = await packet(billing, "2025-02")
    refs = lists["2025-02"]
    assert {"CarePlan/cp1/_history/1", "CarePlan/cp1/_history/2"} <= set(refs)
    assert by_key["CarePlan/cp1/_history/2"]["status"] == "entered-in-error"
    said = decision_ext(by_key, refs)
    (judged,) = said["carePlan"]
    assert judged["reference"] == {"reference": "CarePlan/cp1/_history/1"}
    assert judged["inForce"] is True
    # The correction that followed is the month's decision now, with its blocker.
    assert said["revision"] == [1] and "care-plan-missing" in said["blocker"]
    text = await pdf(billing, "2025-02")
    assert "Received after the decision: CarePlan/cp1 version 2 (entered-in-error)" in text
    assert "By today's record CarePlan/cp1 would be NOT in force for this month." in text


async def test_each_month_holds_the_chronic_conditions_its_eligibility_was_judged_on(billing):
    await february(billing)
    # After February closed: k2 entered in error, and another chronic condition arrives.
    billing.state["clock"].now = datetime(2025, 3, 10, 15, tzinfo=UTC)
    await deliver(billing,
                  condition("alpha", "p1", "k2", version=2, updated="2025-03-10T14:00:00Z",
                            verification="entered-in-error", code="I10"),
                  condition("alpha", "p1", "k4", updated="2025-03-10T14:05:00Z", code="N18.3"))
    _, by_key, lists = await packet(billing, "2025-02", "2025-03")
    feb, march = lists["2025-02"], lists["2025-03"]
    assert {r for r in feb if r.startswith("Condition/")} == {
        "Condition/k1/_history/1", "Condition/k2/_history/1", "Condition/k2/_history/2",
        "Condition/k4/_history/1"}
    assert not any(r.startswith("Condition/k3") for r in feb + march)  # not chronic: not evidence
    k1 = by_key["Condition/k1/_history/1"]
    assert k1["code"]["coding"] == [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                     "code": "E11.9", "display": "condition E11.9"}]
    assert k1["clinicalStatus"]["coding"][0]["code"] == "active"
    assert k1["subject"] == {"reference": "Patient/p1"}
    said = decision_ext(by_key, feb)
    assert said["chronicConditionsCounted"] == [2] and said["chronicConditionsRequired"] == [2]
    assert sorted(c["reference"]["reference"] for c in said["chronicCondition"]) == [
        "Condition/k1/_history/1", "Condition/k2/_history/1"]
    # March is open: judged now, on k1 and k4 (k2 is in error now).
    assert {r for r in march if r.startswith("Condition/")} == {
        "Condition/k1/_history/1", "Condition/k4/_history/1"}
    provenance = {by_key[r]["target"][0]["reference"] for r in feb if r.startswith("Provenance/")}
    assert {"Condition/k1/_history/1", "Condition/k2/_history/1"} <= provenance
    sources = re.findall(r"Condition/k4 1 2025-03-10T14:05:00", await pdf(billing, "2025-02"))
    assert len(sources) == 1  # its source version, once
    text = await pdf(billing, "2025-02")
    assert "Chronic conditions counted, as known when the month closed" in text
    assert ": 2 (at least 2 required: met)" in text
    assert "Condition/k1 E11.9 condition E11.9 active confirmed 2019-04-02 1" in text
    assert "Condition/k4: received after the decision; it counts now but was not counted" in text
    assert "by today's record it does NOT count" in text  # k2


async def test_the_time_log_locked_view_is_the_lock_and_corrections_are_shown_as_such(billing):
    """After close e1 is shortened (a new version) and e2 entered in error: the locked view
    keeps what the close filed (finished, counted, the seconds of version 1) and shows each
    later version as a correction with the filing that took it in."""
    await february(billing)
    clock = billing.state["clock"]
    clock.now = datetime(2025, 3, 10, 15, tzinfo=UTC)
    await deliver(billing, cev.time_logged("alpha", "p1", "e1", 1000, "2025-02-03T10:00:00-05:00",
                                           version=2, updated="2025-03-10T14:00:00Z"))
    clock.now = datetime(2025, 3, 11, 15, tzinfo=UTC)
    await deliver(billing, cev.time_reversed("alpha", "p1", "e2", updated="2025-03-11T14:00:00Z"))
    log = (await api(billing).get(TIME_LOG, params={"month": "2025-02"})).json()
    assert log["lockedAt"] == "2025-03-02T15:00:00+00:00"
    rows = {e["entry"]: e for e in log["entries"]}
    for entry, seconds in (("e1", 1500), ("e2", 1200)):
        row = rows[entry]
        assert (row["status"], row["counted"], row["reason"], row["seconds"]) == (
            "finished", True, None, seconds), entry
        assert row["locked"] is True
        assert row["source"]["versionId"] == "1"
    (shortened,) = rows["e1"]["corrections"]
    assert (shortened["versionId"], shortened["status"], shortened["seconds"]) == (
        "2", "finished", 1000)
    assert shortened["receivedAt"] == "2025-03-10T14:00:00+00:00"
    assert shortened["filing"]["revision"] == 1 and shortened["filing"]["seconds"] == 1000
    (reversed_,) = rows["e2"]["corrections"]
    assert (reversed_["versionId"], reversed_["status"]) == ("2", "entered-in-error")
    assert reversed_["filing"] == {
        "revision": 2, "filedAt": "2025-03-11T15:00:00+00:00",
        "reason": reversed_["filing"]["reason"], "status": "entered-in-error", "seconds": 1200,
        "counted": False, "notCountedReason": "not-finished", "inMonth": True}
    assert log["totals"] == {"countedSeconds": 2700, "countedMinutes": 45}
    assert log["totalsAfterCorrections"]["countedSeconds"] == 1000
    assert [f["revision"] for f in log["filings"]] == [0, 1, 2]
    # The packet's FHIR and PDF say the same.
    _, by_key, lists = await packet(billing, "2025-02")
    e2 = by_key["Encounter/e2"]
    assert (e2["status"], e2["meta"]["versionId"], e2["length"]["value"]) == ("finished", "1", 1200)
    counted = [x["valueBoolean"] for x in e2["extension"] if x["url"].endswith("/ccm-counted")]
    assert counted == [True]
    (correction,) = [x for x in e2["extension"] if x["url"].endswith("/ccm-correction")]
    parts = {x["url"]: next(v for k, v in x.items() if k.startswith("value"))
             for x in correction["extension"]}
    assert parts["versionId"] == "2" and parts["status"] == "entered-in-error"
    assert parts["revision"] == 2 and parts["counted"] is False
    text = await pdf(billing, "2025-02")
    assert re.search(r"e2 2025-02-17T15:00 Practitioner/nurse-1 staff 20\.0 yes - v1 ", text)
    assert ("Correction after the lock: Encounter/e2 version 2 (ingest.time-entry.reversed.v1; "
            "the version says entered-in-error), received 2025-03-11T14:00:00") in text
    assert "Filed in revision 2 on 2025-03-11T15:00:00" in text
    assert "entered-in-error, not counted (not-finished)." in text
    assert "Counted at close: 45 minutes (2700 seconds)." in text
    assert "Counted after corrections (revision 2, filed 2025-03-11T15:00:00): 16 minutes" in text


async def test_the_audit_trail_section_claims_only_what_it_holds(billing):
    await february(billing)
    text = await pdf(billing, "2025-02")
    assert "reads and writes of this patient's data" not in text
    assert "Audit trail (this patient, and the requests that decided these months)" in text
    assert "each sent alone or in a transaction or batch Bundle" in text


async def test_another_practices_plans_and_conditions_of_the_same_ids_stay_out(billing):
    await february(billing)
    await deliver(billing, care_plan("beta", "p1", "cp1", version=7, status="revoked",
                                     updated="2025-02-01T14:00:00Z"),
                  condition("beta", "p1", "k1", version=9, clinical="resolved"),
                  condition("beta", "p1", "k9"))
    doc, by_key, lists = await packet(billing, "2025-02")
    assert not any("_history/7" in k or "_history/9" in k or "Condition/k9" in k for k in by_key)
    assert decision_ext(by_key, lists["2025-02"])["chronicConditionsCounted"] == [2]
    assert "beta" not in json.dumps([r for r in by_key.values()
                                     if r["resourceType"] in ("CarePlan", "Condition")])


async def test_a_plan_billing_holds_no_source_version_of_is_shown_as_the_decision_read_it(billing):
    """Facts applied before billing kept source versions: the projection's row is the
    evidence (and the packet says so), never a silent 'None on record'."""
    await february(billing)
    async with billing.db.unit_of_work() as uow:
        s = orm.source_versions
        await uow.session.execute(delete(s).where(s.c.resource_type == "CarePlan"))
        await uow.commit()
        assert (await uow.session.execute(select(orm.care_plans.c.care_plan_id))).all()
    _, by_key, lists = await packet(billing, "2025-02")
    assert "CarePlan/cp1" in lists["2025-02"]
    assert by_key["CarePlan/cp1"]["status"] == "active" and "meta" not in by_key["CarePlan/cp1"]
    (judged,) = decision_ext(by_key, lists["2025-02"])["carePlan"]
    assert judged["inForce"] is True and judged["reference"] == {"reference": "CarePlan/cp1"}



async def test_a_care_plan_moved_to_another_patient_after_close(billing):
    """Each patient's packet holds what that patient's decision was taken on: p1's February the
    plan in force at close (and that it moved since, naming no one), p2's not as evidence."""
    await february(billing)
    billing.state["clock"].now = datetime(2025, 3, 10, 15, tzinfo=UTC)
    await deliver(billing, ev.patient("alpha", "p2"),
                  care_plan("alpha", "p2", "cp1", version=2, updated="2025-03-10T14:00:00Z"))
    _, by_key, lists = await packet(billing, "2025-02")
    (judged,) = decision_ext(by_key, lists["2025-02"])["carePlan"]
    assert judged["reference"] == {"reference": "CarePlan/cp1/_history/1"}
    assert judged["inForce"] is True and judged["movedToAnotherPatient"] is True
    assert "CarePlan/cp1/_history/2" not in by_key  # p2's version: not p1's record
    text = await pdf(billing, "2025-02")
    assert "After the decision CarePlan/cp1 was assigned to another patient." in text
    assert "Patient/p2" not in text
    r = await api(billing).get("/v1/practices/alpha/patients/p2/audit-packet",
                               params={"from": "2025-02"})
    doc = r.json()
    Bundle.model_validate(doc)
    assert "urn:ccm:CarePlan/cp1/_history/1" not in {e["fullUrl"] for e in doc["entry"]}


def plan_version(pid: str, version: int, updated: str, **data):  # noqa: ANN003, ANN201
    e = care_plan("alpha", "p1", pid, version=version, updated=updated,
                  status=data.pop("status", "active"), created=data.pop("created", None),
                  review=data.pop("review", None))
    e.data.update(data)
    return e


PLAN_HISTORIES = {
    # review evidence on v1 only: a later revision without evidence keeps it
    "kept-review": [plan_version("h1", 1, "2025-01-05T12:00:00Z", created="2024-06-10",
                                 review="2025-01-05"),
                    plan_version("h1", 2, "2025-02-05T12:00:00Z", created="2024-06-10")],
    # created as a dateTime: the practice's day (2 a.m. UTC on 1 July is 30 June in New York)
    "created-instant": [plan_version("h2", 1, "2025-01-05T12:00:00Z",
                                     created="2024-07-01T02:00:00Z")],
    # no created: period.start
    "period-start": [plan_version("h3", 1, "2025-01-05T12:00:00Z",
                                  period={"start": "2024-09"})],
    # completed: the day of the version that completed it
    "completed": [plan_version("h4", 1, "2025-01-05T12:00:00Z", created="2024-06-10",
                               review="2025-01-05"),
                  plan_version("h4", 2, "2025-02-11T03:00:00Z", created="2024-06-10",
                               status="completed")],
    "completed-on": [plan_version("h5", 1, "2025-02-11T03:00:00Z", created="2024-06-10",
                                  status="completed", completedOn="2025-02-09")],
    "voided": [plan_version("h6", 1, "2025-01-05T12:00:00Z", created="2024-06-10"),
               plan_version("h6", 2, "2025-02-05T12:00:00Z", created="2024-06-10",
                            status="entered-in-error", review="2025-02-05")],
}


async def test_a_care_plan_rebuilt_from_its_versions_is_the_projections_in_any_order(billing):
    """The packet rebuilds a closed month's care plans from the versions known at close: the
    rebuild of every version is the projection's row, whatever order they arrived in."""
    from ccm_billing.compliance import judged
    from ccm_billing.compliance.records import _history

    tz = ZoneInfo("America/New_York")
    for order in (1, -1):
        for history in PLAN_HISTORIES.values():
            await deliver(billing, *history[::order])
        async with billing.db.unit_of_work() as uow:
            versions, rows = await _history(uow.session, "alpha", "p1", "CarePlan")
        facts = {}
        for name, history in PLAN_HISTORIES.items():
            pid = history[0].data["carePlan"].split("/")[1]
            projected = judged.care_plan_fact(judged.Known(pid, (), (), rows[pid], True), tz)
            assert judged.plan_from_versions(versions[pid], tz) == projected, (name, order)
            facts[name] = projected
        async with billing.db.unit_of_work() as uow:
            await uow.session.execute(delete(orm.care_plans))
            await uow.session.execute(delete(orm.source_versions))
            await uow.commit()
    # The histories exercise what the projection folds: kept reviews, days, completions.
    assert facts["kept-review"].last_review == date(2025, 1, 5)
    assert facts["created-instant"].created == date(2024, 6, 30)
    assert facts["period-start"].created == date(2024, 9, 1)
    assert facts["completed"].completed_on == date(2025, 2, 10)
    assert facts["completed-on"].completed_on == date(2025, 2, 9)


async def test_a_conditions_count_rebuilt_from_its_version_is_the_projections(billing):
    from ccm_billing.compliance import judged
    from ccm_billing.compliance.records import _history

    variants = [dict(), dict(chronic=False), dict(clinical="resolved"), dict(clinical=None),
                dict(clinical="recurrence"), dict(verification="entered-in-error"),
                dict(verification=None), dict(deleted=True)]
    events = []
    for n, kw in enumerate(variants):
        deleted = kw.pop("deleted", False)
        e = condition("alpha", "p1", f"v{n}", **kw)
        e.data["deleted"] = deleted
        events.append(e)
    await deliver(billing, *events)
    async with billing.db.unit_of_work() as uow:
        versions, rows = await _history(uow.session, "alpha", "p1", "Condition")
    verdicts = {}
    month, tz = Month(2025, 2), ZoneInfo("America/New_York")
    for cid, row in rows.items():
        # Counted for a month by the decision's rule, from the versions as from the row.
        rebuilt = judged.condition_counts(judged.Known(cid, tuple(versions[cid]), (), None, True),
                                          month, tz)
        assert rebuilt == judged.condition_counts(judged.Known(cid, (), (), row, True), month,
                                                  tz), cid
        verdicts[cid] = rebuilt
    assert sorted(cid for cid, counts in verdicts.items() if counts) == ["v0", "v4", "v6"]
