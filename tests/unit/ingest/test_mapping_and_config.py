"""Mapping rules (pure) and the per-practice configuration API."""

import dataclasses
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from ccm_ingest.domain.config import DEFAULT_CONFIG, ConfigInvalid
from ccm_ingest.domain.mapping import MappingContext, classify_role, map_version, reference
from ccm_ingest.domain.model import FhirRejected, SourceVersion
from ccm_shared.events import CloudEvent
from tests.support.contracts import assert_valid_event
from tests.unit.ingest.conftest import NOW as NOW_UTC
from tests.unit.ingest.conftest import counts, events, example
from tests.unit.ingest.test_fhir_api import ccm_encounter

NY = ZoneInfo("America/New_York")


APRIL_2 = datetime(2026, 4, 2, 18, 0, tzinfo=UTC)


def ctx(rtype, *, state=None, deleted=False, updated=datetime(2026, 3, 31, 23, 0, tzinfo=UTC),
        config=DEFAULT_CONFIG):
    source = SourceVersion(rtype, "x1", 2, updated, "a" * 64, updated, "ehr")
    return MappingContext(source, config, NY, state or {}, deleted)


@pytest.mark.parametrize("system,code,expected", [
    ("http://nucc.org/provider-taxonomy", "207Q00000X", "billing-practitioner"),
    ("http://nucc.org/provider-taxonomy", "363LF0000X", "billing-practitioner"),
    ("http://terminology.hl7.org/CodeSystem/practitioner-role", "nurse", "clinical-staff"),
    ("http://nucc.org/provider-taxonomy", "3747A0650X", "clinical-staff"),
    ("http://terminology.hl7.org/CodeSystem/practitioner-role", "RP", "unknown"),
    ("urn:other", "207Q00000X", "unknown"),
])
def test_role_classification_defaults(system, code, expected):
    assert classify_role([{"system": system, "code": code}], DEFAULT_CONFIG) == expected


def test_time_before_midnight_utc_counts_in_the_practice_month():
    enc = ccm_encounter(start="2026-04-01T02:30:00Z")  # 22:30 on 31 March in New York
    (event,) = map_version(enc, ctx("Encounter", updated=APRIL_2)).events
    assert event.data["serviceMonth"] == "2026-03" and event.data["serviceDate"] == "2026-03-31"


def test_entered_in_error_reverses_time_already_logged():
    mapping = map_version(ccm_encounter(status="entered-in-error"),
                          ctx("Encounter", state={"loggedMonth": "2026-03"}))
    (event,) = mapping.events
    assert event.type == "ingest.time-entry.reversed.v1"
    assert event.data["reason"] == "entered-in-error" and mapping.state == {}


def test_unfinished_encounter_never_logged_emits_nothing():
    assert map_version(ccm_encounter(status="in-progress"), ctx("Encounter")).events == []


def test_length_and_period_disagreeing_is_a_warning():
    enc = ccm_encounter(minutes=25)
    enc["period"]["end"] = "2026-03-01T03:30:00Z"  # 60 minutes
    mapping = map_version(enc, ctx("Encounter"))
    assert mapping.events[0].data["seconds"] == 1500 and mapping.warnings


def test_length_in_unknown_unit_is_refused():
    enc = ccm_encounter()
    enc["length"]["code"] = "wk"
    with pytest.raises(FhirRejected) as exc:
        map_version(enc, ctx("Encounter"))
    assert exc.value.issues[0].expression == ("Encounter.length.code",)


def test_revoked_consent_is_effective_until_the_end_of_the_practice_month():
    consent = {"resourceType": "Consent", "status": "inactive",
               "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                               "consentscope", "code": "treatment"}]},
               "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
               "patient": {"reference": "Patient/p1"}}
    # 2026-04-01T01:00Z is still 31 March in New York.
    (event,) = map_version(consent, ctx("Consent", updated=datetime(2026, 4, 1, 1, 0,
                                                                     tzinfo=UTC))).events
    assert event.type == "ingest.consent.revoked.v1"
    assert event.data["effectiveUntil"] == "2026-03-31"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"ccm_codes": []}, "unknown setting"),
    ({"ccm_time_codes": ["99490"]}, "system\\|code"),
    ({"care_plan_intents": ["bogus"]}, "no CarePlan intent"),
    ({"care_plan_intents": ["plan|x"]}, "no CarePlan intent"),
    ({"ccm_time_codes": ["urn:a|b*c"]}, "may only end"),
    ({"ccm_time_codes": ["urn:a|*"]}, "may only end"),
    ({"length_tolerance_seconds": 99999999999999999999}, "0 to 86400"),
    ({"length_tolerance_seconds": -1}, "0 to 86400"),
    ({"facility_classes": ["INPATIENT"]}, "no Encounter.class"),
    ({"non_clinical_roles": ["http://terminology.hl7.org/CodeSystem/practitioner-role|nurse"]},
     "in both clinical_staff_roles and non_clinical_roles"),
])
def test_config_overrides_are_checked(overrides, message):
    with pytest.raises(ConfigInvalid, match=message):
        DEFAULT_CONFIG.merged(overrides)


def test_good_overrides_are_taken():
    merged = DEFAULT_CONFIG.merged({"care_plan_intents": ["plan", "proposal"],
                                    "ccm_time_codes": ["urn:a|99*"],
                                    "length_tolerance_seconds": 86400})
    assert merged.care_plan_intents == ("plan", "proposal")


async def test_practice_override_of_ccm_time_codes_applies_to_later_versions(fhir):
    local = {"ccm_time_codes": ["urn:local|CCM"]}
    r = await fhir.put("/v1/practices/alpha/ingest-config", json=local)
    assert r.status_code == 200 and r.json()["effective"]["ccm_time_codes"] == ["urn:local|CCM"]
    assert (await fhir.get("/v1/practices/alpha/ingest-config")).json()["overrides"] == local
    await fhir.put("/fhir/Encounter/e1", json=ccm_encounter())  # CPT 99490: no longer CCM here
    enc = ccm_encounter("e2")
    enc["type"] = [{"coding": [{"system": "urn:local", "code": "CCM"}]}]
    await fhir.put("/fhir/Encounter/e2", json=enc)
    logged = await events(fhir, "ingest.time-entry.logged.v1")
    assert [e["data"]["entry"] for e in logged] == ["Encounter/e2"]
    bad = await fhir.put("/v1/practices/alpha/ingest-config", json={"nope": 1})
    assert bad.status_code == 422
    other = await fhir.get("/v1/practices/beta/ingest-config")
    assert other.status_code == 404


