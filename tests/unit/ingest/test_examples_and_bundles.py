"""The HL7 R4 / US Core examples and transaction Bundles, end to end on the embedded database."""

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ccm_ingest.domain.model import SUPPORTED_TYPES
from tests.unit.ingest.conftest import EXAMPLES, counts, events, example
from tests.unit.ingest.test_fhir_api import ccm_encounter

CCM_BUNDLE = (Path(__file__).resolve().parents[3]
              / "services/ingest/examples/ccm-transaction-bundle.json")
# After the example's last CCM time (31 March): time is refused before it could have been spent.
AFTER_THE_BUNDLE = datetime(2026, 4, 2, 14, 0, tzinfo=UTC)
SINGLE = sorted(str(p.relative_to(EXAMPLES)) for t in SUPPORTED_TYPES
                for p in (EXAMPLES / t).glob("*.json"))


def test_every_supported_type_has_examples():
    assert {p.split("/")[0] for p in SINGLE} == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("path", SINGLE)
async def test_every_hl7_example_of_a_supported_type_is_accepted(fhir, path):
    resource = example(path)
    rtype = resource["resourceType"]
    r = await fhir.put(f"/fhir/{rtype}/{resource['id']}", json=resource)
    assert r.status_code == 201, r.text
    stored = (await fhir.get(f"/fhir/{rtype}/{resource['id']}")).json()
    assert {k: v for k, v in stored.items() if k != "meta"} == \
        {k: v for k, v in resource.items() if k != "meta"}


async def test_inpatient_encounter_is_stored_without_a_time_event(fhir):
    r = await fhir.put("/fhir/Encounter/f203", json=example("Encounter/r4spec-f203.json"))
    assert r.status_code == 201
    assert await events(fhir, "ingest.time-entry.logged.v1") == []


async def test_ccm_transaction_bundle_resolves_references_and_emits_the_ccm_events(fhir):
    fhir.clock.now = AFTER_THE_BUNDLE
    bundle = json.loads(CCM_BUNDLE.read_text())
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    response = r.json()
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201 Created"] * 12
    assert all(e["response"]["etag"] == 'W/"1"' for e in response["entry"])
    patient_id = response["entry"][1]["response"]["location"].split("/")[1]
    encounters = (await fhir.get("/fhir/Encounter", params={"patient": patient_id})).json()
    assert encounters["total"] == 2
    for entry in encounters["entry"]:
        assert entry["resource"]["subject"]["reference"] == f"Patient/{patient_id}"
    logged = await events(fhir, "ingest.time-entry.logged.v1")
    assert sorted((e["data"]["seconds"], e["data"]["serviceMonth"], e["data"]["serviceDate"])
                  for e in logged) == [(1320, "2026-03", "2026-03-03"),
                                       (2100, "2026-03", "2026-03-31")]
    nurse = next(e for e in logged if e["data"]["seconds"] == 1320)
    assert nurse["data"]["performers"][0]["roleCodes"][0]["code"] == "nurse"
    roles = await events(fhir, "ingest.practitioner-role.upserted.v1")
    assert sorted(e["data"]["classification"] for e in roles) == \
        ["billing-practitioner", "clinical-staff"]
    assert len(await events(fhir, "ingest.consent.granted.v1")) == 1
    assert len(await events(fhir, "ingest.care-plan.created.v1")) == 1
    chronic = [e["data"]["chronic"] for e in await events(fhir, "ingest.condition.upserted.v1")]
    assert chronic == [True, True]
    patient_events = [e for e in await events(fhir) if e.get("subject") == f"Patient/{patient_id}"]
    assert [e["sequence"] for e in patient_events] == list(range(1, len(patient_events) + 1))


async def test_ccm_bundle_pushed_twice_is_one_set_of_resources_and_events(fhir):
    fhir.clock.now = AFTER_THE_BUNDLE
    bundle = json.loads(CCM_BUNDLE.read_text())
    await fhir.post("/fhir", json=bundle)
    after_first = await counts(fhir)
    second = await fhir.post("/fhir", json=bundle)
    statuses = [e["response"]["status"] for e in second.json()["entry"]]
    # Every entry is a conditional create on the EHR's identifier: each finds its resource,
    # so pushing the README's example again logs no CCM time twice.
    assert statuses == ["200 OK"] * len(bundle["entry"])
    assert await counts(fhir) == after_first


def references(value):
    if isinstance(value, dict):
        own = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return own + [r for k, v in value.items() if k != "contained" for r in references(v)]
    return [r for v in value for r in references(v)] if isinstance(value, list) else []


