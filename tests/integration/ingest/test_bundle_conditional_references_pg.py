"""Conditional references to a transaction's own conditional creates, on real PostgreSQL:
concurrent Synthea-style pushes of the same new Patient make one Patient, and every pushed
Encounter names it."""

import asyncio
import uuid

import pytest

from tests.integration.ingest.test_ingest_pg_kafka import ingest  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio(loop_scope="session")
MBI = "http://hl7.org/fhir/sid/us-mbi"
AMB = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}


async def test_concurrent_pushes_of_a_new_patient_and_encounters_naming_it_by_criteria(
        ingest):  # noqa: F811 - the fixture
    """12 transactions at once, each creating the same Patient by ifNoneExist and an Encounter
    of its own naming the Patient by the same criteria: the one whose claim wins creates the
    Patient; the others wait for it, find it, and their Encounters name it (before, the
    winner's reference matched nothing stored: 412)."""
    mbi = uuid.uuid4().hex[:12].upper()
    criteria = f"identifier={MBI}|{mbi}"

    async def push(n: int) -> list[dict]:
        r = await ingest.post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                             "entry": [
            {"resource": {"resourceType": "Encounter", "status": "planned", "class": AMB,
                          "identifier": [{"system": "urn:visit", "value": f"{mbi}-{n}"}],
                          "subject": {"reference": f"Patient?{criteria}"}},
             "request": {"method": "POST", "url": "Encounter"}},
            {"resource": {"resourceType": "Patient",
                          "identifier": [{"system": MBI, "value": mbi}]},
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": criteria}}]})
        assert r.status_code == 200, r.text
        return r.json()["entry"]

    answers = await asyncio.gather(*(push(n) for n in range(12)))
    assert sorted(a[1]["response"]["status"] for a in answers) == \
        ["200 OK"] * 11 + ["201 Created"]
    patients = {a[1]["response"]["location"].split("/")[1] for a in answers}
    assert len(patients) == 1
    (patient,) = patients
    found = await ingest.get("/fhir/Encounter", params={"patient": f"Patient/{patient}",
                                                        "_count": 50})
    assert found.json()["total"] == 12
    assert {e["resource"]["subject"]["reference"] for e in found.json()["entry"]} == \
        {f"Patient/{patient}"}
