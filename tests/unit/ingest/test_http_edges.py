"""ingest's HTTP edges a new integrator runs into: empty conditional headers, an empty media
type, $validate's Parameters form, a resourceType that is no string, and the ingest config's
JSON body (duplicate keys, media types)."""

import json

import pytest

from tests.unit.ingest.conftest import counts

FHIR = {"Content-Type": "application/fhir+json"}
PATIENT = {"resourceType": "Patient", "name": [{"family": "Edge"}], "gender": "female"}


def ccm_encounter(**changes):
    found = {
        "resourceType": "Encounter", "id": "e1", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99490"}]}],
        "subject": {"reference": "Patient/p1"},
        "period": {"start": "2026-03-01T02:30:00Z"},
        "length": {"value": 25, "unit": "min", "system": "http://unitsofmeasure.org",
                   "code": "min"},
    }
    found.update(changes)
    return {k: v for k, v in found.items() if v is not None}


def parameters(*params):
    return {"resourceType": "Parameters", "parameter": list(params)}


def resource_param(resource):
    return {"name": "resource", "resource": resource}


def outcome(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"]


# ---- If-None-Exist, If-Match -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", " ", "\t"])
async def test_an_empty_if_none_exist_is_a_400_not_a_plain_create(fhir, value):
    """``curl -H 'If-None-Exist;'`` sends the header with no criteria: taken as a plain create,
    every retry made another resource, the duplicates the header is there to prevent."""
    before = await counts(fhir)
    r = await fhir.post("/fhir/Patient", json=PATIENT, headers={"If-None-Exist": value})
    issues = outcome(r, 400)
    assert issues[0]["expression"] == ["If-None-Exist"]
    assert "If-None-Exist" in issues[0]["diagnostics"]
    assert await counts(fhir) == before


async def test_a_conditional_create_and_a_plain_one_still_work(fhir):
    criteria = {"If-None-Exist": "identifier=urn:mrn|1"}
    sent = {**PATIENT, "identifier": [{"system": "urn:mrn", "value": "1"}]}
    first = await fhir.post("/fhir/Patient", json=sent, headers=criteria)
    again = await fhir.post("/fhir/Patient", json=sent, headers=criteria)
    assert (first.status_code, again.status_code) == (201, 200), again.text
    assert (await fhir.post("/fhir/Patient", json=PATIENT)).status_code == 201


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_an_empty_if_match_is_a_400_naming_it(fhir, method):
    stored = await fhir.put("/fhir/Patient/p1", json={**PATIENT, "id": "p1"})
    assert stored.status_code == 201, stored.text
    before = await counts(fhir)
    r = await fhir.request(method, "/fhir/Patient/p1", headers={"If-Match": ""},
                           json={**PATIENT, "id": "p1", "gender": "male"} if method == "PUT"
                           else None)
    assert outcome(r, 400)[0]["expression"] == ["If-Match"]
    assert await counts(fhir) == before


# ---- Content-Type --------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [";", "", " ; charset=utf-8", ";fhirVersion=4.0"])
async def test_a_content_type_with_no_media_type_is_a_415(fhir, content_type):
    before = await counts(fhir)
    r = await fhir.post("/fhir/Patient", content=json.dumps(PATIENT),
                        headers={"Content-Type": content_type})
    issues = outcome(r, 415)
    assert issues[0]["code"] == "not-supported"
    assert "no media type" in issues[0]["diagnostics"]
    assert await counts(fhir) == before


async def test_a_body_without_content_type_is_still_read_as_fhir_json(fhir):
    request = fhir.build_request("POST", "/fhir/Patient", content=json.dumps(PATIENT).encode())
    request.headers.pop("Content-Type", None)  # httpx sends none for bytes: made sure
    assert "content-type" not in request.headers
    r = await fhir.send(request)
    assert r.status_code == 201, r.text


# ---- resourceType ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [5, True, ["Patient"], {"x": 1}, None])
async def test_a_resource_type_that_is_no_string_is_not_called_missing(fhir, value):
    r = await fhir.post("/fhir/Patient", json={**PATIENT, "resourceType": value})
    issue = outcome(r, 400)[0]
    assert issue["expression"] == ["resourceType"]
    assert "missing" not in issue["diagnostics"]
    assert "must be a string" in issue["diagnostics"]


# ---- $validate: the Parameters form -------------------------------------------------------------

async def test_validate_takes_the_resource_in_a_parameters_resource(fhir):
    """FHIR's $validate takes the resource as the body or as the parameter ``resource`` of a
    Parameters resource; the answer is the same OperationOutcome."""
    before = await counts(fhir)
    bare = await fhir.post("/fhir/Patient/$validate", json=PATIENT, headers=FHIR)
    wrapped = await fhir.post("/fhir/Patient/$validate", json=parameters(resource_param(PATIENT)),
                              headers=FHIR)
    assert outcome(wrapped, 200) == outcome(bare, 200)
    invalid = {**PATIENT, "gender": "sometimes"}
    bare = await fhir.post("/fhir/Patient/$validate", json=invalid)
    wrapped = await fhir.post("/fhir/Patient/$validate", json=parameters(resource_param(invalid)))
    assert outcome(wrapped, 422) == outcome(bare, 422)
    assert await counts(fhir) == before


async def test_validate_takes_a_bundle_in_a_parameters_resource(fhir):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b0e0f6c-1a2b-4c3d-8e9f-000000000001", "resource": PATIENT,
         "request": {"method": "POST", "url": "Patient"}}]}
    bare = await fhir.post("/fhir/Bundle/$validate", json=bundle)
    wrapped = await fhir.post("/fhir/Bundle/$validate", json=parameters(resource_param(bundle)))
    assert outcome(wrapped, 200) == outcome(bare, 200)
    other = await fhir.post("/fhir/Bundle/$validate", json=parameters(resource_param(PATIENT)))
    issue = outcome(other, 400)[0]
    assert issue["expression"] == ["Parameters.parameter[0].resource.resourceType"]