async def test_a_resent_bundle_links_its_new_entries_to_the_resources_found_by_criteria(fhir):
    """The fullUrl of a conditional create that finds an existing resource stands for that
    resource: the second push's Encounters, Conditions, Consent and CarePlan are the same
    Patient's, and every reference they hold resolves."""
    fhir.clock.now = AFTER_THE_BUNDLE
    bundle = json.loads(CCM_BUNDLE.read_text())
    first = (await fhir.post("/fhir", json=bundle)).json()["entry"]
    for entry in bundle["entry"][3:]:  # new resources this time, beside the three found
        del entry["request"]["ifNoneExist"], entry["resource"]["identifier"]
    second = (await fhir.post("/fhir", json=bundle)).json()["entry"]
    assert [e["fullUrl"] for e in second[:3]] == [e["fullUrl"] for e in first[:3]]
    assert {e["response"]["status"] for e in second[3:]} == {"201 Created"}
    patient = next(e["fullUrl"].split("/fhir/")[1] for e in first
                   if "/Patient/" in e["fullUrl"])
    checked = 0
    for entry in second[3:]:
        resource = (await fhir.get(entry["fullUrl"].removeprefix("http://test"))).json()
        for ref in references(resource):
            if ref.startswith(("Patient/", "Practitioner/", "Organization/",
                               "PractitionerRole/")):
                assert (await fhir.get(f"/fhir/{ref}")).status_code == 200, ref
                checked += 1
        if resource["resourceType"] in ("Encounter", "Condition", "CarePlan"):
            assert resource["subject"]["reference"] == patient
    assert checked >= 9
    patients = {e["subject"] for e in await events(fhir)
                if str(e.get("subject")).startswith("Patient/")}
    assert patients == {patient}


async def test_two_entries_with_the_same_criteria_are_one_resource_their_references_too(fhir):
    mrn = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "T-1"}]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:00000000-0000-4000-8000-00000000000{n}", "resource": mrn,
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|T-1"}}
        for n in (1, 2)] + [
        {"resource": {**example("Condition/r4spec-example.json"),
                      "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000002"}},
         "request": {"method": "POST", "url": "Condition"}}]}
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    answers = r.json()["entry"]
    assert [e["response"]["status"] for e in answers] == ["201 Created", "200 OK", "201 Created"]
    assert answers[0]["fullUrl"] == answers[1]["fullUrl"]
    condition = (await fhir.get(answers[2]["fullUrl"].removeprefix("http://test"))).json()
    assert f"http://test/fhir/{condition['subject']['reference']}" == answers[0]["fullUrl"]
    assert (await counts(fhir))["resources"] == 2


async def test_transaction_with_one_invalid_entry_writes_and_emits_nothing(fhir):
    bundle = json.loads(CCM_BUNDLE.read_text())
    bundle["entry"][10]["resource"]["status"] = "bogus"
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 422
    issue = r.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[10].resource.status"]
    assert await counts(fhir) == {"resources": 0, "versions": 0, "events": 0}


async def test_transaction_failing_while_storing_writes_nothing(fhir):
    bundle = json.loads(CCM_BUNDLE.read_text())
    del bundle["entry"][11]["resource"]["period"]["end"]  # CCM time without a duration
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 422
    assert r.json()["issue"][0]["expression"] == ["Bundle.entry[11].resource.length"]
    assert await counts(fhir) == {"resources": 0, "versions": 0, "events": 0}


async def test_batch_entries_succeed_or_fail_on_their_own(fhir):
    good = example("Patient/r4spec-example.json")
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": good, "request": {"method": "PUT", "url": "Patient/example"}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
        {"request": {"method": "DELETE", "url": "Patient/example"}},
    ]}
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200
    assert [e["response"]["status"] for e in r.json()["entry"]] == \
        ["201 Created", "404 Not Found", "204 No Content"]


