"""EHR writes in the audit trail: a write of a patient's data is in that patient's trail,
whether its URL names the patient or not (``PUT /fhir/Encounter/x``, ``POST /fhir/Condition``,
a transaction's or batch's write entries); a refused write records what it did before."""

import asyncio

import httpx
import pytest
from sqlalchemy import select

from ccm_shared.audit import audit_log, seal_all, verify
from ccm_shared.migrate import upgrade_async, upgrade_platform
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from ccm_shared.transport import InProcessTransport


@pytest.fixture
async def alpha(tmp_path):
    """The ingest app on a platform database, practice alpha and an EHR's token:
    (runtime, client with the token)."""
    url = f"sqlite+aiosqlite:///{tmp_path}/platform.db"
    await asyncio.to_thread(upgrade_platform, url)
    ingest = discover_services()["ingest"]
    await upgrade_async(url, ingest.schema, ingest.migrations_package)
    runtime = ServiceRuntime.build(ingest, load_settings(database_url=url),
                                   transport=InProcessTransport())
    await create_practice(runtime.db.engine, practice_id="alpha", name="alpha", timezone="UTC",
                          pricing=Pricing())
    token = await create_token(runtime.db.engine, practice_id="alpha", label="epic-prod")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                 base_url="http://t",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        yield runtime, client
    await runtime.db.dispose()


def encounter(eid: str, patient: str, **more) -> dict:
    return {"resourceType": "Encounter", "id": eid, "status": "planned",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "AMB"},
            "subject": {"reference": f"Patient/{patient}"}, **more}


def condition(patient: str) -> dict:
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient}"},
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"}]}}


async def entries(runtime) -> list:  # noqa: ANN001
    """The practice's audit entries, oldest first (what, action, patient, entity, outcome)."""
    async with runtime.db.engine.connect() as conn:
        return (await conn.execute(
            select(audit_log.c.what, audit_log.c.action, audit_log.c.patient,
                   audit_log.c.entity, audit_log.c.outcome)
            .where(audit_log.c.practice == "alpha").order_by(audit_log.c.id))).all()


async def trail(runtime, patient: str) -> list[tuple[str, str, int]]:  # noqa: ANN001
    """(what, action, outcome) of the patient's trail, oldest first."""
    return [(r.what, r.action, r.outcome) for r in await entries(runtime)
            if r.patient == patient]


async def test_a_rest_write_is_in_the_trail_of_the_patient_its_resource_is_about(alpha):
    """The URL of ``PUT /fhir/Encounter/e1`` or ``POST /fhir/Condition`` names no patient:
    they were recorded without one, so p1's trail did not show who changed p1's record."""
    runtime, client = alpha
    assert (await client.put("/fhir/Encounter/e1", json=encounter("e1", "p1"))).status_code == 201
    assert (await client.put("/fhir/Encounter/e1", json=encounter(
        "e1", "p1", status="finished"))).status_code == 200
    assert (await client.post("/fhir/Condition", json=condition("p1"))).status_code == 201
    # A conditional create that finds its match names the match's patient.
    coded = {**condition("p1"), "identifier": [{"system": "urn:cond", "value": "C-1"}]}
    for status in (201, 200):
        r = await client.post("/fhir/Condition", json=coded,
                              headers={"If-None-Exist": "identifier=urn:cond|C-1"})
        assert r.status_code == status
    created = await client.post("/fhir/Patient", json={"resourceType": "Patient"})
    assert created.status_code == 201
    new_patient = created.json()["id"]
    # A conditional update names the resource it wrote, and so its patient.
    r = await client.put("/fhir/Encounter?identifier=urn:enc|E-2", json={
        **encounter("e2", "p1"), "identifier": [{"system": "urn:enc", "value": "E-2"}]})
    assert r.status_code == 201
    assert (await client.delete("/fhir/Encounter/e1")).status_code == 204
    assert await trail(runtime, "p1") == [
        ("PUT /fhir/{rtype}/{rid}", "U", 0), ("PUT /fhir/{rtype}/{rid}", "U", 0),
        ("POST /fhir/{rtype}", "C", 0), ("POST /fhir/{rtype}", "C", 0),
        ("POST /fhir/{rtype}", "C", 0), ("PUT /fhir/{rtype}", "U", 0),
        ("DELETE /fhir/{rtype}/{rid}", "D", 0)]
    assert await trail(runtime, new_patient) == [("POST /fhir/{rtype}", "C", 0)]
    # Ids only: the entry names the resource and its patient, nothing of their content.
    rows = [r for r in await entries(runtime) if r.patient == "p1"]
    assert [r.entity for r in rows][:2] == ["Encounter/e1", "Encounter/e1"]
    # a write by criteria names the resource it found or made, as a Type/id URL does
    assert [r.entity for r in rows if r.what == "PUT /fhir/{rtype}"] == ["Encounter/e2"]


async def test_a_deletion_is_in_the_trail_of_the_deleted_versions_patient(alpha):
    runtime, client = alpha
    await client.put("/fhir/Encounter/e1", json=encounter("e1", "p1"))
    assert (await client.put("/fhir/Encounter/e1", json=encounter("e1", "p2"))).status_code == 200
    assert (await client.delete("/fhir/Encounter/e1")).status_code == 204
    # Deleting it again, or deleting what was never stored, writes nobody's record.
    assert (await client.delete("/fhir/Encounter/e1")).status_code == 204
    assert (await client.delete("/fhir/Encounter/never")).status_code == 204
    assert [a for _, a, _ in await trail(runtime, "p1")] == ["U"]
    assert [a for _, a, _ in await trail(runtime, "p2")] == ["U", "D"]
    assert [r.patient for r in await entries(runtime)][-2:] == [None, None]


