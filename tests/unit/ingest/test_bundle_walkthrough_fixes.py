"""What a new EHR integration's walkthrough found in transaction and batch Bundles: references
to entries by their RESTful fullUrl (relative and version-specific), vread and history GET
entries, and a PUT without the id of its URL. On the embedded database."""

import pytest

from tests.unit.ingest.conftest import counts, events, example
from tests.unit.ingest.test_bundle_rules import stored_id, transaction
from tests.unit.ingest.test_fhir_api import ccm_encounter

BASE = "http://test/fhir"  # the base the test client's requests come to
TEMP = f"{BASE}/Patient/temp-abs-2"
PATIENT = {"resourceType": "Patient", "active": True}


def condition(reference: str) -> dict:
    return {**example("Condition/r4spec-example.json"), "subject": {"reference": reference}}


def post(resource: dict, full_url: str | None = None) -> dict:
    return {**({"fullUrl": full_url} if full_url else {}), "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"]}}


def update(rid: str) -> dict:
    return {"request": {"method": "PUT", "url": f"Patient/{rid}"},
            "resource": {**PATIENT, "id": rid}}


async def subject_of(fhir, entry: dict) -> str:
    r = await fhir.get(f"/fhir/Condition/{stored_id(entry, 'Condition')}")
    assert r.status_code == 200, r.text
    return r.json()["subject"]["reference"]


# ---- references to an entry by its RESTful fullUrl ------------------------------------------

async def test_a_relative_reference_names_the_entry_whose_restful_full_url_it_completes(fhir):
    """FHIR bundle.html: a relative reference in an entry whose fullUrl is RESTful is relative to
    that fullUrl's base; in one whose fullUrl is a urn: (or absent), to this server's base
    (https or :443 aside, as absolute references are compared). Either way it names the Patient
    the transaction creates (it was stored as Patient/temp-abs-2, a patient that does not
    exist), as the absolute reference does; relative to another server's base it names no
    entry and is left alone."""
    r = await fhir.post("/fhir", json=transaction(
        post(PATIENT, TEMP),
        post(condition("Patient/temp-abs-2"), f"{BASE}/Condition/c1"),
        post(condition(TEMP), "urn:uuid:00000000-0000-4000-8000-0000000000c2"),
        post(condition("Patient/temp-abs-2")),
        post(condition("Patient/temp-abs-2"), "https://test:443/fhir/Condition/c4"),
        post(condition("Patient/temp-abs-2"), "https://other.example/fhir/Condition/c5")))
    assert r.status_code == 200, r.text
    patient, *conditions = r.json()["entry"]
    new = f"Patient/{stored_id(patient, 'Patient')}"
    assert [await subject_of(fhir, c) for c in conditions] == [new] * 4 + ["Patient/temp-abs-2"]
    assert [e["data"]["patient"] for e in await events(fhir, "ingest.condition.upserted.v1")] \
        == [new] * 4 + ["Patient/temp-abs-2"]


async def test_a_version_specific_reference_to_a_created_entry_names_the_version_it_made(fhir):
    """FHIR: version-specific references stay version-specific once rewritten: one to a POST
    entry names the new id's version 1, or, when a conditional create finds a stored resource,
    that resource's current version."""
    stored = {**PATIENT, "identifier": [{"system": "urn:mrn", "value": "M-1"}]}
    for active in (True, False):  # version 2
        r = await fhir.put("/fhir/Patient/known", json={**stored, "id": "known",
                                                        "active": active})
        assert r.status_code in (200, 201), r.text
    found = f"{BASE}/Patient/temp-found"
    r = await fhir.post("/fhir", json=transaction(
        post(PATIENT, TEMP),
        {**post(stored, found), "request": {"method": "POST", "url": "Patient",
                                            "ifNoneExist": "identifier=urn:mrn|M-1"}},
        post(condition("Patient/temp-abs-2/_history/1"), f"{BASE}/Condition/c1"),
        post(condition(f"{TEMP}/_history/3")),
        post(condition("Patient/temp-found/_history/1"), f"{BASE}/Condition/c3")))
    assert r.status_code == 200, r.text
    patient, known, *conditions = r.json()["entry"]
    new = f"Patient/{stored_id(patient, 'Patient')}"
    assert known["response"]["status"] == "200 OK"
    assert [await subject_of(fhir, c) for c in conditions] == [
        f"{new}/_history/1", f"{new}/_history/1", "Patient/known/_history/2"]