def visit_encounter(rid="v1", status="finished", code=("http://www.ama-assn.org/go/cpt", "99214"),
                    start="2026-04-01T02:30:00Z"):
    enc = {
        "resourceType": "Encounter", "id": rid, "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": code[0], "code": code[1]}]}],
        "subject": {"reference": "Patient/p1"},
        "participant": [{"individual": {"reference": "Practitioner/doc"}}],
    }
    if start:
        enc["period"] = {"start": start}
    return enc


@pytest.mark.parametrize("code", [
    ("http://www.ama-assn.org/go/cpt", "99212"), ("http://www.ama-assn.org/go/cpt", "99215"),
    ("http://www.ama-assn.org/go/cpt", "99495"),
    ("http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "G0438"),
    ("http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "G0402"),
])
def test_a_finished_qualifying_visit_is_recorded_on_its_day_in_the_practice_zone(code):
    mapping = map_version(visit_encounter(code=code), ctx("Encounter"))
    (event,) = mapping.events
    assert event.type == "ingest.visit.recorded.v1" and event.subject == "Patient/p1"
    assert event.data["date"] == "2026-03-31"  # 22:30 on 31 March in New York
    assert event.data["codes"] == [code[1]] and event.data["visit"] == "Encounter/x1"
    assert event.data["performers"][0]["practitioner"] == "Practitioner/doc"
    assert mapping.state == {"visitDate": "2026-03-31", "visitPatient": "Patient/p1"}


@pytest.mark.parametrize("status,reason", [
    ("entered-in-error", "entered-in-error"), ("cancelled", "cancelled"),
    ("in-progress", "not-a-visit")])
def test_a_recorded_visit_that_stops_being_one_is_reversed(status, reason):
    mapping = map_version(visit_encounter(status=status),
                          ctx("Encounter", state={"visitDate": "2026-03-31",
                                                  "visitPatient": "Patient/p1"}))
    (event,) = mapping.events
    assert event.type == "ingest.visit.reversed.v1"
    assert event.data["reason"] == reason and event.data["date"] == "2026-03-31"
    assert mapping.state == {}


def test_other_encounters_are_no_visit_and_a_visit_without_a_start_is_a_warning():
    assert map_version(visit_encounter(code=("http://www.ama-assn.org/go/cpt", "99203")),
                       ctx("Encounter")).events == []
    assert map_version(visit_encounter(status="planned"), ctx("Encounter")).events == []
    undated = map_version(visit_encounter(start=None), ctx("Encounter"))
    assert undated.events == [] and undated.warnings and undated.state == {}
    for partial in ("2026", "2026-03"):  # a year or a month is no visit date (not its first day)
        by_month = map_version(visit_encounter(start=partial), ctx("Encounter"))
        assert by_month.events == [] and by_month.warnings and by_month.state == {}
    deleted = map_version(visit_encounter(), ctx("Encounter", state={"visitDate": "2026-03-02"},
                                                 deleted=True))
    assert [(e.type, e.data["reason"]) for e in deleted.events] == [
        ("ingest.visit.reversed.v1", "deleted")]


def test_a_visit_that_changes_patient_is_reversed_for_the_patient_it_was_recorded_for():
    recorded = {"visitDate": "2026-03-31", "visitPatient": "Patient/p1"}
    moved = visit_encounter()
    moved["subject"] = {"reference": "Patient/p2"}
    mapping = map_version(moved, ctx("Encounter", state=recorded))
    assert [(e.type, e.subject) for e in mapping.events] == [
        ("ingest.visit.reversed.v1", "Patient/p1"), ("ingest.visit.recorded.v1", "Patient/p2")]
    assert mapping.state["visitPatient"] == "Patient/p2"
    grouped = visit_encounter()
    grouped["subject"] = {"reference": "Group/g1"}
    (event,) = map_version(grouped, ctx("Encounter", state=recorded)).events
    assert (event.type, event.subject, event.data["reason"]) == (
        "ingest.visit.reversed.v1", "Patient/p1", "not-a-visit")


def test_a_visit_whose_start_python_cannot_read_is_a_warning_not_an_error():
    mapping = map_version(visit_encounter(start="2016-12-31T23:59:60Z"), ctx("Encounter"))
    assert mapping.events == [] and mapping.warnings


def test_an_encounter_can_be_ccm_time_and_a_visit_each_with_its_own_state():
    enc = ccm_encounter()
    enc["type"].append({"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]})
    mapping = map_version(enc, ctx("Encounter"))
    assert [e.type for e in mapping.events] == ["ingest.time-entry.logged.v1",
                                                "ingest.visit.recorded.v1"]
    assert mapping.state == {"loggedMonth": "2026-02", "loggedPatient": "Patient/p1",
                             "visitDate": "2026-02-28", "visitPatient": "Patient/p1"}
    again = map_version({**enc, "status": "entered-in-error"},
                        ctx("Encounter", state=mapping.state))
    assert sorted(e.type for e in again.events) == ["ingest.time-entry.reversed.v1",
                                                    "ingest.visit.reversed.v1"]
    assert again.state == {}


async def test_visits_pushed_to_the_api_are_recorded_and_follow_their_contract(fhir):
    r = await fhir.put("/fhir/Encounter/v1", json=visit_encounter())
    assert r.status_code == 201, r.text
    await fhir.put("/fhir/Encounter/v1", json=visit_encounter(status="entered-in-error"))
    recorded = await events(fhir, "ingest.visit.recorded.v1")
    reversed_ = await events(fhir, "ingest.visit.reversed.v1")
    assert [e["data"]["date"] for e in recorded] == ["2026-03-31"]
    assert [e["data"]["reason"] for e in reversed_] == ["entered-in-error"]
    assert recorded[0]["subject"] == "Patient/p1"
    assert recorded[0]["sequence"] < reversed_[0]["sequence"]


CCM_CONSENT = {
    "resourceType": "Consent", "id": "cs1", "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                          "code": "treatment"}]},
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    "patient": {"reference": "Patient/p1"}, "dateTime": "2026-02-27T15:04:00-05:00",
    "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                               "code": "OPTIN"}]},
    "provision": {"type": "permit", "period": {"start": "2026-02-27"}},
}
CCM_CARE_PLAN = {
    "resourceType": "CarePlan", "id": "cp1", "status": "active", "intent": "plan",
    "category": [{"coding": [{"system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                              "code": "assess-plan"}]}],
    "subject": {"reference": "Patient/p1"}, "created": "2026-02-27",
}
OTHER_CATEGORY = [{"coding": [{"system": "http://example.org", "code": "other"}]}]


async def test_a_consent_that_stops_being_ccm_is_voided_and_granted_again_when_it_is(fhir):
    await fhir.put("/fhir/Consent/cs1", json=CCM_CONSENT)
    await fhir.put("/fhir/Consent/cs1", json={**CCM_CONSENT, "category": OTHER_CATEGORY})
    await fhir.put("/fhir/Consent/cs1", json={**CCM_CONSENT, "dateTime": "2026-02-28"})
    kinds = [(e["type"].split(".")[2], e["data"]["status"], e["data"]["patient"])
             for e in await events(fhir) if e["type"].startswith("ingest.consent.")]
    assert kinds == [("granted", "active", "Patient/p1"),
                     ("voided", "entered-in-error", "Patient/p1"),
                     ("granted", "active", "Patient/p1")]
    for event in await events(fhir):
        assert_valid_event(event)


@pytest.mark.parametrize("change", [{"category": OTHER_CATEGORY}, {"intent": "proposal"},
                                    {"subject": {"reference": "Group/g1"}}])
async def test_a_care_plan_that_stops_being_ccm_is_closed_for_its_patient(fhir, change):
    await fhir.put("/fhir/CarePlan/cp1", json=CCM_CARE_PLAN)
    await fhir.put("/fhir/CarePlan/cp1", json={**CCM_CARE_PLAN, **change})
    plans = [(e["type"].split(".")[2], e["data"]["status"], e["data"]["patient"])
             for e in await events(fhir) if e["type"].startswith("ingest.care-plan.")]
    assert plans == [("created", "active", "Patient/p1"),
                     ("closed", "entered-in-error", "Patient/p1")]
    for event in await events(fhir):
        assert_valid_event(event)
    await fhir.put("/fhir/CarePlan/cp1", json={**CCM_CARE_PLAN, **change, "status": "completed"})
    assert len(await events(fhir)) == 2  # nothing more to close


def test_time_moved_to_another_month_is_reversed_as_moved_then_logged():
    mapping = map_version(ccm_encounter(start="2026-04-02T14:00:00Z"),
                          ctx("Encounter", state={"loggedMonth": "2026-03"}, updated=APRIL_2))
    assert [(e.type, e.data.get("reason"), e.data["serviceMonth"]) for e in mapping.events] == [
        ("ingest.time-entry.reversed.v1", "moved", "2026-03"),
        ("ingest.time-entry.logged.v1", None, "2026-04")]


async def stored_overrides(fhir, stored: dict) -> dict:  # noqa: ANN001
    """Practice alpha's overrides stored as they are (no check, as an earlier release saved
    them); a CCM consent in the practice's own category ``urn:practice:cat|ccm``."""
    from ccm_ingest.adapters.repository import SqlResourceRepository

    async with fhir.runtime.db.unit_of_work() as uow:
        await SqlResourceRepository(uow.session, "alpha").save_config(stored, fhir.clock.now)
        await uow.commit()
    fhir.runtime.state["practice_cache"].forget("alpha")
    return {**CCM_CONSENT, "category": [{"coding": [{"system": "urn:practice:cat",
                                                     "code": "ccm"}]}]}


async def test_overrides_stored_before_a_check_was_added_keep_applying(fhir):
    """Overrides saved when they were allowed (here a tolerance over a day) keep their effect:
    the practice's own consent category stays CCM; the config API says what to fix."""
    consent = await stored_overrides(fhir, {"consent_categories": ["urn:practice:cat|ccm"],
                                            "length_tolerance_seconds": 172800})
    await fhir.put("/fhir/Consent/cs1", json=consent)
    await fhir.put("/fhir/Consent/cs1", json={**consent, "dateTime": "2026-02-28"})
    assert [e["type"] for e in await events(fhir) if e["type"].startswith("ingest.consent")] \
        == ["ingest.consent.granted.v1"] * 2
    shown = (await fhir.get("/v1/practices/alpha/ingest-config")).json()
    assert shown["effective"]["length_tolerance_seconds"] == 172800
    assert "0 to 86400" in shown["problem"]


async def test_a_stored_key_ingest_cannot_use_costs_that_key_only(fhir):
    """A key a later release no longer knows (or a value it cannot read) is left out with its
    default; the practice's other overrides (its consent category) still apply."""
    consent = await stored_overrides(fhir, {
        "consent_categories": ["urn:practice:cat|ccm"], "retired_setting": ["a|b"],
        "facility_classes": ["NOT-A-CLASS"], "consent_expiring_lead_days": 0})
    await fhir.put("/fhir/Consent/cs1", json=consent)
    assert [e["type"] for e in await events(fhir) if e["type"].startswith("ingest.consent")] \
        == ["ingest.consent.granted.v1"]
    shown = (await fhir.get("/v1/practices/alpha/ingest-config")).json()
    assert shown["effective"]["consent_categories"] == ["urn:practice:cat|ccm"]
    assert shown["effective"]["consent_expiring_lead_days"] == 0
    assert shown["effective"]["facility_classes"] == shown["defaults"]["facility_classes"]
    assert "retired_setting" not in shown["effective"]
    assert "'retired_setting'" in shown["problem"] and "'NOT-A-CLASS'" in shown["problem"]
    assert shown["problem"].endswith("ingest uses the default for these keys until fixed")


@pytest.mark.parametrize(("ref", "local_bases", "expected"), [
    ("Patient/p1", (), "Patient/p1"),
    ("Patient/p1/_history/3", (), "Patient/p1"),
    ("https://other.example/fhir/Patient/p1", (), None),  # another server's patient
    ("https://other.example/fhir/Patient/p1", ("https://ccm.example/fhir",), None),
    ("https://ccm.example/fhir/Patient/p1", ("https://ccm.example/fhir",), "Patient/p1"),
    ("https://CCM.example/fhir/Patient/p1", ("https://ccm.example/fhir",), "Patient/p1"),
    ("https://ccm.example/FHIR/Patient/p1", ("https://ccm.example/fhir",), None),  # paths: case
    ("http://ccm.example:80/fhir/Patient/p1", ("http://ccm.example/fhir",), "Patient/p1"),
    ("https://ccm.example/fhir/Patient/p1", ("http://ccm.example/fhir",), "Patient/p1"),  # TLS
    ("https://ccm.example:8443/fhir/Patient/p1", ("https://ccm.example/fhir",), None),
    ("https://ccm.example/fhir/x/Patient/p1", ("https://ccm.example/fhir",), None),
    ("https://ccm.example/fhir/https://evil/fhir/Patient/p1", ("https://ccm.example/fhir",),
     None),
    ("https://ccm.example/fhir/Patient/p1", ("https://ccm.example/fhir/",), "Patient/p1"),
    ("https://ccm.example/fhir2/Patient/p1", ("https://ccm.example/fhir",), None),
    ("https://ccm.example/Patient/p1", ("https://ccm.example/fhir",), None),
    ("https://ccm.example/fhir/Patient/p1", ("http://in.cluster/fhir", "https://ccm.example/fhir"),
     "Patient/p1"),
    ("urn:uuid:0d3b8f3c-8d39-4c4e-a0c3-3f5b7d3f1d11", ("https://ccm.example/fhir",), None),
    ("Patient?identifier=x|1", (), None),
])
def test_an_absolute_reference_is_this_servers_only_under_a_local_base(ref, local_bases,
                                                                       expected):
    assert reference({"reference": ref}, ("Patient",), local_bases) == expected


def test_time_for_another_servers_patient_is_not_counted_for_the_local_one():
    """An Encounter whose subject is https://other.example/fhir/Patient/p1 is about a patient
    of another server, not this practice's Patient/p1: no CCM time for p1."""
    enc = ccm_encounter()
    enc["subject"] = {"reference": "https://other.example/fhir/Patient/p1"}
    with pytest.raises(FhirRejected, match="another server's patient") as refused:
        map_version(enc, ctx("Encounter"))
    assert refused.value.issues[0].expression == ("Encounter.subject",)
    enc["type"] = [{"text": "not CCM time"}]  # stored, about nobody of this practice
    assert map_version(enc, ctx("Encounter")).events == []
    enc = ccm_encounter()
    local = dataclasses.replace(ctx("Encounter"), local_bases=("https://ccm.example/fhir",))
    enc["subject"] = {"reference": "https://ccm.example/fhir/Patient/p1"}
    (event,) = map_version(enc, local).events
    assert event.subject == "Patient/p1" and event.data["patient"] == "Patient/p1"


async def test_absolute_references_through_the_api_local_by_the_base_the_request_came_to(fhir):
    other = {**ccm_encounter("e-other"),
             "subject": {"reference": "https://other.example/fhir/Patient/p1"}}
    mine = {**ccm_encounter("e-mine"), "subject": {"reference": "http://test/fhir/Patient/p1"}}
    before = await counts(fhir)
    r = await fhir.put("/fhir/Encounter/e-other", json=other)
    assert r.status_code == 422 and "another server's patient" in r.text
    assert await counts(fhir) == before
    other["type"] = [{"text": "not CCM time"}]
    for enc in (other, mine):
        r = await fhir.put(f"/fhir/Encounter/{enc['id']}", json=enc)
        assert r.status_code == 201, r.text
    logged = await events(fhir, "ingest.time-entry.logged.v1")
    assert [e["data"]["entry"] for e in logged] == ["Encounter/e-mine"]
    assert logged[0]["data"]["patient"] == "Patient/p1"

    async def found(patient: str) -> list[str]:
        r = await fhir.get("/fhir/Encounter", params={"patient": patient})
        assert r.status_code == 200, r.text
        return [e["resource"]["id"] for e in r.json().get("entry", [])]

    assert await found("p1") == ["e-mine"]
    assert await found("http://test/fhir/Patient/p1") == ["e-mine"]
    assert await found("https://other.example/fhir/Patient/p1") == []
    # Under another Host the same URL is another server's.
    r = await fhir.get("/fhir/Encounter", params={"patient": "http://test/fhir/Patient/p1"},
                       headers={"Host": "elsewhere.example"})
    assert r.status_code == 200 and r.json()["total"] == 0


# ---- found by a review of the mapping against fhir-mapping.md and the billing rules -----------

CCM_CONSENT_RES = {
    "resourceType": "Consent", "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                          "code": "treatment"}]},
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    "patient": {"reference": "Patient/p1"}, "dateTime": "2026-01-05"}


def consent_versions(*steps):
    """(status, lastUpdated) steps through the mapping, each on the state the one before left;
    the events' (type, status, effectiveUntil)."""
    state, seen = {}, []
    for status, updated in steps:
        mapping = map_version({**CCM_CONSENT_RES, "status": status},
                              ctx("Consent", state=state, updated=updated))
        state = mapping.state
        seen += [(e.type.split(".")[2], e.data["status"], e.data["effectiveUntil"])
                 for e in mapping.events]
    return seen


def test_a_revocation_stays_effective_from_the_month_it_happened_in():
    """A later edit of a revoked consent (a scan attached in June) does not move the end of
    its effect from March to June: billing would count April to June."""
    assert consent_versions(
        ("active", datetime(2026, 1, 10, 15, tzinfo=UTC)),
        ("inactive", datetime(2026, 3, 12, 15, tzinfo=UTC)),
        ("inactive", datetime(2026, 6, 20, 15, tzinfo=UTC)),
        ("active", datetime(2026, 7, 2, 15, tzinfo=UTC)),
        ("inactive", datetime(2026, 9, 2, 15, tzinfo=UTC)),
    ) == [("granted", "active", None), ("revoked", "inactive", "2026-03-31"),
          ("revoked", "inactive", "2026-03-31"), ("granted", "active", None),
          ("revoked", "inactive", "2026-09-30")]


@pytest.mark.parametrize("status", ["draft", "proposed"])
def test_a_granted_consent_set_back_to_draft_or_proposed_is_revoked(status):
    assert consent_versions(
        ("active", datetime(2026, 1, 10, 15, tzinfo=UTC)),
        (status, datetime(2026, 3, 12, 15, tzinfo=UTC)),
    ) == [("granted", "active", None), ("revoked", status, "2026-03-31")]
    # Never granted: a draft is nothing yet.
    assert consent_versions((status, datetime(2026, 3, 12, 15, tzinfo=UTC))) == []


@pytest.mark.parametrize("subject", [None, {"reference": "Group/g1"},
                                     {"reference": "https://other.example/fhir/Patient/p1"}])
def test_time_is_reversed_for_the_patient_it_was_logged_for_when_the_subject_goes(subject):
    logged = map_version(ccm_encounter(), ctx("Encounter"))
    enc = {**ccm_encounter(status="entered-in-error"), "subject": subject}
    if subject is None:
        del enc["subject"]
    (event,) = map_version(enc, ctx("Encounter", state=logged.state)).events
    assert event.type == "ingest.time-entry.reversed.v1"
    assert event.subject == event.data["patient"] == "Patient/p1"


def test_time_moved_to_another_patient_is_reversed_for_the_one_it_left():
    logged = map_version(ccm_encounter(), ctx("Encounter"))
    moved = map_version({**ccm_encounter(), "subject": {"reference": "Patient/p2"}},
                        ctx("Encounter", state=logged.state))
    assert [(e.type, e.data["patient"], e.data.get("reason")) for e in moved.events] == [
        ("ingest.time-entry.reversed.v1", "Patient/p1", "moved"),
        ("ingest.time-entry.logged.v1", "Patient/p2", None)]


@pytest.mark.parametrize(("value", "code", "seconds"), [
    (19.995, "min", 1199),      # 1199.7 s: not 20 minutes
    (0.3333, "h", 1199),        # 1199.88 s
    (1199.6, "s", 1199),
    (4.35, "min", 261),         # 261 s exactly (a float product is 260.99999999999997)
    (20, "min", 1200),
    (0.5, "s", 0),              # under a second: nothing to count (refused below)
])
def test_length_is_cut_to_whole_seconds_never_rounded_up(value, code, seconds):
    enc = ccm_encounter()
    enc["length"] = {"value": value, "unit": code, "system": "http://unitsofmeasure.org",
                     "code": code}
    if seconds == 0:
        with pytest.raises(FhirRejected, match="at least a second"):
            map_version(enc, ctx("Encounter"))
        return
    (event,) = map_version(enc, ctx("Encounter")).events
    assert event.data["seconds"] == seconds


def test_a_period_of_no_time_is_refused_as_a_zero_length_is():
    enc = {k: v for k, v in ccm_encounter().items() if k != "length"}
    enc["period"] = {"start": "2026-03-12T10:00:00-04:00", "end": "2026-03-12T10:00:00-04:00"}
    with pytest.raises(FhirRejected, match="at least a second") as refused:
        map_version(enc, ctx("Encounter"))
    assert refused.value.issues[0].expression == ("Encounter.period",)


def test_the_length_period_warning_reaches_billing_as_its_identifier():
    enc = ccm_encounter(minutes=25)
    enc["period"]["end"] = "2026-03-01T03:30:00Z"  # 60 minutes
    mapping = map_version(enc, ctx("Encounter"))
    assert mapping.events[0].data["warnings"] == ["time-length-period-mismatch"]
    # the response says it in words, at the element
    assert "disagree" in mapping.warnings[0].diagnostics
    assert mapping.warnings[0].expression == ("Encounter.length",)


def test_a_role_is_classified_by_its_code_and_by_its_specialty_only_without_one():
    def role(code, specialty):
        res = {"resourceType": "PractitionerRole",
               "code": [{"coding": [code]}] if code else [],
               "specialty": [{"coding": [specialty]}]}
        (event,) = map_version(res, ctx("PractitionerRole")).events
        return event.data["classification"]

    nurse = {"system": "http://terminology.hl7.org/CodeSystem/practitioner-role",
             "code": "nurse"}
    internist = {"system": "http://nucc.org/provider-taxonomy", "code": "207R00000X"}
    assert role(nurse, internist) == "clinical-staff"
    assert role(None, internist) == "billing-practitioner"


def test_a_condition_whose_subject_goes_no_longer_counts_for_its_patient():
    condition = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
                 "clinicalStatus": {"coding": [{"code": "active"}]},
                 "category": [{"coding": [{
                     "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                     "code": "problem-list-item"}]}]}
    first = map_version(condition, ctx("Condition"))
    assert first.events[0].data["chronic"] is True
    gone = map_version({**condition, "subject": {"reference": "Group/g1"}},
                       ctx("Condition", state=first.state))
    (event,) = gone.events
    assert (event.data["patient"], event.data["chronic"]) == ("Patient/p1", False)
    assert gone.state == {}
    assert map_version(condition, ctx("Condition", state=gone.state)).events[0].data[
        "chronic"] is True


async def test_a_deletion_and_a_re_creation_sort_after_what_they_follow(fhir):
    """Consumers order a resource's events by source lastUpdated: a deletion after a version
    sent 4 minutes ahead of the server's clock (allowed skew), and a re-creation sent with an
    older time than the deletion (within the allowed clock difference of it: one dated before
    it by more is kept in history, test_fhir_api), must still come after it; else billing
    drops the reversal (the deleted time keeps counting) or the re-created time."""
    from datetime import timedelta

    ahead = (NOW_UTC + timedelta(minutes=4)).isoformat()
    enc = {**ccm_encounter("e-skew"), "meta": {"lastUpdated": ahead}}
    assert (await fhir.put("/fhir/Encounter/e-skew", json=enc)).status_code == 201
    assert (await fhir.delete("/fhir/Encounter/e-skew")).status_code == 204
    fhir.clock.now = NOW_UTC + timedelta(minutes=1)
    behind = {**ccm_encounter("e-skew", minutes=30),
              "meta": {"lastUpdated": (NOW_UTC - timedelta(seconds=30)).isoformat()}}
    assert (await fhir.put("/fhir/Encounter/e-skew", json=behind)).status_code == 201
    times = [(e["type"].split(".")[2], datetime.fromisoformat(e["data"]["source"]["lastUpdated"]))
             for e in await events(fhir) if e["type"].startswith("ingest.time-entry")]
    assert [t for t, _ in times] == ["logged", "reversed", "logged"]
    assert times[0][1] < times[1][1] < times[2][1]


NUCC_PHYSICIAN = {"system": "http://nucc.org/provider-taxonomy", "code": "207Q00000X"}


async def test_a_practitioners_qualification_classifies_time_without_a_role(fhir):
    """fhir-mapping.md: staff type from PractitionerRole.code or Practitioner.qualification. A
    practice that sends no PractitionerRoles still has its physician's time classified."""
    doctor = {"resourceType": "Practitioner", "id": "d1",
              "qualification": [{"code": {"coding": [NUCC_PHYSICIAN]}}]}
    assert (await fhir.put("/fhir/Practitioner/d1", json=doctor)).status_code == 201
    enc = {**ccm_encounter("e-q"), "participant": [
        {"individual": {"reference": "Practitioner/someone-else"}},
        {"type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                         "v3-ParticipationType", "code": "PPRF"}]}],
         "individual": {"reference": "Practitioner/d1"}}]}
    assert (await fhir.put("/fhir/Encounter/e-q", json=enc)).status_code == 201
    (logged,) = await events(fhir, "ingest.time-entry.logged.v1")
    first, second = logged["data"]["performers"]
    # The primary performer (PPRF) first: billing takes the first performer's role.
    assert first["practitioner"] == "Practitioner/d1"
    assert first["roleCodes"] == [{**NUCC_PHYSICIAN, "display": None}]
    assert first["classification"] == "billing-practitioner"
    assert second == {"practitioner": "Practitioner/someone-else", "practitionerRole": None,
                      "roleCodes": [], "classification": "unknown"}
    assert_valid_event(logged)


def test_a_performers_kind_follows_the_practices_role_lists():
    """The classification sent with each performer uses the practice's lists, which billing
    cannot know (a medical assistant moved to non_clinical_roles, a local RN code)."""
    own = DEFAULT_CONFIG.merged({
        "clinical_staff_roles": ["urn:local|RN"],
        "non_clinical_roles": ["http://nucc.org/provider-taxonomy|3747*"]})
    ma = {"resourceType": "Practitioner", "qualification": [{"code": {"coding": [
        {"system": "http://nucc.org/provider-taxonomy", "code": "3747A0650X"}]}}]}
    rn = {"resourceType": "Practitioner", "qualification": [{"code": {"coding": [
        {"system": "urn:local", "code": "RN"}]}}]}
    enc = {**ccm_encounter(), "participant": [{"individual": {"reference": "Practitioner/ma"}},
                                              {"individual": {"reference": "Practitioner/rn"}}]}
    context = dataclasses.replace(ctx("Encounter", config=own),
                                  practitioners={"ma": ma, "rn": rn})
    (event,) = map_version(enc, context).events
    assert [p["classification"] for p in event.data["performers"]] == ["non-clinical",
                                                                        "clinical-staff"]


async def test_a_deletion_through_another_host_still_ends_what_the_resource_counted(fhir):
    """Resources written with absolute references under one Host and deleted through another
    (where those references are another server's): the deletion still voids the consent,
    closes the care plan, reverses the time and uncounts the Condition, for Patient/p1."""
    a = {"Host": "a.example"}
    p1 = {"reference": "http://a.example/fhir/Patient/p1"}
    condition = {**example("Condition/r4spec-example.json"), "id": "cd1", "subject": p1}
    for path, body in [("Consent/cs1", {**CCM_CONSENT, "patient": p1}),
                       ("CarePlan/cp1", {**CCM_CARE_PLAN, "subject": p1}),
                       ("Encounter/e1", {**ccm_encounter("e1"), "subject": p1}),
                       ("Condition/cd1", condition)]:
        r = await fhir.put(f"/fhir/{path}", json=body, headers=a)
        assert r.status_code == 201, r.text
    written = len(await events(fhir))
    for path in ("Consent/cs1", "CarePlan/cp1", "Encounter/e1", "Condition/cd1"):
        r = await fhir.delete(f"/fhir/{path}", headers={"Host": "b.example"})
        assert r.status_code == 204, r.text
    ended = [(e["type"].split(".", 1)[1], e["data"]["patient"])
             for e in (await events(fhir))[written:]]
    assert ended == [("consent.voided.v1", "Patient/p1"), ("care-plan.closed.v1", "Patient/p1"),
                     ("time-entry.reversed.v1", "Patient/p1"),
                     ("condition.upserted.v1", "Patient/p1")]


async def test_a_ccm_care_plan_for_another_servers_patient_is_refused(fhir):
    other = {**CCM_CARE_PLAN, "subject": {"reference": "https://other.example/fhir/Patient/p1"}}
    r = await fhir.put("/fhir/CarePlan/cp1", json=other)
    assert r.status_code == 422 and "another server's patient" in r.text
    assert r.json()["issue"][0]["expression"] == ["CarePlan.subject"]
    r = await fhir.put("/fhir/CarePlan/cp1", json={**other, "category": OTHER_CATEGORY})
    assert r.status_code == 201  # not CCM: stored, about nobody here



def test_facility_classes_are_a_practice_setting():
    """By default an emergency-class Encounter logs no CCM time; a practice that records its
    CCM calls with another class list decides for itself."""
    er = {**ccm_encounter(), "class": {**ccm_encounter()["class"], "code": "EMER"}}
    assert map_version(er, ctx("Encounter")).events == []
    own = DEFAULT_CONFIG.merged({"facility_classes": ["IMP", "ACUTE"]})
    (event,) = map_version(er, ctx("Encounter", config=own)).events
    assert event.type == "ingest.time-entry.logged.v1"



def test_a_performer_listed_twice_is_one_performer_where_it_ranks_highest():
    pprf = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                         "code": "PPRF"}]}]
    enc = {**ccm_encounter(), "participant": [
        {"individual": {"reference": "Practitioner/md"}},
        {"individual": {"reference": "Practitioner/rn"}},
        {"type": pprf, "individual": {"reference": "Practitioner/md"}}]}
    (event,) = map_version(enc, ctx("Encounter")).events
    assert [p["practitioner"] for p in event.data["performers"]] == ["Practitioner/md",
                                                                      "Practitioner/rn"]



def test_a_completed_care_plan_keeps_the_day_it_was_completed():
    plan = {**CCM_CARE_PLAN, "status": "completed"}
    seen, state = [], {}
    for status, day in (("completed", 10), ("completed", 20), ("active", 25), ("completed", 28)):
        mapping = map_version({**plan, "status": status}, ctx(
            "CarePlan", state=state, updated=datetime(2026, 3, day, 15, tzinfo=UTC)))
        state = mapping.state
        seen.append(mapping.events[0].data["completedOn"])
    assert seen == ["2026-03-10", "2026-03-10", None, "2026-03-28"]


PPRF_TYPE = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                          "code": "PPRF"}]}]


@pytest.mark.parametrize("participant_type, first", [
    (PPRF_TYPE, "Practitioner/rn"),
    ([{"coding": [{"system": "http://hl7.org/fhir/v3/ParticipationType", "code": "PPRF"}]}],
     "Practitioner/rn"),  # v3's address before R4, which STU3 EHRs still send
    ([{"coding": [{"code": "PPRF"}]}], "Practitioner/md"),  # no system: not v3's PPRF
    ([{"coding": [{"system": "urn:local:roles", "code": "PPRF"}]}], "Practitioner/md"),
])
def test_only_v3_participation_type_pprf_marks_the_primary_performer(participant_type, first):
    """Billing classifies the time by the first performer; a local code that happens to read
    PPRF must not move a nurse ahead of the physician listed first."""
    enc = {**ccm_encounter(), "participant": [
        {"individual": {"reference": "Practitioner/md"}},
        {"type": participant_type, "individual": {"reference": "Practitioner/rn"}}]}
    (event,) = map_version(enc, ctx("Encounter")).events
    assert event.data["performers"][0]["practitioner"] == first


@pytest.mark.parametrize("individual", [
    {"reference": "https://other.example/fhir/Practitioner/md"},  # another server's
    {"reference": "#md"},  # contained
    {"display": "Dr. Someone"},  # named, not referenced
    None,  # no one named
])
def test_an_unidentified_primary_performer_holds_the_time_instead_of_the_next_one(individual):
    """The primary performer is who the time belongs to. When it is no Practitioner or
    PractitionerRole of this server, the time used to be classified by the next participant (a
    physician's 20 minutes billed as clinical-staff time, or the reverse); now the first
    performer is unidentified (billing: staff-role-unknown) and the write says why."""
    primary = {"type": PPRF_TYPE, **({"individual": individual} if individual else {})}
    enc = {**ccm_encounter(), "participant": [
        primary, {"individual": {"reference": "Practitioner/rn"}}]}
    context = dataclasses.replace(ctx("Encounter"), practitioners={"rn": {
        "resourceType": "Practitioner", "qualification": [{"code": {"coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v2-0360", "code": "RN"}]}}]}})
    mapping = map_version(enc, context)
    (event,) = mapping.events
    first, second = event.data["performers"]
    assert first == {"practitioner": None, "practitionerRole": None, "roleCodes": [],
                     "classification": "unknown"}
    assert second["practitioner"] == "Practitioner/rn"
    assert event.data["warnings"] == []  # not the length/period identifier
    (warning,) = mapping.warnings
    assert "participant[0]" in warning.diagnostics and "staff-role-unknown" in warning.diagnostics
    assert warning.expression == ("Encounter.participant[0].individual",)
    # Another primary performer beside it, identified, does not take the time either: whose
    # time it is cannot be told, in whichever order the two are listed.
    named = {"type": PPRF_TYPE, "individual": {"reference": "Practitioner/rn"}}
    for participants in ([primary, named], [named, primary]):
        both = map_version({**enc, "participant": participants}, context)
        assert [p["practitioner"] for p in both.events[0].data["performers"]] == [
            None, "Practitioner/rn"]
        assert len(both.warnings) == 1


async def test_an_unidentified_primary_performer_reaches_billing_as_unknown(fhir):
    enc = {**ccm_encounter("e-far"), "participant": [
        {"type": PPRF_TYPE,
         "individual": {"reference": "https://other.example/fhir/Practitioner/md"}}]}
    r = await fhir.put("/fhir/Encounter/e-far", json=enc,
                       headers={"Prefer": "return=OperationOutcome"})
    assert r.status_code == 201, r.text
    (issue,) = r.json()["issue"]
    assert issue["severity"] == "warning" and "primary performer (PPRF)" in issue["diagnostics"]
    (logged,) = await events(fhir, "ingest.time-entry.logged.v1")
    assert logged["data"]["performers"][0]["classification"] == "unknown"
    assert_valid_event(logged)


FZ_SCOPE = {"coding": [{"system": "urn:fz:scope", "code": "foo"}]}
FZ_TIME = [{"coding": [{"system": "urn:fz:time", "code": "t"}]}]
FOREIGN_P1 = {"reference": "https://other.example/fhir/Patient/p1"}
NO_PATIENT_CONSENT = {k: v for k, v in {**CCM_CONSENT, "scope": FZ_SCOPE}.items()
                      if k != "patient"}
NO_SUBJECT_ENCOUNTER = {k: v for k, v in {**ccm_encounter("e1"), "type": FZ_TIME}.items()
                        if k != "subject"}
NOW_CCM = DEFAULT_CONFIG.merged({
    "consent_scopes": [*DEFAULT_CONFIG.consent_scopes, "urn:fz:scope|foo"],
    "ccm_time_codes": [*DEFAULT_CONFIG.ccm_time_codes, "urn:fz:time|t"]})
NOT_CCM_NOW = DEFAULT_CONFIG.merged({"consent_categories": ["urn:other|c"],
                                     "care_plan_intents": ["proposal"],
                                     "ccm_time_codes": ["urn:other|c"]})
GRANTED_P1 = {"ccm": True, "patient": "Patient/p1", "granted": True}
CCM_P1 = {"ccm": True, "patient": "Patient/p1"}
LOGGED_P1 = {"loggedMonth": "2026-02", "loggedPatient": "Patient/p1"}


@pytest.mark.parametrize(("rtype", "content", "state", "config", "ended"), [
    # Made CCM by the configuration since it was stored, without what a CCM one must have:
    # never counted, so nothing to end (and no 422 for what only a write must meet).
    ("Consent", NO_PATIENT_CONSENT, {}, NOW_CCM, []),
    ("Consent", {**CCM_CONSENT, "scope": FZ_SCOPE}, {}, NOW_CCM, []),
    ("Encounter", NO_SUBJECT_ENCOUNTER, {}, NOW_CCM, []),
    ("Encounter", {**ccm_encounter("e1"), "type": FZ_TIME, "length": None, "period": None},
     {}, NOW_CCM, []),
    ("CarePlan", {**CCM_CARE_PLAN, "subject": FOREIGN_P1}, {}, DEFAULT_CONFIG, []),
    ("CarePlan", {k: v for k, v in CCM_CARE_PLAN.items() if k != "subject"}, {},
     DEFAULT_CONFIG, []),
    ("Condition", {"resourceType": "Condition"}, {}, DEFAULT_CONFIG, []),
    # Counted when stored, no longer CCM by the configuration now: still ended, for its patient.
    ("Consent", CCM_CONSENT, GRANTED_P1, NOT_CCM_NOW, [("consent.voided.v1", "Patient/p1")]),
    ("CarePlan", CCM_CARE_PLAN, CCM_P1, NOT_CCM_NOW, [("care-plan.closed.v1", "Patient/p1")]),
    ("Encounter", ccm_encounter("e1"), LOGGED_P1, NOT_CCM_NOW,
     [("time-entry.reversed.v1", "Patient/p1")]),
    # A date of the last content Python cannot read (a leap second) does not stop it either.
    ("Consent", {**CCM_CONSENT, "dateTime": "2016-12-31T23:59:60Z"}, GRANTED_P1,
     DEFAULT_CONFIG, [("consent.voided.v1", "Patient/p1")]),
    ("Patient", {"resourceType": "Patient"}, {}, NOW_CCM, [("patient.upserted.v1", "Patient/x1")]),
])
def test_a_deletion_ends_what_was_counted_and_is_held_to_no_write_rule(rtype, content, state,
                                                                        config, ended):
    content = {k: v for k, v in content.items() if v is not None}
    mapping = map_version(content, ctx(rtype, state=state, deleted=True, config=config))
    assert [(e.type.split(".", 1)[1], e.subject) for e in mapping.events] == ended
    for event in mapping.events:
        assert event.data.get("status", "entered-in-error") == "entered-in-error"


async def test_a_resource_stored_before_a_config_change_can_still_be_deleted(fhir):
    """A Consent stored as no CCM consent (a scope of its own, no patient), then the practice
    makes the scope CCM: the delete answers 204 (it answered 422: 'a CCM consent needs
    Consent.patient'), alone and in a transaction; the same holds for an Encounter."""
    consents = [{**NO_PATIENT_CONSENT, "id": rid} for rid in ("fz1", "fz2")]
    for consent in consents:
        assert (await fhir.put(f"/fhir/Consent/{consent['id']}", json=consent)).status_code == 201
    enc = {**NO_SUBJECT_ENCOUNTER, "id": "e-fz"}
    assert (await fhir.put("/fhir/Encounter/e-fz", json=enc)).status_code == 201
    r = await fhir.put("/v1/practices/alpha/ingest-config", json={
        "consent_scopes": list(NOW_CCM.consent_scopes),
        "ccm_time_codes": list(NOW_CCM.ccm_time_codes)})
    assert r.status_code == 200, r.text
    r = await fhir.put("/fhir/Consent/fz3", json={**NO_PATIENT_CONSENT, "id": "fz3"})
    assert r.status_code == 422 and "Consent.patient" in r.text  # the new config applies
    written = await counts(fhir)
    assert (await fhir.delete("/fhir/Consent/fz1")).status_code == 204
    assert (await fhir.delete("/fhir/Encounter/e-fz")).status_code == 204
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Consent/fz2"}}]}
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["status"].startswith("204")
    assert (await fhir.get("/fhir/Consent/fz1")).status_code == 410
    after = await counts(fhir)
    assert after["versions"] == written["versions"] + 3
    assert after["events"] == written["events"]  # nothing was counted, nothing to end


OPT_OUT = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                       "code": "OPTOUT"}]}