async def test_get_entries_answer_with_the_resource_or_a_searchset(fhir):
    good = example("Patient/r4spec-example.json")
    assert (await fhir.put("/fhir/Patient/example", json=good)).status_code == 201
    assert (await fhir.put("/fhir/Patient/other", json={"resourceType": "Patient",
                                                        "id": "other"})).status_code == 201
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/example"}},
        {"request": {"method": "GET", "url": "Patient?_id=example,missing"}},
        {"request": {"method": "GET", "url": "Patient?_count=1"}},
    ]}
    read, search, everyone = (await fhir.post("/fhir", json=bundle)).json()["entry"]
    assert read["response"]["status"] == "200 OK" and read["resource"]["id"] == "example"
    assert read["resource"] == (await fhir.get("/fhir/Patient/example")).json()
    assert search["resource"]["type"] == "searchset" and search["resource"]["total"] == 1
    assert search["resource"]["entry"][0]["resource"] == read["resource"]
    # Paged as a REST search: no criteria is every Patient, one per page, with a next link.
    assert everyone["resource"]["total"] == 2 and len(everyone["resource"]["entry"]) == 1
    assert "next" in {link["relation"] for link in everyone["resource"]["link"]}


async def test_a_batch_entry_that_is_invalid_fails_alone(fhir):
    """Batch entries are independent: an invalid one (or one pointing at another entry's
    fullUrl) gets its own OperationOutcome, the others are stored."""
    bogus = {**example("Encounter/r4spec-example.json"), "status": "bogus"}
    linked = {**example("Condition/r4spec-example.json"),
              "subject": {"reference": "urn:uuid:0b7f1f6e-6c49-4b0c-9a51-3e1c9e2f1a02"}}
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"fullUrl": "urn:uuid:0b7f1f6e-6c49-4b0c-9a51-3e1c9e2f1a02",
         "resource": {"resourceType": "Patient", "active": True},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": bogus, "request": {"method": "POST", "url": "Encounter"}},
        {"resource": {"resourceType": "Observation"},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": linked, "request": {"method": "POST", "url": "Condition"}},
    ]}
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert [e["response"]["status"] for e in entries] == \
        ["201 Created"] + ["422 Unprocessable Entity"] * 3
    assert [e["response"]["outcome"]["issue"][0]["expression"] for e in entries[1:]] == [
        ["Bundle.entry[1].resource.status"], ["Bundle.entry[2].request.url"],
        ["Bundle.entry[3].resource.subject.reference"]]
    assert await counts(fhir) == {"resources": 1, "versions": 1, "events": 1}


async def test_a_batch_entry_whose_time_cannot_be_stored_fails_alone(fhir):
    """Entries before it are committed: its own answer says it was not, never a 500."""
    def patient(last_updated):
        return {"resourceType": "Patient", "meta": {"lastUpdated": last_updated}}
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient("2026-12-31T23:59:60Z"),
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient("9999-12-31T23:59:59-01:00"),
         "request": {"method": "POST", "url": "Patient"}},
    ]}
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    assert [e["response"]["status"] for e in r.json()["entry"]] == \
        ["201 Created"] + ["422 Unprocessable Entity"] * 2
    assert await counts(fhir) == {"resources": 1, "versions": 1, "events": 1}


