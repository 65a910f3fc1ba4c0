"""A conditional create or update that matches nothing creates a resource, which must meet its
own criteria: one that does not (an identifier typed ``e-77`` under criteria ``E-77``) found
nothing on every later push either and created another resource each time, so one 25-minute
Encounter pushed four times logged 100 minutes of CCM time (an EHR integrator's walkthrough).
Such a write is refused and writes nothing (FHIR R5 http.html#cond-update; HAPI refuses it).
And a create with criteria in its URL (``POST Patient?identifier=…``), whose criteria were
dropped, is refused. On the embedded database."""

import pytest

from tests.unit.ingest.conftest import counts, events
from tests.unit.ingest.test_bundle_rules import stored_id, transaction
from tests.unit.ingest.test_fhir_api import ccm_encounter

SYSTEM = "urn:ehr:enc"


def encounter(value: str, subject: str = "Patient/p1") -> dict:
    enc = {**ccm_encounter(), "identifier": [{"system": SYSTEM, "value": value}],
           "subject": {"reference": subject}}
    del enc["id"]
    return enc


def entry(method: str, url: str, resource: dict, **request) -> dict:
    return {"resource": resource, "request": {"method": method, "url": url, **request}}


# (how it is sent, the element its issue names)
def rest_create(fhir, criteria, resource):
    return fhir.post("/fhir/Encounter", json=resource, headers={"If-None-Exist": criteria})


def rest_update(fhir, criteria, resource):
    return fhir.put(f"/fhir/Encounter?{criteria}", json=resource)


def tx_create(fhir, criteria, resource):
    return fhir.post("/fhir", json=transaction(entry("POST", "Encounter", resource,
                                                     ifNoneExist=criteria)))


def tx_update(fhir, criteria, resource):
    return fhir.post("/fhir", json=transaction(entry("PUT", f"Encounter?{criteria}",
                                                     resource)))


WAYS = {"REST create": (rest_create, "If-None-Exist"),
        "REST conditional update": (rest_update, "Encounter?"),
        "transaction create": (tx_create, "Bundle.entry[0].request.ifNoneExist"),
        "transaction conditional update": (tx_update, "Bundle.entry[0].request.url")}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(("criteria", "sent", "unmet"), [
    (f"identifier={SYSTEM}|E-77", encounter("e-77"), "identifier"),  # the value's case
    ("identifier=urn:other|E-77", encounter("E-77"), "identifier"),  # another system
    ("identifier=E-78", encounter("E-77"), "identifier"),  # any system, another value
    (f"identifier={SYSTEM}|E-77&patient=Patient/p2", encounter("E-77"), "patient"),
    (f"identifier={SYSTEM}|E-77&subject=Patient/p2", encounter("E-77"), "subject"),
])
async def test_a_write_that_would_create_what_its_criteria_miss_is_refused(
        fhir, way, criteria, sent, unmet):
    send, element = WAYS[way]
    before = await counts(fhir)
    r = await send(fhir, criteria, sent)
    assert r.status_code == 400, r.text
    issue = r.json()["issue"][0]
    assert issue["code"] == "invalid" and f"does not meet {unmet}=" in issue["diagnostics"]
    assert issue["expression"][0].startswith(element)
    assert await counts(fhir) == before  # nothing written, no event


@pytest.mark.parametrize("way", WAYS)
async def test_a_write_that_meets_its_criteria_creates_once_however_often_it_is_pushed(
        fhir, way):
    """The control: criteria the resource carries (a patient as the resource names it, a time
    criterion the server's to meet) create once, and each push after finds it."""
    send, _ = WAYS[way]
    criteria = f"identifier={SYSTEM}|E-77&patient=Patient/p1&_lastUpdated=gt2020-01-01"
    statuses = [(await send(fhir, criteria, encounter("E-77"))).status_code for _ in range(3)]
    assert statuses[0] in (200, 201) and statuses[1:] == [200, 200]
    assert len(await events(fhir, "ingest.time-entry.logged.v1")) == 1
    assert (await fhir.get("/fhir/Encounter?identifier=E-77")).json()["total"] == 1


async def test_a_created_id_never_meets_an_id_criterion_of_a_create(fhir):
    """A create's id is the server's, so ``_id`` criteria never find what it made."""
    r = await fhir.post("/fhir/Encounter", json=encounter("E-77"),
                        headers={"If-None-Exist": "_id=enc-1"})
    assert r.status_code == 400 and "does not meet _id=enc-1" in r.text
    # an update as create takes the body's id, which meets them
    r = await fhir.put("/fhir/Encounter?_id=enc-1", json={**encounter("E-77"), "id": "enc-1"})
    assert r.status_code == 201, r.text


