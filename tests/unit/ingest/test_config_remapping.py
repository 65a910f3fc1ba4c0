"""A practice's ingest config change maps its stored resources again: what the change alters is
emitted (through the outbox, with the change), what it does not alter emits nothing."""

import dataclasses

import pytest
from sqlalchemy import select

from ccm_ingest.adapters.orm import ingest_configs
from ccm_ingest.domain.config import DEFAULT_CONFIG, MAPPED_BY, IngestConfig, remapped_types
from ccm_ingest.service_layer import remapping
from ccm_shared.event_contracts import contract_violations
from tests.support.contracts import assert_valid_event
from tests.unit.ingest.conftest import counts, events
from tests.unit.ingest.test_fhir_api import ccm_encounter
from tests.unit.ingest.test_mapping_and_config import CCM_CARE_PLAN, CCM_CONSENT

CONFIG = "/v1/practices/alpha/ingest-config"
COORDINATOR = "urn:ehr:roles|care-coordinator"
LOCAL_CCM = "urn:ehr:activity|CCM"


def coordinator_role(rid="coord") -> dict:
    return {"resourceType": "PractitionerRole", "id": rid,
            "practitioner": {"reference": "Practitioner/c1"},
            "code": [{"coding": [{"system": "urn:ehr:roles", "code": "care-coordinator"}]}]}


def timed_by(performer: str, rid="e1", **more) -> dict:
    return {**ccm_encounter(rid), "participant": [{
        "type": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "code": "PPRF"}]}],
        "individual": {"reference": performer}}], **more}


def local_activity(rid: str, **more) -> dict:
    return {**ccm_encounter(rid), "type": [{"coding": [{"system": "urn:ehr:activity",
                                                         "code": "CCM"}]}], **more}


async def change(fhir, **overrides) -> dict:  # noqa: ANN001
    r = await fhir.put(CONFIG, json=overrides)
    assert r.status_code == 200, r.text
    return r.json()


async def since(fhir, before: int) -> list[dict]:  # noqa: ANN001
    """The events staged after the first ``before`` ones."""
    return (await events(fhir))[before:]


async def test_a_role_code_added_to_clinical_staff_reclassifies_the_stored_role_and_its_time(
        fhir):
    """The walkthrough's coordinator: the role's code was added to clinical_staff_roles, but
    the role and its time had been classified when pushed, and pushing them again changes
    nothing (same content): billing kept the time blocked as staff-role-unknown."""
    assert (await fhir.put("/fhir/PractitionerRole/coord",
                           json=coordinator_role())).status_code == 201
    assert (await fhir.put("/fhir/Encounter/e1",
                           json=timed_by("PractitionerRole/coord"))).status_code == 201
    first = await events(fhir)
    assert [e["data"]["classification"] for e in first
            if e["type"] == "ingest.practitioner-role.upserted.v1"] == ["unknown"]
    (logged,) = [e for e in first if e["type"] == "ingest.time-entry.logged.v1"]
    assert logged["data"]["performers"][0]["classification"] == "unknown"

    answer = await change(fhir, clinical_staff_roles=[
        *DEFAULT_CONFIG.clinical_staff_roles, COORDINATOR])
    assert answer["revision"] == 1
    assert answer["remapped"] == {"revision": 1, "types": ["Encounter", "PractitionerRole"],
                                  "resources": 2, "changed": 2, "events": 2,
                                  "refused": {"count": 0, "resources": []}}
    role, time = sorted(await since(fhir, len(first)), key=lambda e: e["type"])
    assert role["type"] == "ingest.practitioner-role.upserted.v1"
    assert role["data"]["classification"] == "clinical-staff"
    assert time["type"] == "ingest.time-entry.logged.v1"
    assert time["data"]["performers"][0]["classification"] == "clinical-staff"
    # The same stored versions, their mapping's revision the config's: consumers take these
    # as newer than the versions' first events (same lastUpdated and versionId).
    for new, old in ((role, first[0]), (time, logged)):
        assert new["data"]["source"] == {**old["data"]["source"], "mappingRevision": 1}
        assert_valid_event(new)
        assert contract_violations(new["type"], new["data"]) is None  # consumers' own check
    assert time["sequence"] == logged["sequence"] + 1  # the patient's next number
    assert time["source"] == "/ccm/ingest/ingest-config"
    # The EHR's record is as it sent it: no new version.
    read = await fhir.get("/fhir/PractitionerRole/coord")
    assert read.json()["meta"]["versionId"] == "1" and read.headers["etag"] == 'W/"1"'

    # Nothing changes the second time, nor on a change that does not concern them.
    after = len(await events(fhir))
    again = await change(fhir, clinical_staff_roles=[
        *DEFAULT_CONFIG.clinical_staff_roles, COORDINATOR])
    assert again["revision"] == 2 and again["remapped"]["types"] == []
    other = await change(fhir, clinical_staff_roles=[*DEFAULT_CONFIG.clinical_staff_roles,
                                                     COORDINATOR, "urn:other|aide"])
    assert (other["remapped"]["resources"], other["remapped"]["changed"]) == (2, 0)
    assert len(await events(fhir)) == after
    # A version received afterwards is mapped with the new config, as before.
    r = await fhir.put("/fhir/Encounter/e2", json=timed_by("PractitionerRole/coord", "e2"))
    assert r.status_code == 201
    (e2,) = await since(fhir, after)
    assert e2["data"]["performers"][0]["classification"] == "clinical-staff"
    assert "mappingRevision" not in e2["data"]["source"]