async def test_a_conditional_reference_resolves_beside_a_contained_urn(fhir):
    await fhir.put("/fhir/Patient/c1", json={"resourceType": "Patient", "id": "c1",
                                             "identifier": [{"system": "urn:s", "value": "c1"}]})
    condition = {**example("Condition/r4spec-example.json"),
                 "subject": {"reference": "Patient?identifier=urn:s|c1"},
                 "asserter": {"reference": "#o"},
                 "contained": [{"resourceType": "Practitioner", "id": "o", "extension": [{
                     "url": "http://example.org/fhir/StructureDefinition/employer",
                     "valueReference": {
                         "reference": "urn:uuid:0b7f1f6e-6c49-4b0c-9a51-3e1c9e2f1a09"}}]}]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": condition, "request": {"method": "POST", "url": "Condition"}}]}
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    stored = (await fhir.get("/fhir/" + r.json()["entry"][0]["response"]["location"]
                             .rsplit("/_history", 1)[0])).json()
    assert stored["subject"]["reference"] == "Patient/c1"


def _spec_transaction() -> dict:
    return example("Bundle/r4spec-bundle-transaction.json")


async def _prepare_state_the_spec_transaction_presupposes(fhir) -> None:
    # It updates Patient/123a with If-Match W/"2": that version has to exist.
    patient = {"resourceType": "Patient", "id": "123a", "active": True}
    await fhir.put("/fhir/Patient/123a", json=patient)
    await fhir.put("/fhir/Patient/123a", json={**patient, "active": False})


async def test_spec_transaction_is_refused_for_its_operation_entry(fhir):
    """Rule: operations ($lookup on ValueSet) are not supported inside a Bundle."""
    await _prepare_state_the_spec_transaction_presupposes(fhir)
    before = await counts(fhir)
    r = await fhir.post("/fhir", json=_spec_transaction())
    assert r.status_code == 422
    issue = r.json()["issue"][0]
    assert issue["code"] == "not-supported"
    assert issue["expression"] == ["Bundle.entry[7].request.url"]
    assert await counts(fhir) == before


async def test_spec_transaction_without_the_operation_entry_is_accepted(fhir):
    await _prepare_state_the_spec_transaction_presupposes(fhir)
    bundle = _spec_transaction()
    del bundle["entry"][7]
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses[:7] == ["201 Created", "201 Created", "201 Created", "201 Created",
                            "200 OK", "204 No Content", "204 No Content"]
    # GETs report their own result: no name search here, Patient/12334 unknown.
    assert statuses[7:] == ["400 Bad Request", "404 Not Found"]
    assert (await fhir.get("/fhir/Patient/123a")).headers["etag"] == 'W/"3"'


async def test_xds_transaction_is_refused_for_its_unsupported_types(fhir):
    """Rule: only the eight CCM resource types are accepted (DocumentReference, Binary are not)."""
    bundle = example("Bundle/r4spec-xds.json")
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 422
    assert [i["expression"] for i in r.json()["issue"]] == \
        [["Bundle.entry[0].request.url"], ["Bundle.entry[4].request.url"]]
    supported = copy.deepcopy(bundle)
    supported["entry"] = [supported["entry"][i] for i in (1, 2, 3)]
    # Rule: a conditional create that matches nothing creates what must meet its criteria. The
    # example's Patient (identifier MRN) does not meet its ifNoneExist (identifier
    # http://acme.org/xds/patients!89765a87b): each push would create another Patient.
    refused = await fhir.post("/fhir", json=supported)
    assert refused.status_code == 400
    issue = refused.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[0].request.ifNoneExist"]
    assert "does not meet identifier=http://acme.org/xds/patients!89765a87b" in \
        issue["diagnostics"]
    patient = supported["entry"][0]["resource"]
    patient["identifier"] = [{"value": "http://acme.org/xds/patients!89765a87b"}]
    for status in ("201 Created", "200 OK"):  # pushed twice: one Patient
        ok = await fhir.post("/fhir", json=supported)
        assert ok.status_code == 200
        assert [e["response"]["status"] for e in ok.json()["entry"]][0] == status


@pytest.mark.parametrize("kind", ["transaction", "batch"])
async def test_prefer_applies_to_every_entry_of_a_bundle_response(fhir, kind):
    def bundle(n: int) -> dict:
        return {"resourceType": "Bundle", "type": kind, "entry": [
            {"resource": {"resourceType": "Patient", "id": f"{kind}{n}", "active": True},
             "request": {"method": "PUT", "url": f"Patient/{kind}{n}"}}]}

    plain = (await fhir.post("/fhir", json=bundle(1))).json()["entry"][0]
    assert set(plain) == {"fullUrl", "response"} and "outcome" not in plain["response"]
    shown = (await fhir.post("/fhir", json=bundle(2),
                             headers={"Prefer": "return=representation"})).json()["entry"][0]
    assert shown["resource"]["id"] == f"{kind}2" and shown["resource"]["meta"]["versionId"] == "1"
    other = (await fhir.post("/fhir", json=bundle(4),
                             headers={"Prefer": "handling=strict"})).json()["entry"][0]
    assert set(other) == {"fullUrl", "response"}  # no return= : minimal, as without Prefer
    told = (await fhir.post("/fhir", json=bundle(3),
                            headers={"Prefer": "return=OperationOutcome"})).json()["entry"][0]
    assert told["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert "resource" not in told


@pytest.mark.parametrize("delete_url", ["Patient?identifier=urn:mrn|X-1", "Patient/p1"])
async def test_a_conditional_create_does_not_find_what_its_transaction_deletes(fhir, delete_url):
    """FHIR processes DELETEs first: the conditional create makes a new Patient, and the
    entries referring to its fullUrl refer to that one, not to the deleted Patient."""
    mrn = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "X-1"}]}
    assert (await fhir.put("/fhir/Patient/p1", json={**mrn, "id": "p1"})).status_code == 201
    full = "urn:uuid:00000000-0000-4000-8000-0000000000a1"
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": delete_url}},
        {"fullUrl": full, "resource": mrn,
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|X-1"}},
        {"resource": {**example("Condition/r4spec-example.json"), "subject": {"reference": full}},
         "request": {"method": "POST", "url": "Condition"}}]})
    assert r.status_code == 200, r.text
    deleted, created, condition = r.json()["entry"]
    assert deleted["response"]["status"] == "204 No Content"
    assert created["response"]["status"] == "201 Created"
    patient = created["fullUrl"].removeprefix("http://test")
    assert not patient.endswith("/p1") and (await fhir.get(patient)).status_code == 200
    stored = (await fhir.get(condition["fullUrl"].removeprefix("http://test"))).json()
    assert f"/fhir/{stored['subject']['reference']}" == patient
    assert (await fhir.get("/fhir/Patient/p1")).status_code == 410