@pytest.mark.parametrize("path", ["/fhir", "/fhir/Bundle/$validate"])
async def test_validate_resolves_references_to_restful_full_urls_as_the_transaction_does(
        fhir, path):
    """CCM time for a version of the Patient the Bundle creates under another server's fullUrl:
    read as that server's patient (422) until it was resolved to the entry."""
    other = "https://other.example/fhir/Patient/t"
    encounter = {**ccm_encounter(), "subject": {"reference": f"{other}/_history/1"}}
    del encounter["id"]
    r = await fhir.post(path, json=transaction(post(PATIENT, other), post(encounter)))
    assert r.status_code == 200, r.text
    if path == "/fhir":
        patient, _ = r.json()["entry"]
        logged = await events(fhir, "ingest.time-entry.logged.v1")
        assert [e["data"]["patient"] for e in logged] == \
            [f"Patient/{stored_id(patient, 'Patient')}"]


# ---- vread and history GET entries ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["transaction", "batch"])
async def test_vread_entries_answer_as_the_rest_vread_and_never_fail_the_bundle(fhir, kind):
    for body in ({**PATIENT, "id": "txg1"}, {**PATIENT, "id": "txg1", "active": False}):
        await fhir.put("/fhir/Patient/txg1", json=body)
    await fhir.put("/fhir/Patient/gone", json={**PATIENT, "id": "gone"})
    await fhir.delete("/fhir/Patient/gone")
    r = await fhir.post("/fhir", json=transaction(
        {"request": {"method": "GET", "url": "Patient/txg1/_history/1"}},
        update("txg2"),
        *({"request": {"method": "GET", "url": url}} for url in (
            "Patient/txg1/_history/9", "Patient/txg1/_history/x", "Patient/gone/_history/2",
            "Patient/nobody/_history/1")), kind=kind))
    assert r.status_code == 200, r.text
    vread, put, *missing = r.json()["entry"]
    assert vread["response"]["status"] == "200 OK"
    assert vread["response"]["location"] == "Patient/txg1/_history/1"
    assert vread["response"]["etag"] == 'W/"1"'
    assert vread["resource"]["active"] is True and vread["resource"]["meta"]["versionId"] == "1"
    rest = await fhir.get("/fhir/Patient/txg1/_history/1")
    assert vread["resource"] == rest.json()
    assert put["response"]["status"] == "201 Created"
    assert (await fhir.get("/fhir/Patient/txg2")).status_code == 200
    assert [e["response"]["status"] for e in missing] == \
        ["404 Not Found", "404 Not Found", "410 Gone", "404 Not Found"]


@pytest.mark.parametrize("kind", ["transaction", "batch"])
async def test_history_entries_and_other_reads_not_served_never_fail_the_bundle(fhir, kind):
    """A history entry is answered as the REST history is (its history Bundle; unknown
    resource 404, parameters it refuses 400); reads of URLs not served here get their own 400.
    The Bundle's other entries are stored."""
    await fhir.put("/fhir/Patient/txg1", json={**PATIENT, "id": "txg1"})
    r = await fhir.post("/fhir", json=transaction(
        *({"request": {"method": "GET", "url": url}} for url in (
            "Patient/txg1/_history", "Patient/nobody/_history", "Patient/txg1/_history?_since=x",
            "Patient/txg1/$everything", "Patient/_history", "Patient/txg1/_history/1/x")),
        update("txg2"),
        kind=kind))
    assert r.status_code == 200, r.text
    *reads, put = r.json()["entry"]
    assert [e["response"]["status"] for e in reads] == \
        ["200 OK", "404 Not Found"] + ["400 Bad Request"] * 4
    rest = (await fhir.get("/fhir/Patient/txg1/_history")).json()
    assert reads[0]["resource"] == rest and rest["type"] == "history" and rest["total"] == 1
    assert reads[2]["response"]["outcome"]["issue"][0]["expression"] == \
        ["Bundle.entry[2].request.url"]
    assert put["response"]["status"] == "201 Created"


