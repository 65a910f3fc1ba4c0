"""Transaction and batch Bundles: conditional references to the Bundle's own conditional creates
and updates, and the Bundle's invariants (bdl-1, bdl-2, bdl-4, fullUrl, request) refused with
a 422 naming the element, nothing written. On the embedded database."""

import pytest

from tests.unit.ingest.conftest import counts, events
from tests.unit.ingest.test_fhir_api import ccm_encounter

MBI = "http://hl7.org/fhir/sid/us-mbi"
AMB = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
PATIENT_UUID = "urn:uuid:5c0a3f6e-2b1d-4c8e-9f7a-1d2e3f4a5b6c"


def mbi_patient(value: str) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": MBI, "value": value}]}


def transaction(*entries: dict, kind: str = "transaction", **more) -> dict:
    return {"resourceType": "Bundle", "type": kind, **more, "entry": list(entries)}


def synthea_bundle(mbi: str = "NEWPAT1") -> dict:
    """What Synthea and EHR bulk pushes send: the Patient by ifNoneExist on its MBI, and an
    Encounter (itself a conditional create on its visit number) naming the Patient by the same
    criteria, not by the Patient's fullUrl."""
    encounter = {**ccm_encounter(), "identifier": [{"system": "urn:visit", "value": f"v-{mbi}"}],
                 "subject": {"reference": f"Patient?identifier={MBI}|{mbi}"}}
    del encounter["id"]
    return transaction(
        {"fullUrl": PATIENT_UUID, "resource": mbi_patient(mbi),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MBI}|{mbi}"}},
        {"fullUrl": "urn:uuid:7d1b4e2a-3c5f-4a6b-8c9d-0e1f2a3b4c5d", "resource": encounter,
         "request": {"method": "POST", "url": "Encounter",
                     "ifNoneExist": f"identifier=urn:visit|v-{mbi}"}})


def stored_id(entry: dict, rtype: str) -> str:
    """The id a transaction-response entry's location names."""
    location = entry["response"]["location"]
    assert location.startswith(f"{rtype}/"), location
    return location.split("/")[1]