@pytest.mark.parametrize("delete_url", ["Patient?identifier=urn:mrn|X-1", "Patient/p1"])
async def test_conditional_references_and_updates_do_not_find_what_their_transaction_deletes(
        fhir, delete_url):
    """A conditional reference to the Patient the same transaction deletes matches nothing
    (412, nothing written), so no CCM time is logged for a deleted patient; a conditional
    update of it creates a new one."""
    mrn = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "X-1"}]}
    assert (await fhir.put("/fhir/Patient/p1", json={**mrn, "id": "p1"})).status_code == 201
    before = await counts(fhir)
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": delete_url}},
        {"resource": {**ccm_encounter("e-gone"),
                      "subject": {"reference": "Patient?identifier=urn:mrn|X-1"}},
         "request": {"method": "PUT", "url": "Encounter/e-gone"}}]})
    assert r.status_code == 412, r.text
    assert r.json()["issue"][0]["expression"] == ["Bundle.entry[1].resource.subject.reference"]
    assert await counts(fhir) == before
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": delete_url}},
        {"resource": {**mrn, "active": True},
         "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|X-1"}}]})
    assert r.status_code == 200, r.text
    assert r.json()["entry"][1]["response"]["status"] == "201 Created"
    assert not r.json()["entry"][1]["fullUrl"].endswith("/Patient/p1")


MRN_X2 = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "X-2"}]}


@pytest.mark.parametrize("first", [
    {"request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|X-2"}},
    {"request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|X-2"}},
])
async def test_two_entries_claiming_one_conditional_update_fail_the_transaction(fhir, first):
    """A conditional update beside another conditional write with the same criteria touches
    one resource twice (each had created its own Patient): 422, nothing written."""
    before = await counts(fhir)
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {**first, "resource": MRN_X2},
        {"request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|X-2"},
         "resource": {**MRN_X2, "active": True}}]})
    assert r.status_code == 422, r.text
    (issue,) = r.json()["issue"]
    assert "touch a resource only once" in issue["diagnostics"], issue
    assert await counts(fhir) == before


async def test_criteria_naming_a_patient_by_this_servers_url_match_as_the_search_does(fhir):
    """A patient criterion given as this server's absolute URL (or the id alone) finds what
    the REST search finds: in a conditional create, a conditional reference and a conditional
    delete (each found nothing: three Encounters were made of one)."""
    assert (await fhir.put("/fhir/Patient/p9", json={"resourceType": "Patient", "id": "p9"})
            ).status_code == 201
    encounter = {**ccm_encounter("x"), "subject": {"reference": "Patient/p9"},
                 "identifier": [{"system": "urn:visit", "value": "v-9"}]}
    encounter.pop("id")
    ids = set()
    for patient in ("http://test/fhir/Patient/p9", "Patient/p9", "p9"):
        r = await fhir.post("/fhir/Encounter", json=encounter, headers={
            "If-None-Exist": f"identifier=urn:visit|v-9&patient={patient}"})
        assert r.status_code in (200, 201), r.text
        ids.add(r.json()["id"])
    assert len(ids) == 1
    criteria = "Encounter?identifier=urn:visit|v-9&patient=http://test/fhir/Patient/p9"
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {**encounter, "id": "e-ref", "partOf": {"reference": criteria}},
         "request": {"method": "PUT", "url": "Encounter/e-ref"}}]})
    assert r.status_code == 200, r.text
    stored = (await fhir.get("/fhir/Encounter/e-ref")).json()
    assert stored["partOf"]["reference"] == f"Encounter/{ids.pop()}"
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": criteria}}]})
    assert r.json()["entry"][0]["response"]["status"] == "412 Precondition Failed", r.text
    assert "matches 2" in json.dumps(r.json())