@pytest.mark.parametrize(("changes", "provision"), [
    # No provision.type: the policy rule decides (an opt-out consent granted no CCM consent).
    ({"policyRule": OPT_OUT, "provision": {"period": {"start": "2026-02-27"}}}, "deny"),
    ({"policyRule": {"coding": [{"code": "OPTOUTE"}]}, "provision": {}}, "deny"),
    ({"provision": {"period": {"start": "2026-02-27"}}}, "permit"),  # OPTIN
    ({"policyRule": {"coding": [{"system": "urn:other", "code": "OPTOUT"}]}, "provision": {}},
     "permit"),
    # provision.type says it outright, whatever the rule.
    ({"policyRule": OPT_OUT}, "permit"),
    ({"provision": {"type": "deny"}}, "deny"),
])
def test_a_consent_permits_or_denies_as_its_provision_else_its_policy_rule_says(changes, provision):
    (event,) = map_version({**CCM_CONSENT, **changes}, ctx("Consent")).events
    assert event.type == "ingest.consent.granted.v1" and event.data["provision"] == provision


def test_an_opt_out_consent_needs_no_date_and_expires_nothing():
    denying = {**CCM_CONSENT, "policyRule": OPT_OUT, "dateTime": None,
               "provision": {"period": {"start": "2026-02-27", "end": "2026-12-31"}}}
    mapping = map_version(denying, ctx("Consent"))
    assert mapping.events[0].data["provision"] == "deny" and "expiresOn" not in mapping.state
    with pytest.raises(FhirRejected, match="Consent.dateTime"):
        map_version({**denying, "policyRule": None}, ctx("Consent"))