async def test_a_refused_write_records_what_it_recorded_before_and_a_stored_one_more(alpha):
    """A write refused (4xx) stored nothing: its entry is what it was before, naming a patient
    only when its URL does; the write stored names its resource's patient."""
    runtime, client = alpha
    stale = await client.put("/fhir/Encounter/e1", json=encounter("e1", "p1", status="finished"),
                             headers={"If-Match": 'W/"7"'})
    invalid = await client.put("/fhir/Encounter/e1", json=encounter("e1", "p1", status="bogus"))
    refused_patient = await client.put("/fhir/Patient/p9", json={"resourceType": "Patient",
                                                                 "id": "other"})
    stored = await client.put("/fhir/Encounter/e1", json=encounter("e1", "p1"))
    assert [r.status_code for r in (stale, invalid, refused_patient, stored)] == [
        412, 422, 400, 201]
    rows = [r for r in await entries(runtime) if r.what.startswith("PUT")]
    assert [(r.action, r.patient, r.outcome) for r in rows] == [
        ("U", None, 4), ("U", None, 4), ("U", "p9", 4),  # p9: its URL names it, as before
        ("U", "p1", 0)]


async def test_a_transactions_writes_are_in_each_patients_trail_once_per_action(alpha):
    """Every write entry of a transaction was recorded without a patient (the call's URL is
    /fhir): one entry per patient and action now, beside the call's own."""
    runtime, client = alpha
    await client.put("/fhir/Encounter/old", json=encounter("old", "p3"))
    failing = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": encounter("e1", "p1"), "request": {"method": "PUT", "url": "Encounter/e1"}},
        {"resource": encounter("e2", "p2", status="bogus"),
         "request": {"method": "PUT", "url": "Encounter/e2"}}]}
    assert (await client.post("/fhir", json=failing)).status_code == 422  # stored nothing
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:8a7c1f80-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": condition("p1"), "request": {"method": "POST", "url": "Condition"}},
        {"resource": encounter("e1", "p1"), "request": {"method": "PUT", "url": "Encounter/e1"}},
        {"resource": encounter("e2", "p1"), "request": {"method": "PUT", "url": "Encounter/e2"}},
        {"resource": encounter("e3", "p2"), "request": {"method": "PUT", "url": "Encounter/e3"}},
        {"request": {"method": "DELETE", "url": "Encounter/old"}},
        {"request": {"method": "GET", "url": "Patient/p4"}}]}
    r = await client.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    created = r.json()["entry"][0]["response"]["location"].split("/")[1]
    assert sorted(await trail(runtime, "p1")) == [("POST /fhir", "C", 0), ("POST /fhir", "U", 0)]
    assert await trail(runtime, "p2") == [("POST /fhir", "U", 0)]
    assert await trail(runtime, "p3") == [("PUT /fhir/{rtype}/{rid}", "U", 0),
                                          ("POST /fhir", "D", 0)]
    assert await trail(runtime, created) == [("POST /fhir", "C", 0)]
    assert await trail(runtime, "p4") == [("POST /fhir", "R", 4)]  # a read of nothing: 404
    # The call's own entry names nobody; one entry per patient and action beside it.
    # (the failed transaction's is as it was: the call alone, a failure)
    calls = [r for r in await entries(runtime) if r.what == "POST /fhir"]
    assert [(r.patient, r.action, r.outcome) for r in calls][0] == (None, "C", 4)
    assert sorted((r.patient or "", r.action) for r in calls[1:]) == sorted([
        ("", "C"), ("p1", "C"), ("p1", "U"), ("p2", "U"), ("p3", "D"), (created, "C"),
        ("p4", "R")])
    await seal_all(runtime.db.engine)
    assert [v.ok for v in await verify(runtime.db.engine, "alpha")] == [True]


async def test_a_batchs_writes_that_ran_are_in_their_patients_trails_with_their_outcome(alpha):
    """In a batch each entry stands alone: the writes stored are in their patients' trails;
    one refused (invalid, a version mismatch) or not allowed (the token's scopes) is not."""
    runtime, client = alpha
    await client.put("/fhir/Encounter/e9", json=encounter("e9", "p9"))
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": encounter("e1", "p1"), "request": {"method": "PUT", "url": "Encounter/e1"}},
        {"resource": encounter("e2", "p2", status="bogus"),
         "request": {"method": "PUT", "url": "Encounter/e2"}},
        {"resource": encounter("e9", "p9", status="finished"),
         "request": {"method": "PUT", "url": "Encounter/e9", "ifMatch": 'W/"5"'}},
        {"resource": {"resourceType": "Patient", "id": "p7"},
         "request": {"method": "PUT", "url": "Patient/p7"}}]}
    r = await client.post("/fhir", json=bundle)
    assert [e["response"]["status"][:3] for e in r.json()["entry"]] == [
        "201", "422", "412", "201"]
    assert await trail(runtime, "p1") == [("POST /fhir", "U", 0)]
    assert await trail(runtime, "p7") == [("POST /fhir", "U", 0)]
    assert await trail(runtime, "p2") == []
    assert await trail(runtime, "p9") == [("PUT /fhir/{rtype}/{rid}", "U", 0)]
    reader = await create_token(runtime.db.engine, practice_id="alpha", scopes=("fhir:read",))
    denied = await client.post("/fhir", headers={"Authorization": f"Bearer {reader}"}, json={
        "resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": encounter("e5", "p5"),
             "request": {"method": "PUT", "url": "Encounter/e5"}}]})
    assert denied.json()["entry"][0]["response"]["status"] == "403 Forbidden"
    assert await trail(runtime, "p5") == []