async def test_a_practitioners_time_is_reclassified_by_its_qualification(fhir):
    """Without a PractitionerRole, billing classifies the time by what its event says."""
    await fhir.put("/fhir/Practitioner/c1", json={
        "resourceType": "Practitioner", "id": "c1",
        "qualification": [{"code": {"coding": [{"system": "urn:ehr:roles",
                                                "code": "care-coordinator"}]}}]})
    await fhir.put("/fhir/Encounter/e1", json=timed_by("Practitioner/c1"))
    before = len(await events(fhir))
    await change(fhir, non_clinical_roles=[COORDINATOR])
    (time,) = await since(fhir, before)  # the Practitioner's own event has no classification
    assert time["type"] == "ingest.time-entry.logged.v1"
    assert time["data"]["performers"][0]["classification"] == "non-clinical"


@pytest.mark.parametrize(("resource", "overrides", "expected"), [
    (local_activity("e1"), {"ccm_time_codes": [LOCAL_CCM]},
     [("ingest.time-entry.logged.v1", "Patient/p1")]),
    (ccm_encounter("e1"), {"complex_codes": ["http://www.ama-assn.org/go/cpt|99490"]},
     [("ingest.time-entry.logged.v1", "Patient/p1")]),
    (ccm_encounter("e1"), {"facility_classes": ["AMB"]},
     [("ingest.time-entry.reversed.v1", "Patient/p1")]),
    ({**ccm_encounter("e1"), "length": {"value": 25, "unit": "min", "code": "min",
                                        "system": "http://unitsofmeasure.org"},
      "period": {"start": "2026-03-01T02:30:00Z", "end": "2026-03-01T02:57:00Z"}},
     {"length_tolerance_seconds": 300}, [("ingest.time-entry.logged.v1", "Patient/p1")]),
    (local_activity("e1"), {"visit_codes": [LOCAL_CCM]},
     [("ingest.visit.recorded.v1", "Patient/p1")]),
    ({**CCM_CONSENT, "category": [{"coding": [{"system": "urn:ehr:c", "code": "ccm"}]}]},
     {"consent_categories": ["urn:ehr:c|ccm"]}, [("ingest.consent.granted.v1", "Patient/p1")]),
    (CCM_CONSENT, {"consent_scopes": ["urn:ehr:scope|research"]},
     [("ingest.consent.voided.v1", "Patient/p1")]),
    ({**CCM_CARE_PLAN, "category": [{"coding": [{"system": "urn:ehr:cp", "code": "ccm"}]}]},
     {"care_plan_categories": ["urn:ehr:cp|ccm"]},
     [("ingest.care-plan.created.v1", "Patient/p1")]),
    (CCM_CARE_PLAN, {"care_plan_intents": ["order"]},
     [("ingest.care-plan.closed.v1", "Patient/p1")]),
    ({"resourceType": "Condition", "id": "k1", "subject": {"reference": "Patient/p1"},
      "clinicalStatus": {"coding": [{
          "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
          "code": "active"}]},
      "category": [{"coding": [{"system": "urn:ehr:cat", "code": "chronic"}]}]},
     {"chronic_categories": ["urn:ehr:cat|chronic"]},
     [("ingest.condition.upserted.v1", "Patient/p1")]),
    ({"resourceType": "Condition", "id": "k1", "subject": {"reference": "Patient/p1"},
      "clinicalStatus": {"coding": [{
          "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
          "code": "active"}]},
      "category": [{"coding": [{
          "system": "http://terminology.hl7.org/CodeSystem/condition-category",
          "code": "problem-list-item"}]}],
      "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}},
     {"chronic_codes": ["http://snomed.info/sct|38341003"]},
     [("ingest.condition.upserted.v1", "Patient/p1")]),
], ids=["ccm_time_codes", "complex_codes", "facility_classes", "length_tolerance_seconds",
        "visit_codes", "consent_categories", "consent_scopes", "care_plan_categories",
        "care_plan_intents", "chronic_categories", "chronic_codes"])
async def test_each_key_that_changes_a_mapping_restates_what_it_changes(fhir, resource,
                                                                       overrides, expected):
    """One resource the key concerns, and one of another type it does not: only the first is
    stated again, with what its new mapping says."""
    r = await fhir.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
    assert r.status_code == 201, r.text
    assert (await fhir.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"}
                           )).status_code == 201
    stored = await fhir.get(f"/fhir/{resource['resourceType']}/{resource['id']}")
    before = await events(fhir)
    answer = await change(fhir, **overrides)
    assert answer["remapped"]["types"] == sorted(MAPPED_BY[next(iter(overrides))])
    new = await since(fhir, len(before))
    assert [(e["type"], e["subject"]) for e in new] == expected
    previous = [e for e in before if e["subject"] == "Patient/p1"]
    for event in new:
        assert_valid_event(event)
        assert event["data"]["source"]["versionId"] == "1"
        assert event["data"]["source"]["mappingRevision"] == answer["revision"]
        assert event["sequence"] == max((e["sequence"] for e in previous), default=0) + 1
    got = {e["type"]: e["data"] for e in new}
    if "complex_codes" in overrides:
        assert got["ingest.time-entry.logged.v1"]["complex"] is True
    if "length_tolerance_seconds" in overrides:  # 25 min against a 27-min period: agreeing now
        assert got["ingest.time-entry.logged.v1"]["warnings"] == []
    if "chronic_categories" in overrides:
        assert got["ingest.condition.upserted.v1"]["chronic"] is True
    if "chronic_codes" in overrides:
        assert got["ingest.condition.upserted.v1"]["chronic"] is False
    # The resource itself is as it was stored.
    assert (await fhir.get(f"/fhir/{resource['resourceType']}/{resource['id']}")
            ).json() == stored.json()