def test_the_hl7_opt_out_example_is_no_ccm_consent_granted():
    """r4spec-Out (policyRule OPTOUT, a provision without a type) was mapped as a permit."""
    out = {**example("Consent/r4spec-Out.json"), "patient": {"reference": "Patient/p1"}}
    (event,) = map_version(out, ctx("Consent")).events
    assert event.data["provision"] == "deny"


def test_a_provision_type_stored_before_it_was_checked_follows_the_policy_rule():
    """A consent stored with provision.type 'maybe' (before the binding was checked) voided
    with that value: its event broke the contract and billing dead-lettered it."""
    stored = {**CCM_CONSENT, "provision": {"type": "maybe"}}
    (event,) = map_version(stored, ctx("Consent", state={"ccm": True, "patient": "Patient/p1"},
                                       deleted=True)).events
    assert event.type == "ingest.consent.voided.v1" and event.data["provision"] == "permit"
    assert_valid_event(CloudEvent(source="/t", type=event.type, tenant="t", subject=event.subject,
                                  data=event.data))


@pytest.mark.parametrize(("received", "obtained", "revision", "refused"), [
    # received 2026-03-31 23:00 UTC = 19:00 New York
    ("2026-03-31T23:00:00+00:00", "2026-04-01", None, True),  # the next day: refused
    ("2026-03-31T23:00:00+00:00", "2026-03-31", None, False),
    # 23:57 New York: an EHR clock 5 minutes ahead is already on April 1st (allowed skew)
    ("2026-04-01T03:57:00+00:00", "2026-04-01", None, False),
    ("2026-04-01T03:54:00+00:00", "2026-04-01", None, True),
    # a version stored before the rule, mapped again for a config change: not refused now
    ("2026-03-31T23:00:00+00:00", "2026-04-01", 3, False),
])
def test_a_consent_in_force_obtained_after_it_was_received_is_refused(
        received, obtained, revision, refused):
    at = datetime.fromisoformat(received)
    source = SourceVersion("Consent", "cs1", 1, at, "a" * 64, at, "ehr", mapping_revision=revision)
    context = MappingContext(source, DEFAULT_CONFIG, NY, {}, False)
    consent = {**CCM_CONSENT, "dateTime": obtained}
    if refused:
        with pytest.raises(FhirRejected, match="after the day this version was received"):
            map_version(consent, context)
    else:
        assert map_version(consent, context).events[0].type == "ingest.consent.granted.v1"