async def test_a_patient_link_given_as_a_urn_must_name_a_patient(fhir):
    """Encounter.subject must be a Patient or a Group: also when it is a urn:uuid the
    transaction resolves to another type."""
    full = "urn:uuid:00000000-0000-4000-8000-0000000000b7"
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": full, "resource": {"resourceType": "Practitioner"},
         "request": {"method": "POST", "url": "Practitioner"}},
        {"resource": {"resourceType": "Encounter", "status": "planned",
                      "class": ccm_encounter()["class"], "subject": {"reference": full}},
         "request": {"method": "POST", "url": "Encounter"}}]})
    assert r.status_code == 422, r.text
    (issue,) = r.json()["issue"]
    assert "references a Practitioner" in issue["diagnostics"]
    assert issue["expression"] == ["Bundle.entry[1].resource.subject.reference"]


PATIENT = {"resourceType": "Patient", "active": True}


@pytest.mark.parametrize(("entry", "status", "expression"), [
    # the id of an update's body is not its URL's
    ({"request": {"method": "PUT", "url": "Patient/b"}, "resource": {**PATIENT, "id": "a"}},
     400, "Bundle.entry[1].resource.id"),
    # … behind an ifMatch (the update checks the version first)
    ({"request": {"method": "PUT", "url": "Patient/b", "ifMatch": 'W/"1"'},
      "resource": {**PATIENT, "id": "a"}}, 400, "Bundle.entry[1].resource.id"),
    ({"request": {"method": "PUT", "url": "Patient/p0", "ifMatch": 'W/"7"'},
      "resource": {**PATIENT, "id": "p0"}}, 412, "Bundle.entry[1].request.ifMatch"),
    # criteria the search refuses, in a conditional create and a conditional reference
    ({"request": {"method": "POST", "url": "Patient", "ifNoneExist": "_count=x"},
      "resource": PATIENT}, 400, "Bundle.entry[1].request.ifNoneExist"),
    ({"request": {"method": "POST", "url": "Encounter"}, "resource": {
        **ccm_encounter(), "subject": {"reference": "Patient?birthdate=2026"}}},
     400, "Bundle.entry[1].resource.subject.reference"),
    ({"request": {"method": "PUT", "url": "Patient?_count=x"}, "resource": PATIENT},
     400, "Bundle.entry[1].request.url"),
    ({"request": {"method": "DELETE", "url": "Patient?_count=x"}},
     400, "Bundle.entry[1].request.url"),
])
async def test_an_entrys_error_names_the_element_under_its_entry(fhir, entry, status,
                                                                  expression):
    """In a transaction an entry's error is located under that entry: its resource's elements
    under ``.resource``, its request's under ``.request``; $validate locates it alike (but for
    a version, which only stored data tells)."""
    await fhir.put("/fhir/Patient/p0", json={**PATIENT, "id": "p0"})
    before = await counts(fhir)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": "Patient/p1"}, "resource": {**PATIENT, "id": "p1"}},
        entry]}
    for path in ("/fhir", "/fhir/Bundle/$validate"):
        if path != "/fhir" and status == 412:
            continue
        r = await fhir.post(path, json=bundle)
        assert (r.status_code, [i["expression"] for i in r.json()["issue"]]) == \
            (status, [[expression]]), (path, r.text)
    assert await counts(fhir) == before


async def test_a_batch_entry_the_database_rolled_back_for_another_says_send_again(fhir,
                                                                                   monkeypatch):
    """A deadlock in one batch entry (rolled back whole) answers 503 for that entry, not
    'failed on the server'; the other entries go on."""
    from sqlalchemy.exc import DBAPIError

    from ccm_ingest.service_layer import bundles

    class Deadlock(Exception):
        sqlstate = "40P01"

    run_entry = bundles._run_entry

    async def first_deadlocks(uow, caller, e):
        if e.index == 0:
            raise DBAPIError("UPDATE …", {}, Deadlock("deadlock detected"))
        return await run_entry(uow, caller, e)

    monkeypatch.setattr(bundles, "_run_entry", first_deadlocks)
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "PUT", "url": "Patient/p1"}, "resource": {**PATIENT, "id": "p1"}},
        {"request": {"method": "PUT", "url": "Patient/p2"}, "resource": {**PATIENT, "id": "p2"}}]})
    first, second = r.json()["entry"]
    assert first["response"]["status"] == "503 Service Unavailable"
    assert "send it again" in first["response"]["outcome"]["issue"][0]["diagnostics"]
    assert second["response"]["status"] == "201 Created"
    assert (await fhir.get("/fhir/Patient/p1")).status_code == 404
