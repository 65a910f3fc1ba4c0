"""The synthetic practice of `ccm demo`: deterministic, valid for ingest, edge cases present."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.bundle import Bundle

from ccm_shared.demo.generate import PHYSICIANS, VISIT_CODE, generate, previous_month

NOW = datetime(2026, 4, 9, 15, 0, tzinfo=UTC)
TZ = "America/New_York"


def practice(**kw):
    args = {"practice": "demo", "month": "2026-03", "timezone": TZ, "now": NOW, "seed": 7,
            "patients": 60} | kw
    return generate(**args)


def all_bundles(demo):
    return [demo.directory, *(b for _, b in demo.patient_bundles()), demo.correction_bundle()]


def resources(demo, kind=None):
    return [e["resource"] for b in all_bundles(demo) for e in b["entry"]
            if kind is None or e["resource"]["resourceType"] == kind]


def is_visit(resource):
    return (resource["resourceType"] == "Encounter"
            and resource["type"][0]["coding"][0]["code"] == VISIT_CODE)


def ccm_time(resources_):
    return [r for r in resources_ if r["resourceType"] == "Encounter" and not is_visit(r)]


def test_the_same_seed_gives_the_same_bundles_and_another_seed_others():
    assert all_bundles(practice()) == all_bundles(practice())
    assert all_bundles(practice()) != all_bundles(practice(seed=8))


def test_every_bundle_is_a_valid_r4_transaction_of_put_entries():
    demo = practice(patients=200)
    for bundle in all_bundles(demo):
        Bundle.model_validate(bundle)  # raises on any structural or datatype error
        assert bundle["type"] == "transaction"
        for e in bundle["entry"]:
            r = e["resource"]
            assert e["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
            assert len(r["id"]) <= 64
    assert sum(n for n, _ in demo.patient_bundles()) == 200


def test_ids_are_unique_within_each_bundle_and_across_first_versions():
    demo = practice(patients=200)
    first = [(r["resourceType"], r["id"]) for b in all_bundles(demo)[:-1] for e in b["entry"]
             for r in [e["resource"]]]
    assert len(first) == len(set(first))
    mbis = [i["value"] for r in resources(demo, "Patient") for i in r["identifier"]
            if i["system"].endswith("us-mbi")]
    assert len(mbis) == len(set(mbis)) == 200


def test_ccm_time_encounters_meet_ingests_rules():
    """A CCM-time Encounter needs a subject, a finished/in-error status, a CCM code, a
    PractitionerRole performer of the directory and a period with start and end."""
    demo = practice()
    roles = {r["id"] for r in resources(demo, "PractitionerRole")}
    encounters = ccm_time(resources(demo, "Encounter"))
    assert encounters
    for enc in encounters:
        assert enc["subject"]["reference"].startswith("Patient/")
        assert enc["status"] in ("finished", "entered-in-error")
        assert enc["class"]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActCode"
        assert enc["type"][0]["coding"][0]["code"] in ("99490", "99491", "99487")
        role = enc["participant"][0]["individual"]["reference"].removeprefix("PractitionerRole/")
        assert role in roles
        start = datetime.fromisoformat(enc["period"]["start"])
        end = datetime.fromisoformat(enc["period"]["end"])
        assert end > start and start.tzinfo is not None
        assert datetime.fromisoformat(enc["meta"]["lastUpdated"]) < NOW


def seconds_in_month(demo, plan):
    tz = ZoneInfo(demo.timezone)
    total = 0
    for r in ccm_time(plan.resources):
        start = datetime.fromisoformat(r["period"]["start"]).astimezone(tz)
        if f"{start.year:04d}-{start.month:02d}" == demo.month:
            total += (datetime.fromisoformat(r["period"]["end"])
                      - datetime.fromisoformat(r["period"]["start"])).seconds
    return total


def test_the_rules_edge_cases_are_present_with_their_expected_outcome():
    demo = practice()
    cases = {p.scenario: p for p in demo.edge_cases}
    assert {"staff-19m59s", "staff-20m00s", "staff-41m", "staff-85m", "physician-30-staff-25",
            "complex-59m", "complex-95m", "consent-mid-month", "consent-revoked-mid-month",
            "consent-missing", "consent-entered-in-error", "one-chronic-condition",
            "no-care-plan", "encounter-entered-in-error", "care-plan-overdue",
            "month-boundary", "initiating-visit-g0506", "initiating-visit-missing"} <= set(cases)
    assert cases["initiating-visit-g0506"].expect.codes == {"99490": 1, "G0506": 1}
    assert not any(is_visit(r) for r in cases["initiating-visit-missing"].resources)
    assert seconds_in_month(demo, cases["staff-19m59s"]) == 19 * 60 + 59
    assert seconds_in_month(demo, cases["staff-20m00s"]) == 20 * 60
    assert cases["staff-19m59s"].expect.codes == {}
    assert cases["staff-20m00s"].expect.codes == {"99490": 1}
    assert cases["staff-85m"].expect.codes == {"99490": 1, "99439": 2}
    assert not any(r["resourceType"] == "Consent" for r in cases["consent-missing"].resources)
    assert not any(r["resourceType"] == "CarePlan" for r in cases["no-care-plan"].resources)
    # later versions arrive after the first ones and are newer by meta.lastUpdated
    revoked = cases["consent-revoked-mid-month"].corrections[0]
    assert revoked["status"] == "inactive"
    original = next(r for r in cases["consent-revoked-mid-month"].resources
                    if r["resourceType"] == "Consent")
    assert original["meta"]["lastUpdated"] < revoked["meta"]["lastUpdated"]
    assert datetime.fromisoformat(revoked["meta"]["lastUpdated"]).astimezone(
        ZoneInfo(TZ)).strftime("%Y-%m-%d") == "2026-03-12"
    assert cases["encounter-entered-in-error"].corrections[0]["status"] == "entered-in-error"
    assert cases["consent-entered-in-error"].corrections[0]["status"] == "entered-in-error"


def test_the_month_boundary_is_the_practices_local_midnight():
    demo = practice()
    plan = next(p for p in demo.edge_cases if p.scenario == "month-boundary")
    tz = ZoneInfo(TZ)
    starts = sorted(datetime.fromisoformat(r["period"]["start"]) for r in ccm_time(plan.resources))
    # written in UTC: one is already April in UTC but March locally, the other the reverse
    assert [s.astimezone(UTC).month for s in starts] == [3, 4]
    assert [s.astimezone(tz).month for s in starts] == [2, 3]
    assert plan.entries_in_month == 1


def test_consent_mid_month_has_time_before_and_after_the_consent():
    demo = practice()
    plan = next(p for p in demo.edge_cases if p.scenario == "consent-mid-month")
    consent = next(r for r in plan.resources if r["resourceType"] == "Consent")
    signed = datetime.fromisoformat(consent["dateTime"])
    starts = [datetime.fromisoformat(r["period"]["start"]) for r in ccm_time(plan.resources)]
    assert signed.month == 3 and min(starts) < signed < max(starts)


def test_overdue_and_due_care_plans_are_placed_relative_to_now():
    demo = practice(patients=200)
    states = {p.care_plan for p in demo.patients}
    assert {"overdue", "due", "current", "none"} <= states
    overdue = next(p for p in demo.edge_cases if p.scenario == "care-plan-overdue")
    plan = next(r for r in overdue.resources if r["resourceType"] == "CarePlan")
    assert plan["created"] <= "2025-02-09"  # more than 12 months before 2026-04-09


def test_typical_patients_have_two_or_more_chronic_conditions_and_a_spread_of_time():
    demo = practice(patients=200)
    typical = [p for p in demo.patients if p.scenario == "typical"]
    for p in typical:
        active = [r for r in p.resources if r["resourceType"] == "Condition"
                  and r["clinicalStatus"]["coding"][0]["code"] == "active"]
        assert len(active) >= 2
    minutes = [seconds_in_month(demo, p) // 60 for p in typical]
    assert min(minutes) == 0 and max(minutes) >= 60
    assert sum(1 for m in minutes if m >= 20) > len(minutes) // 3


def test_practitioners_of_both_roles_with_emails_for_notifications():
    demo = practice()
    codes = {r["code"][0]["coding"][0]["code"] for r in resources(demo, "PractitionerRole")}
    assert {"207Q00000X", "nurse"} <= codes
    for p in resources(demo, "Practitioner"):
        assert any(t["system"] == "email" for t in p["telecom"])


def test_a_month_that_has_not_ended_or_too_few_patients_is_refused():
    with pytest.raises(ValueError, match="has not ended"):
        practice(month="2026-04")
    with pytest.raises(ValueError, match="at least"):
        practice(patients=5)
    with pytest.raises(ValueError, match="YYYY-MM"):
        practice(month="March")


def test_previous_month_is_the_calendar_month_before():
    assert previous_month(datetime(2026, 1, 3).date()) == "2025-12"
    assert previous_month(datetime(2026, 3, 31).date()) == "2026-02"


def test_every_consent_follows_its_initiating_visit_by_the_consenting_physician():
    """The office visit ends when the consent is signed (one case: a visit the month before), and
    is performed by the physician the consent names (through the physician's PractitionerRole)."""
    demo = practice(patients=200)
    role_of = {f"Practitioner/{s.id}": f"PractitionerRole/{s.role_id}" for s in PHYSICIANS}
    with_visit = 0
    for plan in demo.patients:
        consent = next((r for r in plan.resources if r["resourceType"] == "Consent"), None)
        visit = next((r for r in plan.resources if is_visit(r)), None)
        if consent is None or plan.scenario == "initiating-visit-missing":
            assert visit is None, plan.scenario
            continue
        with_visit += 1
        ended = datetime.fromisoformat(visit["period"]["end"])
        signed = datetime.fromisoformat(consent["dateTime"])
        if plan.scenario == "consent-mid-month":  # its visit was in the month before
            assert ended.month != signed.month and ended < signed
        else:
            assert ended == signed
        assert visit["status"] == "finished" and visit["class"]["code"] == "AMB"
        assert visit["participant"][0]["individual"]["reference"] == role_of[
            consent["performer"][0]["reference"]]
    assert with_visit > 190