@pytest.mark.parametrize(("codes", "sent", "chronic", "configured"), [
    ((), "http://snomed.info/sct|10509002", True, False),  # acute bronchitis: any code counts
    (("http://snomed.info/sct|44054006",), "http://snomed.info/sct|44054006", True, True),
    (("http://snomed.info/sct|44054006",), "http://snomed.info/sct|10509002", False, True),
])
def test_a_condition_says_whether_a_chronic_code_list_judged_it_and_when_recorded(
        codes, sent, chronic, configured):
    """Billing counts a condition for the months it lasted (``onset``, else ``recorded``) and
    warns when no chronic code list judged it (``chronicCodesConfigured``)."""
    system, _, code = sent.partition("|")
    condition = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
                 "clinicalStatus": {"coding": [{"code": "active"}]},
                 "category": [{"coding": [{
                     "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                     "code": "problem-list-item"}]}],
                 "code": {"coding": [{"system": system, "code": code}]},
                 "recordedDate": "2026-02-03"}
    config = dataclasses.replace(DEFAULT_CONFIG, chronic_codes=codes)
    (event,) = map_version(condition, ctx("Condition", config=config)).events
    assert (event.data["chronic"], event.data["chronicCodesConfigured"],
            event.data["recorded"]) == (chronic, configured, "2026-02-03")


async def test_a_condition_event_with_its_new_fields_follows_its_contract(fhir):
    condition = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
                 "clinicalStatus": {"coding": [{
                     "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                     "code": "active"}]},
                 "category": [{"coding": [{
                     "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                     "code": "problem-list-item"}]}],
                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                 "recordedDate": "2026-02-03"}
    assert (await fhir.put("/fhir/Condition/c1", json=condition)).status_code == 201
    (event,) = await events(fhir, "ingest.condition.upserted.v1")
    assert_valid_event(event)
    assert (event["data"]["recorded"], event["data"]["chronicCodesConfigured"]) == (
        "2026-02-03", False)