async def read(fhir, rtype: str, rid: str) -> dict:
    r = await fhir.get(f"/fhir/{rtype}/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


# ---- conditional references to the Bundle's own conditional creates and updates --------------

async def test_a_conditional_reference_names_the_patient_its_transaction_creates(fhir):
    """The Synthea-style push: the Patient does not exist yet, so no search could find it; the
    reference has the criteria of the Patient's ifNoneExist and so names that Patient."""
    r = await fhir.post("/fhir", json=synthea_bundle())
    assert r.status_code == 200, r.text
    patient_entry, encounter_entry = r.json()["entry"]
    assert [e["response"]["status"] for e in (patient_entry, encounter_entry)] == \
        ["201 Created", "201 Created"]
    patient = stored_id(patient_entry, "Patient")
    encounter = await read(fhir, "Encounter", stored_id(encounter_entry, "Encounter"))
    assert encounter["subject"] == {"reference": f"Patient/{patient}"}
    assert (await read(fhir, "Patient", patient))["identifier"][0]["value"] == "NEWPAT1"
    # The CCM time is the new patient's.
    (logged,) = await events(fhir, "ingest.time-entry.logged.v1")
    assert logged["subject"] == f"Patient/{patient}"
    after_first = await counts(fhir)
    assert after_first["resources"] == 2

    # Pushed again: both conditional creates find their resources; nothing new is written.
    again = await fhir.post("/fhir", json=synthea_bundle())
    assert again.status_code == 200, again.text
    assert [e["response"]["status"] for e in again.json()["entry"]] == ["200 OK", "200 OK"]
    assert [stored_id(e, t) for e, t in zip(again.json()["entry"], ("Patient", "Encounter"),
                                            strict=True)] == \
        [patient, stored_id(encounter_entry, "Encounter")]
    assert await counts(fhir) == after_first


async def test_a_conditional_reference_is_resolved_before_the_entry_it_names_is_listed(fhir):
    """Order in the Bundle does not matter (FHIR processes POSTs before PUTs, and references
    are resolved once every id is settled): the Encounter comes first and is a PUT."""
    bundle = synthea_bundle("NEWPAT3")
    patient, encounter = bundle["entry"]
    encounter["resource"]["id"] = "enc-3"
    encounter["request"] = {"method": "PUT", "url": "Encounter/enc-3"}
    bundle["entry"] = [encounter, patient]
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    made = stored_id(r.json()["entry"][1], "Patient")
    assert (await read(fhir, "Encounter", "enc-3"))["subject"]["reference"] == f"Patient/{made}"


async def test_criteria_that_mean_the_same_after_normalising_name_the_same_entry(fhir):
    """The reference's criteria are compared with the entry's as conditional creates' claims
    are: parameters in another order, the patient as this server's URL or as ``Patient/id``."""
    assert (await fhir.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
            ).status_code == 201
    visit = {**ccm_encounter(), "identifier": [{"system": "urn:visit", "value": "v-n"}],
             "status": "in-progress"}
    del visit["id"]
    follow_up = {"resourceType": "Encounter", "status": "planned", "class": AMB,
                 "subject": {"reference": "Patient/p1"},
                 "partOf": {"reference": "Encounter?patient=Patient/p1&identifier=urn:visit|v-n"}}
    r = await fhir.post("/fhir", json=transaction(
        {"resource": visit, "request": {
            "method": "POST", "url": "Encounter",
            "ifNoneExist": "identifier=urn:visit|v-n&patient=http://test/fhir/Patient/p1"}},
        {"resource": follow_up, "request": {"method": "POST", "url": "Encounter"}}))
    assert r.status_code == 200, r.text
    first, second = r.json()["entry"]
    stored = await read(fhir, "Encounter", stored_id(second, "Encounter"))
    assert stored["partOf"]["reference"] == f"Encounter/{stored_id(first, 'Encounter')}"


@pytest.mark.parametrize("stored_before", [False, True])
async def test_a_conditional_reference_names_what_a_conditional_update_settles(fhir,
                                                                               stored_before):
    """``PUT Patient?identifier=…``: the reference names the Patient it creates when nothing
    matched, else the stored Patient it updates (the stored match and the entry are then one
    resource, so the reference matches one, not two)."""
    if stored_before:
        assert (await fhir.put("/fhir/Patient/known", json={**mbi_patient("NEWPAT2"),
                                                            "id": "known"})).status_code == 201
    encounter = {"resourceType": "Encounter", "status": "planned", "class": AMB,
                 "subject": {"reference": f"Patient?identifier={MBI}|NEWPAT2"}}
    r = await fhir.post("/fhir", json=transaction(
        {"resource": encounter, "request": {"method": "POST", "url": "Encounter"}},
        {"resource": {**mbi_patient("NEWPAT2"), "active": True},
         "request": {"method": "PUT", "url": f"Patient?identifier={MBI}|NEWPAT2"}}))
    assert r.status_code == 200, r.text
    made, updated = r.json()["entry"]
    assert updated["response"]["status"] == ("200 OK" if stored_before else "201 Created")
    patient = stored_id(updated, "Patient")
    if stored_before:
        assert patient == "known"
    stored = await read(fhir, "Encounter", stored_id(made, "Encounter"))
    assert stored["subject"]["reference"] == f"Patient/{patient}"
    assert (await read(fhir, "Patient", patient))["active"] is True
    found = (await fhir.get("/fhir/Patient", params={"identifier": f"{MBI}|NEWPAT2"})).json()
    assert found["total"] == 1


async def test_a_conditional_reference_names_what_replaces_a_patient_the_transaction_deletes(
        fhir):
    """The transaction deletes the stored Patient and creates it anew by ifNoneExist (FHIR
    processes DELETEs first): the reference names the new Patient, as its fullUrl would."""
    assert (await fhir.put("/fhir/Patient/old", json={**mbi_patient("NEWPAT4"), "id": "old"})
            ).status_code == 201
    bundle = synthea_bundle("NEWPAT4")
    bundle["entry"].insert(0, {"request": {"method": "DELETE", "url": "Patient/old"}})
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    deleted, created, encounter = r.json()["entry"]
    assert deleted["response"]["status"] == "204 No Content"
    new = stored_id(created, "Patient")
    assert new != "old"
    stored = await read(fhir, "Encounter", stored_id(encounter, "Encounter"))
    assert stored["subject"]["reference"] == f"Patient/{new}"


@pytest.mark.parametrize(("reference", "entry_criteria"), [
    # nothing stored, no entry with these criteria
    (f"Patient?identifier={MBI}|NOBODY", f"identifier={MBI}|NEWPAT5"),
    # criteria are compared, not evaluated: the entry's Patient would match, but the
    # reference's criteria (any system) are not the entry's
    ("Patient?identifier=NEWPAT5", f"identifier={MBI}|NEWPAT5"),
    # the same criteria on another type name another resource
    (f"Patient?identifier={MBI}|NEWPAT5", None),
])
async def test_a_conditional_reference_that_matches_nothing_fails_the_transaction(
        fhir, reference, entry_criteria):
    first = ({"resource": mbi_patient("NEWPAT5"), "request": {
        "method": "POST", "url": "Patient", "ifNoneExist": entry_criteria}}
        if entry_criteria else
        {"resource": {"resourceType": "Practitioner",
                      "identifier": [{"system": MBI, "value": "NEWPAT5"}]},
         "request": {"method": "POST", "url": "Practitioner",
                     "ifNoneExist": f"identifier={MBI}|NEWPAT5"}})
    encounter = {"resourceType": "Encounter", "status": "planned", "class": AMB,
                 "subject": {"reference": reference}}
    r = await fhir.post("/fhir", json=transaction(
        first, {"resource": encounter, "request": {"method": "POST", "url": "Encounter"}}))
    assert r.status_code == 412, r.text
    (issue,) = r.json()["issue"]
    assert issue["code"] == "not-found"
    assert "matches 0 resources" in issue["diagnostics"]
    assert issue["expression"] == ["Bundle.entry[1].resource.subject.reference"]
    assert await counts(fhir) == {"resources": 0, "versions": 0, "events": 0}


async def test_a_conditional_reference_matching_several_stored_resources_fails(fhir):
    for rid in ("twin-a", "twin-b"):
        assert (await fhir.put(f"/fhir/Patient/{rid}", json={**mbi_patient("TWIN"), "id": rid})
                ).status_code == 201
    before = await counts(fhir)
    encounter = {"resourceType": "Encounter", "status": "planned", "class": AMB,
                 "subject": {"reference": f"Patient?identifier={MBI}|TWIN"}}
    r = await fhir.post("/fhir", json=transaction(
        {"resource": encounter, "request": {"method": "POST", "url": "Encounter"}}))
    assert r.status_code == 412, r.text
    (issue,) = r.json()["issue"]
    assert issue["code"] == "multiple-matches" and "matches 2 resources" in issue["diagnostics"]
    assert await counts(fhir) == before


async def test_a_batch_still_resolves_each_entrys_references_when_that_entry_runs(fhir):
    """Batch entries are independent and run in Bundle order, each committed: a reference
    finds a Patient an earlier entry created, not one a later entry creates."""
    encounter = {"resourceType": "Encounter", "status": "planned", "class": AMB,
                 "subject": {"reference": f"Patient?identifier={MBI}|BATCH1"}}
    patient = {"resource": mbi_patient("BATCH1"), "request": {
        "method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MBI}|BATCH1"}}
    refers = {"resource": encounter, "request": {"method": "POST", "url": "Encounter"}}
    r = await fhir.post("/fhir", json=transaction(refers, patient, refers, kind="batch"))
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["412 Precondition Failed", "201 Created", "201 Created"]


# ---- Bundle invariants and request checks ------------------------------------------------------

ENTRY = {"fullUrl": PATIENT_UUID, "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}}


@pytest.mark.parametrize("kind", ["transaction", "batch"])
@pytest.mark.parametrize(("bundle", "expression", "says"), [
    (lambda kind: transaction(ENTRY, kind=kind, total=1), "Bundle.total", "bdl-1"),
    (lambda kind: transaction({**ENTRY, "search": {"mode": "match"}}, kind=kind),
     "Bundle.entry[0].search", "bdl-2"),
    (lambda kind: transaction({**ENTRY, "response": {"status": "201 Created"}}, kind=kind),
     "Bundle.entry[0].response", "bdl-4"),
], ids=["total", "entry.search", "entry.response"])
async def test_a_bundle_breaking_its_invariants_is_refused_whole(fhir, kind, bundle, expression,
                                                                 says):
    """bdl-1 (total only in a searchset or history), bdl-2 (entry.search only in a searchset),
    bdl-4 (entry.response only in a response or history Bundle): a transaction or batch with
    them is no valid Bundle, refused whole (a batch too), by $validate alike."""
    for path in ("/fhir", "/fhir/Bundle/$validate"):
        r = await fhir.post(path, json=bundle(kind))
        assert r.status_code == 422, (path, r.text)
        (issue,) = r.json()["issue"]
        assert issue["code"] == "invariant"
        assert issue["expression"] == [expression]
        assert says in issue["diagnostics"] and repr(kind) in issue["diagnostics"]
    assert await counts(fhir) == {"resources": 0, "versions": 0, "events": 0}


async def test_every_broken_invariant_is_reported_at_once(fhir):
    r = await fhir.post("/fhir", json=transaction(
        {**ENTRY, "response": {"status": "201 Created"}},
        {**ENTRY, "fullUrl": "urn:uuid:not-a-uuid", "search": {"mode": "match"}}, total=2))
    assert r.status_code == 422, r.text
    assert [i["expression"] for i in r.json()["issue"]] == [
        ["Bundle.total"], ["Bundle.entry[0].response"], ["Bundle.entry[1].search"],
        ["Bundle.entry[1].fullUrl"]]


@pytest.mark.parametrize("full_url", [
    "urn:uuid:not-a-uuid",
    "urn:uuid:5c0a3f6e-2b1d-4c8e-9f7a-1d2e3f4a5b6",  # one digit short
    "urn:uuid:5c0a3f6e-2b1d-4c8e-9f7a-1d2e3f4a5b6c7",  # one too many
    "urn:uuid:5c0a3f6e2b1d4c8e9f7a1d2e3f4a5b6c",  # no hyphens
    "urn:uuid:{5c0a3f6e-2b1d-4c8e-9f7a-1d2e3f4a5b6c}",
    "urn:uuid:5c0a3f6e-2b1d-4c8e-9f7a-1d2e3f4a5b6c\n",
    "urn:uuid:",
    "urn:oid:",
    "urn:oid:1",  # an OID has at least two arcs
    "urn:oid:3.1",  # the first arc is 0, 1 or 2
    "urn:oid:1.02",  # no leading zeros
    "urn:oid:1.2.",
    "urn:oid:1.2.x",
    "urn:oid:١.٢",  # digits of another script
])
async def test_a_urn_full_url_must_be_a_uuid_or_an_oid(fhir, full_url):
    r = await fhir.post("/fhir", json=transaction({**ENTRY, "fullUrl": full_url}))
    assert r.status_code == 422, r.text
    (issue,) = r.json()["issue"]
    assert issue["expression"] == ["Bundle.entry[0].fullUrl"]
    kind = "UUID" if full_url.startswith("urn:uuid:") else "OID"
    assert f"followed by an {kind}" in issue["diagnostics"] or \
        f"followed by a {kind}" in issue["diagnostics"]
    assert await counts(fhir) == {"resources": 0, "versions": 0, "events": 0}


@pytest.mark.parametrize("full_url", [
    "urn:uuid:5c0a3f6e-2b1d-4c8e-9f7a-1d2e3f4a5b6c",
    "urn:uuid:5C0A3F6E-2B1D-4C8E-9F7A-1D2E3F4A5B6C",  # RFC 4122: case-insensitive on input
    "urn:oid:1.2.840.113619.6.197",
    "urn:oid:2.0",
    "http://example.org/fhir/Patient/123",
])
async def test_a_well_formed_full_url_is_referred_to_and_resolved(fhir, full_url):
    condition = {"resourceType": "Condition", "subject": {"reference": full_url},
                 "code": {"text": "Hypertension"}}
    r = await fhir.post("/fhir", json=transaction(
        {**ENTRY, "fullUrl": full_url},
        {"resource": condition, "request": {"method": "POST", "url": "Condition"}}))
    assert r.status_code == 200, r.text
    patient, made = r.json()["entry"]
    stored = await read(fhir, "Condition", stored_id(made, "Condition"))
    assert stored["subject"]["reference"] == f"Patient/{stored_id(patient, 'Patient')}"


async def test_a_full_url_of_another_urn_scheme_is_not_checked_here(fhir):
    r = await fhir.post("/fhir", json=transaction({**ENTRY, "fullUrl": "urn:ietf:rfc:3986"}))
    assert r.status_code == 200, r.text


async def test_a_batch_entry_with_a_malformed_full_url_fails_alone(fhir):
    r = await fhir.post("/fhir", json=transaction(
        {**ENTRY, "fullUrl": "urn:uuid:1"}, ENTRY, kind="batch"))
    assert r.status_code == 200, r.text
    bad, good = r.json()["entry"]
    assert bad["response"]["status"] == "422 Unprocessable Entity"
    assert bad["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[0].fullUrl"]
    assert good["response"]["status"] == "201 Created"


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("sent", [{}, {"resource": None}], ids=["absent", "null"])
async def test_a_create_or_update_without_its_resource_says_so(fhir, method, sent):
    url = "Patient" if method == "POST" else "Patient/p1"
    entry = {"request": {"method": method, "url": url}, **sent}
    r = await fhir.post("/fhir", json=transaction(entry))
    assert r.status_code == 422, r.text
    (issue,) = r.json()["issue"]
    assert issue["code"] == "required"
    assert "Bundle.entry[0].resource is required for POST/PUT" in issue["diagnostics"]
    assert issue["expression"] == ["Bundle.entry[0].resource"]
    # in a batch that entry alone
    r = await fhir.post("/fhir", json=transaction(entry, ENTRY, kind="batch"))
    assert [e["response"]["status"] for e in r.json()["entry"]] == \
        ["422 Unprocessable Entity", "201 Created"]


async def test_a_delete_or_get_needs_no_resource(fhir):
    r = await fhir.post("/fhir", json=transaction(
        {"request": {"method": "DELETE", "url": "Patient/p1"}},
        {"request": {"method": "GET", "url": "Patient/p1"}}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("method", "url"), [
    ("POST", "http://test/fhir/Patient"),  # even this server's own base
    ("PUT", "https://other.example/fhir/Patient/p1"),
    ("PUT", "http://test/fhir/Patient?identifier=urn:mrn|1"),
    ("DELETE", "urn:uuid:5c0a3f6e-2b1d-4c8e-9f7a-1d2e3f4a5b6c"),
    ("GET", "http://test/fhir/Patient/p1"),
])
async def test_an_absolute_request_url_is_refused_as_not_relative(fhir, method, url):
    entry = {"request": {"method": method, "url": url}}
    if method in ("POST", "PUT"):
        entry["resource"] = {"resourceType": "Patient", "id": "p1"}
    r = await fhir.post("/fhir", json=transaction(entry))
    assert r.status_code == 422, r.text
    (issue,) = r.json()["issue"]
    assert issue["expression"] == ["Bundle.entry[0].request.url"]
    assert "is relative to the base" in issue["diagnostics"]
    assert "Type, Type/id or Type?criteria" in issue["diagnostics"]
    assert "'http:'" not in issue["diagnostics"]
    assert await counts(fhir) == {"resources": 0, "versions": 0, "events": 0}


async def test_criteria_holding_a_url_are_still_relative(fhir):
    r = await fhir.post("/fhir", json=transaction(
        {"resource": mbi_patient("URL1"),
         "request": {"method": "PUT", "url": f"Patient?identifier={MBI}|URL1"}}))
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["status"] == "201 Created"


@pytest.mark.parametrize("criteria", ["", "   "])
async def test_an_empty_if_none_exist_in_an_entry_is_refused_not_a_plain_create(fhir, criteria):
    """It made a plain create: every push of the Bundle another Patient."""
    entry = {**ENTRY, "request": {**ENTRY["request"], "ifNoneExist": criteria}}
    r = await fhir.post("/fhir", json=transaction(entry))
    assert r.status_code == 422, r.text
    issue = r.json()["issue"][0]
    assert issue["expression"] == ["Bundle.entry[0].request.ifNoneExist"]
    assert "non-empty" in issue["diagnostics"]
    assert (await counts(fhir))["versions"] == 0


async def test_a_reference_names_an_entry_only_when_the_entry_meets_its_criteria(fhir):
    """A Patient created by ifNoneExist on MBI AAA but carrying MBI BBB: a reference to
    identifier AAA named it (the Encounter's time went to a patient its criteria never named,
    and every push made another); later it was searched for instead and matched nothing
    (412). Now the Patient's own entry is refused first: it would create what its criteria
    miss (test_conditional_criteria_met)."""
    bundle = synthea_bundle("AAA")
    index, patient = next((i, e) for i, e in enumerate(bundle["entry"])
                          if e["resource"]["resourceType"] == "Patient")
    patient["resource"]["identifier"] = [{**patient["resource"]["identifier"][0], "value": "BBB"}]
    r = await fhir.post("/fhir", json=bundle)
    assert r.status_code == 400, r.text
    issue = r.json()["issue"][0]
    assert issue["expression"] == [f"Bundle.entry[{index}].request.ifNoneExist"]
    assert "does not meet identifier=" in issue["diagnostics"]
    assert (await counts(fhir))["versions"] == 0