async def test_time_that_stops_being_ccm_is_reversed_and_logged_again_when_it_is(fhir):
    await fhir.put("/fhir/Encounter/e1", json=local_activity("e1"))
    await fhir.put("/fhir/Encounter/e2", json=ccm_encounter("e2"))
    start = len(await events(fhir))
    await change(fhir, ccm_time_codes=[LOCAL_CCM])
    await change(fhir)  # back to the defaults
    kinds = [(e["type"].split(".")[2], e["data"]["entry"], e["data"]["source"]["mappingRevision"])
             for e in await since(fhir, start)]
    assert kinds == [("logged", "Encounter/e1", 1), ("reversed", "Encounter/e2", 1),
                     ("reversed", "Encounter/e1", 2), ("logged", "Encounter/e2", 2)]
    assert (await since(fhir, start))[1]["data"]["reason"] == "not-ccm"
    # The state follows: a deletion now reverses what the current config made of it.
    await fhir.delete("/fhir/Encounter/e2")
    (reversed_,) = await since(fhir, start + 4)
    assert (reversed_["type"], reversed_["data"]["entry"]) == (
        "ingest.time-entry.reversed.v1", "Encounter/e2")


async def test_deleted_and_unconcerned_resources_are_left_alone(fhir):
    await fhir.put("/fhir/Consent/cs1", json=CCM_CONSENT)
    await fhir.delete("/fhir/Consent/cs1")
    await fhir.put("/fhir/CarePlan/cp1", json=CCM_CARE_PLAN)
    await fhir.put("/fhir/Encounter/e1", json=ccm_encounter("e1"))
    written = await counts(fhir)
    answer = await change(fhir, consent_scopes=["urn:ehr:scope|research"],
                          consent_expiring_lead_days=10)
    assert answer["remapped"]["types"] == ["Consent"]
    assert answer["remapped"]["resources"] == 0  # the deleted consent: its deletion voided it
    assert await counts(fhir) == written
    lead_only = await change(fhir, consent_scopes=["urn:ehr:scope|research"],
                             consent_expiring_lead_days=20)
    assert lead_only["remapped"]["types"] == []