async def test_validate_takes_the_mode_as_a_parameter(fhir):
    """mode=profile checks the content only: a CCM Encounter without its duration is refused as
    stored (create, the default) and valid as content."""
    no_length = ccm_encounter(length=None)
    created = await fhir.post("/fhir/Encounter/$validate",
                              json=parameters(resource_param(no_length)))
    assert created.status_code == 422, created.text
    profiled = await fhir.post("/fhir/Encounter/$validate", json=parameters(
        resource_param(no_length), {"name": "mode", "valueCode": "profile"}))
    assert outcome(profiled, 200)[0]["severity"] == "information"
    same = await fhir.post("/fhir/Encounter/$validate?mode=profile", json=parameters(
        {"name": "mode", "valueCode": "profile"}, resource_param(no_length)))
    assert same.status_code == 200, same.text
    # mode=update needs the resource's id, in the Parameters form as in the query form
    no_id = await fhir.post("/fhir/Patient/$validate", json=parameters(
        resource_param(PATIENT), {"name": "mode", "valueCode": "update"}))
    assert outcome(no_id, 400)[0]["expression"] == ["Patient.id"]


async def test_validate_refuses_a_mode_given_twice_differently(fhir):
    r = await fhir.post("/fhir/Patient/$validate?mode=create", json=parameters(
        resource_param(PATIENT), {"name": "mode", "valueCode": "profile"}))
    issue = outcome(r, 400)[0]
    assert issue["expression"] == ["Parameters.parameter[1].valueCode"]
    assert "'create'" in issue["diagnostics"] and "'profile'" in issue["diagnostics"]


