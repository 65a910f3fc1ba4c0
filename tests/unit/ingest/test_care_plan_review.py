"""CarePlan review evidence: the platform's care-plan-review extension on a pushed CarePlan
version becomes ``review {date, reviewer}`` on the care-plan events (careplan restarts the plan's
review clock on it); a malformed one is refused with an OperationOutcome naming the element."""

import pytest

from ccm_ingest.domain.rules import REVIEW_EXTENSION
from tests.unit.ingest.conftest import counts, events

PLATFORM = "https://ccm-platform.org/fhir/CodeSystem/ccm"


def review(*subs: dict, **extra) -> dict:
    return {"url": REVIEW_EXTENSION, "extension": list(subs), **extra}


DATE = {"url": "date", "valueDateTime": "2026-03-10T23:30:00-04:00"}  # 10 March in New York
REVIEWER = {"url": "reviewer", "valueReference": {"reference": "Practitioner/dr-ames"}}


def care_plan(*extensions: dict, status: str = "active", **extra) -> dict:
    return {
        "resourceType": "CarePlan", "status": status, "intent": "plan",
        "category": [{"coding": [{"system": PLATFORM, "code": "ccm-care-plan"}]}],
        "subject": {"reference": "Patient/p1"}, "created": "2026-02-01",
        **({"extension": list(extensions)} if extensions else {}), **extra,
    }


async def test_review_evidence_reaches_the_created_and_revised_events(fhir):
    created = await fhir.put("/fhir/CarePlan/cp1", json={
        **care_plan(review(DATE, REVIEWER)), "id": "cp1"})
    assert created.status_code == 201, created.text
    (event,) = await events(fhir, "ingest.care-plan.created.v1")
    assert event["data"]["review"] == {"date": "2026-03-10", "reviewer": "Practitioner/dr-ames"}
    # Offset and time zone: 01:30 UTC on 11 March is still 10 March in New York.
    later = {"url": "date", "valueDateTime": "2026-03-14T01:30:00Z"}
    revised = await fhir.put("/fhir/CarePlan/cp1", json={
        **care_plan(review(later), description="fewer visits"), "id": "cp1"})
    assert revised.status_code == 200, revised.text
    (event,) = await events(fhir, "ingest.care-plan.revised.v1")
    assert event["data"]["review"] == {"date": "2026-03-13", "reviewer": None}
    plain = await fhir.put("/fhir/CarePlan/cp1", json={**care_plan(), "id": "cp1"})
    assert plain.status_code == 200
    assert (await events(fhir, "ingest.care-plan.revised.v1"))[-1]["data"]["review"] is None


async def test_a_closing_version_can_carry_its_review_and_the_stored_version_keeps_it(fhir):
    r = await fhir.post("/fhir/CarePlan", json=care_plan(
        review({"url": "date", "valueDateTime": "2026-03-01"}), status="completed"))
    assert r.status_code == 201, r.text
    (event,) = await events(fhir, "ingest.care-plan.closed.v1")
    assert event["data"]["review"] == {"date": "2026-03-01", "reviewer": None}
    stored = (await fhir.get(f"/fhir/CarePlan/{r.json()['id']}")).json()
    assert stored["extension"][0]["url"] == REVIEW_EXTENSION


MALFORMED = [
    ("two review extensions", [review(DATE), review(DATE)], "invariant",
     "CarePlan.extension[1]"),
    ("a value on the complex extension", [review(DATE, valueString="yes")], "structure",
     "CarePlan.extension[0].valueString"),
    ("no date", [review(REVIEWER)], "required", "CarePlan.extension[0].extension"),
    ("two dates", [review(DATE, DATE)], "required", "CarePlan.extension[0].extension"),
    ("valueDate instead of valueDateTime", [review({"url": "date", "valueDate": "2026-03-10"})],
     "value", "CarePlan.extension[0].extension[0].valueDate"),
    ("only a month", [review({"url": "date", "valueDateTime": "2026-03"})], "value",
     "CarePlan.extension[0].extension[0].valueDateTime"),
    ("a Patient as reviewer", [review(DATE, {"url": "reviewer",
                                             "valueReference": {"reference": "Patient/p1"}})],
     "value", "CarePlan.extension[0].extension[1].valueReference"),
    ("a reviewer without a reference", [review(DATE, {"url": "reviewer",
                                                      "valueReference": {"display": "Dr A"}})],
     "value", "CarePlan.extension[0].extension[1].valueReference"),
    ("two reviewers", [review(DATE, REVIEWER, REVIEWER)], "invariant",
     "CarePlan.extension[0].extension[2]"),
    ("an unknown sub-extension", [review(DATE, {"url": "signature", "valueString": "x"})],
     "structure", "CarePlan.extension[0].extension[1].url"),
    ("a review after the version was received (the clock is 15 March)",
     [review({"url": "date", "valueDateTime": "2026-03-16T09:00:00-04:00"})], "business-rule",
     "CarePlan.extension[0].extension[0].valueDateTime"),
]


@pytest.mark.parametrize("case,extensions,code,expression", MALFORMED,
                         ids=[m[0] for m in MALFORMED])
async def test_malformed_review_evidence_is_refused_precisely_and_writes_nothing(
        fhir, case, extensions, code, expression):
    before = await counts(fhir)
    r = await fhir.post("/fhir/CarePlan", json=care_plan(*extensions))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert [(i["code"], i["expression"]) for i in body["issue"]] == [(code, [expression])]
    assert await counts(fhir) == before


async def test_validate_reports_a_malformed_review_without_storing(fhir):
    r = await fhir.post("/fhir/CarePlan/$validate", json=care_plan(review(REVIEWER)))
    assert r.status_code == 422
    assert r.json()["issue"][0]["expression"] == ["CarePlan.extension[0].extension"]


async def test_a_bundle_reviewer_resolves_from_its_full_url_or_fails_at_its_entry(fhir):
    doctor, patient = "urn:uuid:0b8b2a4e-3f8e-4c55-9d35-6f1f0d2f1a01", \
        "urn:uuid:0b8b2a4e-3f8e-4c55-9d35-6f1f0d2f1a02"

    def bundle(reviewer: str) -> dict:
        return {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": doctor, "request": {"method": "POST", "url": "Practitioner"},
             "resource": {"resourceType": "Practitioner", "name": [{"family": "Ames"}]}},
            {"fullUrl": patient, "request": {"method": "POST", "url": "Patient"},
             "resource": {"resourceType": "Patient"}},
            {"request": {"method": "POST", "url": "CarePlan"}, "resource": {
                **care_plan(review(DATE, {"url": "reviewer",
                                          "valueReference": {"reference": reviewer}})),
                "subject": {"reference": patient}}},
        ]}

    before = await counts(fhir)
    wrong = await fhir.post("/fhir", json=bundle(patient))  # the Patient's fullUrl
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["issue"][0]["expression"] == [
        "Bundle.entry[2].resource.extension[0].extension[1].valueReference"]
    assert await counts(fhir) == before
    ok = await fhir.post("/fhir", json=bundle(doctor))
    assert ok.status_code == 200, ok.text
    doctor_id = ok.json()["entry"][0]["response"]["location"].split("/")[1]
    (event,) = await events(fhir, "ingest.care-plan.created.v1")
    assert event["data"]["review"] == {"date": "2026-03-10",
                                       "reviewer": f"Practitioner/{doctor_id}"}