async def test_a_patient_criterion_is_met_by_a_reference_to_the_bundles_own_patient(fhir):
    """In a transaction, the patient a resource names by its fullUrl is the id that entry gets,
    which criteria naming a stored patient do not meet; naming that patient, they do."""
    patient = {"fullUrl": "urn:uuid:0b3f0c1e-1a1a-4b4b-8c8c-000000000001",
               "resource": {"resourceType": "Patient", "active": True},
               "request": {"method": "POST", "url": "Patient"}}
    urn = patient["fullUrl"]
    r = await fhir.post("/fhir", json=transaction(patient, entry(
        "POST", "Encounter", encounter("E-90", subject=urn),
        ifNoneExist=f"identifier={SYSTEM}|E-90&patient=Patient/p1")))
    assert r.status_code == 400 and "does not meet patient=Patient/p1" in r.text
    r = await fhir.post("/fhir", json=transaction(patient, entry(
        "POST", "Encounter", encounter("E-90", subject=urn),
        ifNoneExist=f"identifier={SYSTEM}|E-90")))
    assert r.status_code == 200, r.text
    new = stored_id(r.json()["entry"][0], "Patient")
    r = await fhir.post("/fhir", json=transaction(entry(
        "POST", "Encounter", encounter("E-91", subject=f"Patient/{new}"),
        ifNoneExist=f"identifier={SYSTEM}|E-91&patient=Patient/{new}")))
    assert r.status_code == 200, r.text


async def test_a_batch_entry_that_misses_its_criteria_fails_alone(fhir):
    r = await fhir.post("/fhir", json=transaction(
        entry("POST", "Encounter", encounter("e-77"), ifNoneExist=f"identifier={SYSTEM}|E-77"),
        entry("POST", "Encounter", encounter("E-78"), ifNoneExist=f"identifier={SYSTEM}|E-78"),
        kind="batch"))
    assert r.status_code == 200, r.text
    first, second = r.json()["entry"]
    assert first["response"]["status"].startswith("400")
    assert first["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[0].request.ifNoneExist"]
    assert second["response"]["status"].startswith("201")


async def test_a_create_with_criteria_in_its_url_is_refused(fhir):
    """``POST Type?criteria`` dropped its criteria and created one more resource each push."""
    before = await counts(fhir)
    r = await fhir.post(f"/fhir/Encounter?identifier={SYSTEM}|E-77", json=encounter("E-77"))
    assert r.status_code == 400, r.text
    assert "If-None-Exist" in r.json()["issue"][0]["diagnostics"]
    r = await fhir.post("/fhir", json=transaction(
        entry("POST", f"Encounter?identifier={SYSTEM}|E-77", encounter("E-77"))))
    assert r.status_code == 422, r.text
    issue = r.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[0].request.url"]
    assert "ifNoneExist" in issue["diagnostics"]
    assert await counts(fhir) == before
    # how to say it: accepted
    assert (await fhir.post("/fhir/Encounter?_format=json", json=encounter("E-77"),
                            headers={"If-None-Exist": f"identifier={SYSTEM}|E-77"})
            ).status_code == 201


async def test_a_patient_named_by_a_conditional_reference_meets_a_patient_criterion(fhir):
    """Judged once the Bundle's conditional references are resolved (found by review: the
    check ran before, saw no patient, and refused a transaction that meets its criteria)."""
    p1 = {"resourceType": "Patient", "id": "p1",
          "identifier": [{"system": "urn:mrn", "value": "123"}]}
    assert (await fhir.put("/fhir/Patient/p1", json=p1)).status_code == 201
    for subject in ("Patient/p1", "Patient?identifier=urn:mrn|123"):
        r = await fhir.post("/fhir", json=transaction(entry(
            "POST", "Encounter", encounter(f"E-{subject[-1]}", subject=subject),
            ifNoneExist=f"identifier={SYSTEM}|E-{subject[-1]}&patient=Patient/p1")))
        assert r.status_code == 200, r.text
    r = await fhir.post("/fhir", json=transaction(entry(  # and naming another patient: refused
        "POST", "Encounter", encounter("E-96", subject="Patient?identifier=urn:mrn|123"),
        ifNoneExist=f"identifier={SYSTEM}|E-96&patient=Patient/p2")))
    assert r.status_code == 400 and "does not meet patient=Patient/p2" in r.text