async def test_a_resource_the_new_config_refuses_is_kept_as_mapped_and_named(fhir):
    """An Encounter stored as no CCM time (its code was no CCM code) without a duration:
    CCM time needs one, so the change leaves it as it was and says so."""
    no_length = {**local_activity("e1")}
    del no_length["length"]
    assert (await fhir.put("/fhir/Encounter/e1", json=no_length)).status_code == 201
    await fhir.put("/fhir/Encounter/e2", json=local_activity("e2"))
    written = await counts(fhir)
    answer = await change(fhir, ccm_time_codes=[LOCAL_CCM])
    refused = answer["remapped"]["refused"]
    assert refused["count"] == 1
    (kept,) = refused["resources"]
    assert (kept["resource"], kept["versionId"], kept["expression"]) == (
        "Encounter/e1", "1", ["Encounter.length"])
    assert kept["diagnostics"].startswith("CCM time needs Encounter.length")
    assert (await counts(fhir))["events"] == written["events"] + 1  # e2's time only
    again = await fhir.put("/fhir/Encounter/e1", json={**no_length, "status": "cancelled"})
    assert again.status_code == 200  # cancelled: no CCM time, nothing refused


async def test_the_change_and_what_it_changes_commit_together(fhir, monkeypatch):
    await fhir.put("/fhir/PractitionerRole/coord", json=coordinator_role())
    written = await counts(fhir)

    async def failing(*args, **kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("the outbox is gone")

    monkeypatch.setattr(remapping, "_stage", failing)
    with pytest.raises(RuntimeError):
        await fhir.put(CONFIG, json={"clinical_staff_roles": [COORDINATOR]})
    shown = (await fhir.get(CONFIG)).json()
    assert shown["overrides"] == {} and shown["revision"] == 0
    assert await counts(fhir) == written
    async with fhir.runtime.db.engine.connect() as conn:
        assert (await conn.execute(select(ingest_configs))).all() == []
    # Nothing of it is left behind: the next change starts from the config before.
    monkeypatch.undo()
    answer = await change(fhir, clinical_staff_roles=[COORDINATOR])
    assert (answer["revision"], answer["remapped"]["events"]) == (1, 1)


def test_every_config_key_says_which_mappings_read_it():
    assert set(MAPPED_BY) == {f.name for f in dataclasses.fields(IngestConfig)}
    roles = dataclasses.replace(DEFAULT_CONFIG, non_clinical_roles=(COORDINATOR,))
    assert remapped_types(DEFAULT_CONFIG, roles) == ("Encounter", "PractitionerRole")
    assert remapped_types(DEFAULT_CONFIG, DEFAULT_CONFIG) == ()


@pytest.mark.parametrize("via", ["rest", "conditional", "transaction", "batch"])
async def test_a_write_by_a_process_that_cached_the_config_before_a_change_maps_with_it(
        fhir, via):
    """Another process (or this one, while a change commits) may hold the practice's config
    from before a change (CCM_INGEST_PRACTICE_CACHE_SECONDS): its writes were mapped with the
    old config, and nothing maps them again. A write reads the config's revision in its own
    transaction, and maps with the stored config when its copy is older."""
    assert (await fhir.put("/fhir/PractitionerRole/coord",
                           json=coordinator_role())).status_code == 201
    cache = fhir.runtime.state["practice_cache"]
    stale = cache.get("practice", "alpha")
    await change(fhir, clinical_staff_roles=[*DEFAULT_CONFIG.clinical_staff_roles, COORDINATOR])
    cache.put("practice", "alpha", stale)  # as a process that read it before the change has it
    before = len(await events(fhir))
    encounter = timed_by("PractitionerRole/coord", "e7")
    if via == "rest":
        r = await fhir.put("/fhir/Encounter/e7", json=encounter)
    elif via == "conditional":
        r = await fhir.put("/fhir/Encounter?identifier=urn:enc|7", json={
            **encounter, "identifier": [{"system": "urn:enc", "value": "7"}]})
    else:
        r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": via, "entry": [
            {"resource": encounter, "request": {"method": "PUT", "url": "Encounter/e7"}}]})
    assert r.status_code in (200, 201), r.text
    (logged,) = await since(fhir, before)
    assert logged["data"]["performers"][0]["classification"] == "clinical-staff"