@pytest.mark.parametrize(("body", "status", "expression"), [
    (parameters(), 400, "Parameters.parameter"),
    (parameters({"name": "mode", "valueCode": "create"}), 400, "Parameters.parameter"),
    ({"resourceType": "Parameters"}, 400, "Parameters.parameter"),
    ({"resourceType": "Parameters", "parameter": {"name": "resource"}}, 400,
     "Parameters.parameter"),
    ({**parameters(resource_param(PATIENT)), "parameters": []}, 400, "Parameters.parameters"),
    (parameters("resource"), 400, "Parameters.parameter[0]"),
    (parameters({"name": "resource", "valueString": "Patient"}), 400,
     "Parameters.parameter[0].valueString"),
    (parameters({"name": "resource"}), 400, "Parameters.parameter[0].resource"),
    (parameters({"name": "resource", "resource": "Patient"}), 400,
     "Parameters.parameter[0].resource"),
    (parameters(resource_param({**PATIENT, "resourceType": "Encounter"})), 400,
     "Parameters.parameter[0].resource.resourceType"),
    (parameters(resource_param({"name": [{"family": "NoType"}]})), 400,
     "Parameters.parameter[0].resource.resourceType"),
    (parameters(resource_param(PATIENT), resource_param(PATIENT)), 400,
     "Parameters.parameter[1]"),
    (parameters(resource_param(PATIENT), {"name": "strict", "valueBoolean": True}), 400,
     "Parameters.parameter[1].name"),
    (parameters(resource_param(PATIENT), {"valueCode": "create"}), 400,
     "Parameters.parameter[1].name"),
    (parameters(resource_param(PATIENT), {"name": "mode", "valueString": "create"}), 400,
     "Parameters.parameter[1].valueString"),
    (parameters(resource_param(PATIENT), {"name": "mode", "valueCode": ""}), 400,
     "Parameters.parameter[1].valueCode"),
    (parameters(resource_param(PATIENT), {"name": "mode", "valueCode": "delete"}), 400,
     "Parameters.parameter[1].valueCode"),
    (parameters(resource_param(PATIENT), {"name": "mode", "valueCode": "nonsense"}), 400,
     "Parameters.parameter[1].valueCode"),
])
async def test_a_parameters_body_validate_cannot_take_is_a_400_naming_its_element(
        fhir, body, status, expression):
    before = await counts(fhir)
    r = await fhir.post("/fhir/Patient/$validate", json=body)
    issues = outcome(r, status)
    assert issues[0]["expression"] == [expression], issues
    assert issues[0]["severity"] == "error"
    assert await counts(fhir) == before


async def test_validate_refuses_a_profile_it_does_not_validate_against(fhir):
    """FHIR: a server that cannot validate against the nominated profile SHALL return an
    error. Here that is every profile but the type's base R4 StructureDefinition."""
    us_core = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"
    r = await fhir.post("/fhir/Patient/$validate", params={"profile": us_core}, json=PATIENT)
    issue = outcome(r, 400)[0]
    assert issue["code"] == "not-supported" and issue["expression"] == ["profile"]
    assert us_core in issue["diagnostics"] and "base FHIR R4" in issue["diagnostics"]
    r = await fhir.post("/fhir/Patient/$validate", json=parameters(
        resource_param(PATIENT), {"name": "profile", "valueUri": us_core}))
    assert outcome(r, 400)[0]["expression"] == ["Parameters.parameter[1].valueUri"]
    r = await fhir.post("/fhir/Patient/$validate?profile=a&profile=b", json=PATIENT)
    assert outcome(r, 400)[0]["expression"] == ["profile"]
    base = "http://hl7.org/fhir/StructureDefinition/Patient"
    for sent in (base, f"{base}|4.0.1"):
        r = await fhir.post("/fhir/Patient/$validate", params={"profile": sent}, json=PATIENT)
        assert r.status_code == 200, r.text
        r = await fhir.post("/fhir/Patient/$validate", json=parameters(
            resource_param(PATIENT), {"name": "profile", "valueUri": sent}))
        assert r.status_code == 200, r.text
    r = await fhir.post("/fhir/Patient/$validate", json=parameters(
        resource_param(PATIENT), {"name": "profile", "valueUri": base}),
        params={"profile": f"{base}|4.0.1"})
    assert outcome(r, 400)[0]["expression"] == ["Parameters.parameter[1].valueUri"]
    r = await fhir.post("/fhir/Encounter/$validate", params={"profile": base},
                        json=ccm_encounter())
    assert outcome(r, 400)[0]["code"] == "not-supported"