@pytest.mark.parametrize("method", ["DELETE", "PUT", "POST"])
async def test_a_write_of_a_version_url_still_fails_the_transaction(fhir, method):
    """A DELETE of Type/id/_history/1 had deleted the whole resource."""
    await fhir.put("/fhir/Patient/a", json={**PATIENT, "id": "a"})
    before = await counts(fhir)
    r = await fhir.post("/fhir", json=transaction(
        {"request": {"method": method, "url": "Patient/a/_history/1"},
         **({} if method == "DELETE" else {"resource": {**PATIENT, "id": "a"}})}))
    assert r.status_code == 422, r.text
    assert r.json()["issue"][0]["expression"] == ["Bundle.entry[0].request.url"]
    assert await counts(fhir) == before
    assert (await fhir.get("/fhir/Patient/a")).status_code == 200


# ---- a PUT names its resource by the id of its URL ------------------------------------------

async def test_an_update_without_the_id_of_its_url_is_refused_as_over_rest(fhir):
    """FHIR: the resource SHALL have an id equal to the URL's. REST answers 400 (as it does,
    in a Bundle too, for an id that differs); a conditional update may leave it out."""
    rest = await fhir.put("/fhir/Patient/a3", json=PATIENT)
    assert rest.status_code == 400
    without = {"request": {"method": "PUT", "url": "Patient/a3"}, "resource": PATIENT}
    for path in ("/fhir", "/fhir/Bundle/$validate"):
        r = await fhir.post(path, json=transaction(without))
        assert r.status_code == 400, (path, r.text)
        (issue,) = r.json()["issue"]
        assert (issue["code"], issue["expression"]) == (
            "required", ["Bundle.entry[0].resource.id"]), path
        assert issue["diagnostics"] == rest.json()["issue"][0]["diagnostics"]
    r = await fhir.post("/fhir", json=transaction(without, update("a4"), kind="batch"))
    assert [e["response"]["status"] for e in r.json()["entry"]] == \
        ["400 Bad Request", "201 Created"]
    assert (await fhir.get("/fhir/Patient/a3")).status_code == 404
    r = await fhir.post("/fhir", json=transaction(
        {"request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|A-5"},
         "resource": {**PATIENT, "identifier": [{"system": "urn:mrn", "value": "A-5"}]}}))
    assert r.json()["entry"][0]["response"]["status"] == "201 Created", r.text


async def test_issues_of_a_conditional_entry_name_its_own_elements(fhir):
    """FHIRPath of the entry's elements (an EHR integrator's walkthrough): criteria the search
    refuses at ``request.ifNoneExist`` (it was ``Bundle.entry[0].identifier``), a body's id
    other than the match's at ``resource.id``, a resource's element without its type."""
    twice = {"resource": PATIENT, "request": {"method": "POST", "url": "Patient",
                                              "ifNoneExist": "identifier=a|1&identifier=b|2"}}
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                       "entry": [twice]})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == [
        "Bundle.entry[0].request.ifNoneExist"]
    stored = {**PATIENT, "id": "m1", "identifier": [{"system": "urn:mrn", "value": "M1"}]}
    assert (await fhir.put("/fhir/Patient/m1", json=stored)).status_code == 201
    other_id = {"resource": {**stored, "id": "m2"},
                "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|M1"}}
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                       "entry": [other_id]})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == [
        "Bundle.entry[0].resource.id"]
    bad = {"resource": {"resourceType": "Encounter", "status": "nonsense", "class": {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}},
        "request": {"method": "POST", "url": "Encounter"}}
    r = await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                       "entry": [bad]})
    assert r.status_code == 422
    assert ["Bundle.entry[0].resource.status"] in [i["expression"] for i in r.json()["issue"]]