# ---- PUT /v1/practices/{p}/ingest-config ---------------------------------------------------------

CONFIG = "/v1/practices/alpha/ingest-config"


def problem(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    assert r.json()["status"] == status
    return r.json()


async def overrides(fhir):
    return (await fhir.get(CONFIG)).json()["overrides"]


async def test_ingest_config_refuses_a_key_given_twice(fhir):
    """Readers differ on which of two values counts (FastAPI's took the last): refused, as
    /fhir refuses it."""
    body = '{"consent_expiring_lead_days": 10, "consent_expiring_lead_days": 20}'
    r = await fhir.put(CONFIG, content=body, headers={"Content-Type": "application/json"})
    assert "'consent_expiring_lead_days'" in problem(r, 400)["detail"]
    assert await overrides(fhir) == {}
    nested = '{"chronic_codes": ["http://x|1"], "x": {"a": 1, "a": 2}}'
    r = await fhir.put(CONFIG, content=nested, headers={"Content-Type": "application/json"})
    problem(r, 400)
    assert await overrides(fhir) == {}


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "application/xml", ";", "", None,
    "application/json; charset=utf-16", "application/jsonx",
])
async def test_ingest_config_refuses_a_body_that_is_not_labelled_json_with_415(
        fhir, content_type):
    """text/plain was a 422 "Input should be a valid dictionary"; none at all stays refused
    (FastAPI's strict default, which the platform's other JSON APIs apply), now as a 415."""
    request = fhir.build_request("PUT", CONFIG,
                                 content=json.dumps({"consent_expiring_lead_days": 10}).encode())
    if content_type is None:
        request.headers.pop("Content-Type", None)
    else:
        request.headers["Content-Type"] = content_type
    problem(await fhir.send(request), 415)
    assert await overrides(fhir) == {}


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=UTF-8", "Application/JSON",
])
async def test_ingest_config_takes_a_body_labelled_json(fhir, content_type):
    r = await fhir.put(CONFIG, content=json.dumps({"consent_expiring_lead_days": 10}),
                       headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    assert await overrides(fhir) == {"consent_expiring_lead_days": 10}


@pytest.mark.parametrize(("body", "status"), [
    ("{", 400), ("", 400), ('{"consent_expiring_lead_days": NaN}', 400), (b"\xff{}", 400),
    ("[]", 422), ('"text"', 422), ('{"nope": 1}', 422),
    ("[" * 100 + "]" * 100, 400),
])
async def test_ingest_config_answers_bodies_it_cannot_take_with_problem_json(fhir, body, status):
    r = await fhir.put(CONFIG, content=body, headers={"Content-Type": "application/json"})
    problem(r, status)
    assert await overrides(fhir) == {}


async def test_ingest_config_authenticates_before_it_reads_the_body(fhir):
    r = await fhir.put(CONFIG, content="x", headers={"Content-Type": "text/plain",
                                                     "Authorization": "Bearer ccm_wrong"})
    problem(r, 401)


@pytest.mark.parametrize(("accept", "answered"), [
    ("application/fhir+json;q=0, application/json", "application/json"),
    ("application/fhir+json; q=0.0, application/json+fhir;q=0.5", "application/json+fhir"),
    ("application/json", "application/fhir+json"),  # FHIR JSON is JSON: as always
    ("application/fhir+json;q=0.5, application/json", "application/fhir+json"),
    ("*/*", "application/fhir+json"),
    ("application/fhir+json;q=0, */*", "application/json"),  # anything but FHIR JSON
    ("application/fhir+json;q=0, application/*", "application/json"),
])
async def test_an_answer_is_labelled_with_a_json_type_the_client_takes(fhir, accept, answered):
    """RFC 9110 §12.5.1: a client refusing application/fhir+json (q=0) but taking plain JSON
    got the same JSON labelled with the type it refused."""
    r = await fhir.get("/fhir/metadata", headers={"Accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] == answered
    assert r.json()["resourceType"] == "CapabilityStatement"
