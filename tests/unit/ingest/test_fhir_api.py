"""The /fhir endpoint on the embedded database: writes, versions, reads, tenancy, Prefer."""

import json
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import pytest
from sqlalchemy import update

from ccm_ingest.adapters import orm
from ccm_shared import fhir_dates
from tests.unit.ingest.conftest import as_practice, counts, events, example

FHIR = {"Content-Type": "application/fhir+json"}


def ccm_encounter(rid="e1", status="finished", minutes=25, start="2026-03-01T02:30:00Z"):
    return {
        "resourceType": "Encounter", "id": rid, "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99490"}]}],
        "subject": {"reference": "Patient/p1"},
        "period": {"start": start},
        "length": {"value": minutes, "unit": "min", "system": "http://unitsofmeasure.org",
                   "code": "min"},
    }


async def test_create_answers_201_with_location_etag_and_last_modified(fhir):
    r = await fhir.post("/fhir/Patient", json=example("Patient/r4spec-example.json"),
                        headers=FHIR)
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"] == f"http://test/fhir/Patient/{body['id']}/_history/1"
    assert r.headers["last-modified"].endswith("GMT")
    assert parsedate_to_datetime(r.headers["last-modified"]) == datetime.fromisoformat(
        body["meta"]["lastUpdated"]).replace(microsecond=0)
    assert body["meta"]["versionId"] == "1" and body["id"] != "example"
    read = await fhir.get(f"/fhir/Patient/{body['id']}")
    assert read.status_code == 200 and read.json() == body


async def test_each_location_names_the_host_the_request_came_to(fhir):
    """The base of Location is remembered per scheme, server, root path and Host header."""
    urls = []
    for host in ["a.example", "b.example:8443", "a.example", "test"]:
        r = await fhir.post("/fhir/Patient", json=example("Patient/r4spec-example.json"),
                            headers={**FHIR, "Host": host})
        urls.append(r.headers["location"].rsplit("/Patient/", 1)[0])
    assert urls == ["http://a.example/fhir", "http://b.example:8443/fhir", "http://a.example/fhir",
                    "http://test/fhir"]


async def test_a_trailing_slash_is_the_same_url_not_a_redirect(fhir):
    """An EHR configured with the base ``…/fhir/`` posts its transactions to that very URL."""
    created = await fhir.post("/fhir/Patient/", json=example("Patient/r4spec-example.json"),
                              headers=FHIR, follow_redirects=False)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    assert created.headers["location"] == f"http://test/fhir/Patient/{rid}/_history/1"
    for path in (f"/fhir/Patient/{rid}/", "/fhir/metadata/", f"/fhir/Patient/{rid}/_history/"):
        r = await fhir.get(path, follow_redirects=False)
        assert r.status_code == 200, (path, r.text)
    batch = await fhir.post("/fhir/", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{rid}"}}]}, headers=FHIR,
        follow_redirects=False)
    assert batch.status_code == 200 and batch.json()["entry"][0]["response"]["status"] == "200 OK"
    found = await fhir.get("/fhir/Patient/", params={"_id": rid}, follow_redirects=False)
    assert found.status_code == 200 and found.json()["total"] == 1
    # An encoded slash is part of the id, not a trailing slash: not this Patient.
    encoded = await fhir.delete(f"/fhir/Patient/{rid}%2F", follow_redirects=False)
    assert encoded.status_code != 204
    assert (await fhir.get(f"/fhir/Patient/{rid}")).status_code == 200


async def test_same_content_pushed_three_times_is_one_version_and_one_event(fhir):
    patient = example("Patient/r4spec-example.json")
    statuses = [(await fhir.put("/fhir/Patient/example", json=patient)).status_code
                for _ in range(3)]
    assert statuses == [201, 200, 200]
    history = (await fhir.get("/fhir/Patient/example/_history")).json()
    assert history["total"] == 1
    assert len(await events(fhir, "ingest.patient.upserted.v1")) == 1


async def test_changed_content_is_a_new_version_and_history_keeps_both(fhir):
    patient = example("Patient/r4spec-example.json")
    await fhir.put("/fhir/Patient/example", json=patient)
    r = await fhir.put("/fhir/Patient/example", json={**patient, "active": False})
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"'
    history = (await fhir.get("/fhir/Patient/example/_history")).json()
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"', 'W/"1"']
    v1 = await fhir.get("/fhir/Patient/example/_history/1")
    assert v1.json()["active"] is True
    upserts = await events(fhir, "ingest.patient.upserted.v1")
    assert [e["data"]["active"] for e in upserts] == [True, False]
    assert upserts[0]["data"]["source"]["connection"] == "ehr-alpha"


async def test_out_of_order_version_is_kept_but_newest_state_wins(fhir):
    newer = {**ccm_encounter(minutes=30), "meta": {"lastUpdated": "2026-03-02T10:00:00Z"}}
    older = {**ccm_encounter(minutes=10), "meta": {"lastUpdated": "2026-03-01T10:00:00Z"}}
    assert (await fhir.put("/fhir/Encounter/e1", json=newer)).status_code == 201
    r = await fhir.put("/fhir/Encounter/e1", json=older)
    assert r.status_code == 200
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "warning"
    assert outcome["issue"][0]["expression"] == ["meta.lastUpdated"]
    current = (await fhir.get("/fhir/Encounter/e1")).json()
    assert current["length"]["value"] == 30 and current["meta"]["versionId"] == "1"
    assert (await fhir.get("/fhir/Encounter/e1/_history")).json()["total"] == 2
    logged = await events(fhir, "ingest.time-entry.logged.v1")
    assert [e["data"]["seconds"] for e in logged] == [1800]


async def test_a_replayed_version_does_not_bring_a_deleted_resource_back(fhir):
    sent = {**ccm_encounter(minutes=20), "meta": {"lastUpdated": "2026-03-02T10:00:00Z"}}
    assert (await fhir.put("/fhir/Encounter/e1", json=sent)).status_code == 201
    assert (await fhir.delete("/fhir/Encounter/e1")).status_code == 204
    for _ in range(2):  # an EHR's retries of version 1
        replay = await fhir.put("/fhir/Encounter/e1", json=sent)
        assert replay.status_code == 200 and "etag" not in replay.headers
        warning = replay.json()["issue"][0]
        assert warning["severity"] == "warning" and "was deleted (version 2)" in \
            warning["diagnostics"] and "same content as version 1" in warning["diagnostics"]
    assert (await fhir.get("/fhir/Encounter/e1")).status_code == 410
    assert [e["data"]["seconds"] for e in await events(fhir, "ingest.time-entry.logged.v1")] \
        == [1200]
    assert len(await events(fhir, "ingest.time-entry.reversed.v1")) == 1
    # New content made before the deletion (stamped before it by more than the clocks may
    # differ: a delayed message) is kept in history; the resource stays deleted, its time
    # reversed. It re-created the resource and logged its time again.
    again = {**sent, "length": {**sent["length"], "value": 25}}
    delayed = await fhir.put("/fhir/Encounter/e1", json=again)
    assert delayed.status_code == 200 and "etag" not in delayed.headers
    assert "kept in history as version 3" in delayed.json()["issue"][0]["diagnostics"]
    assert (await fhir.get("/fhir/Encounter/e1")).status_code == 410
    assert [e["data"]["seconds"] for e in await events(fhir, "ingest.time-entry.logged.v1")] \
        == [1200]
    # New content stamped within the clocks' difference of the deletion (now 2026-03-15T14:00Z;
    # an EHR clock that lags ours), or not stamped, re-creates it.
    lagging = {**sent, "length": {**sent["length"], "value": 30},
               "meta": {"lastUpdated": "2026-03-15T13:55:01Z"}}
    assert (await fhir.put("/fhir/Encounter/e1", json=lagging)).status_code == 201
    assert (await fhir.get("/fhir/Encounter/e1")).status_code == 200
    assert [e["data"]["seconds"] for e in await events(fhir, "ingest.time-entry.logged.v1")] \
        == [1200, 1800]
    history = (await fhir.get("/fhir/Encounter/e1/_history")).json()
    assert [(e["request"]["method"], e["response"]["status"]) for e in history["entry"]] == [
        ("PUT", "201"), ("PUT", "200"), ("DELETE", "204"), ("PUT", "201")]  # newest first


async def test_the_same_content_dated_after_its_deletion_re_creates_a_resource(fhir):
    """An EHR undoing a delete sends the resource again as it was: with a meta.lastUpdated
    after the deletion (by more than the EHR's clock may run ahead: a write made before the
    delete could be dated so) it is no replay, and FHIR's update re-creates it (a 200 that left
    it deleted lost the record); without one, the warning says how to re-create it."""
    sent = {**ccm_encounter(minutes=20), "meta": {"lastUpdated": "2026-03-02T10:00:00Z"}}
    await fhir.put("/fhir/Encounter/e1", json=sent)
    await fhir.delete("/fhir/Encounter/e1")  # at the clock's 2026-03-15T14:00Z
    undated = {k: v for k, v in sent.items() if k != "meta"}
    replay = await fhir.put("/fhir/Encounter/e1", json=undated)
    assert replay.status_code == 200 and "to re-create it, send it with a meta.lastUpdated " \
        "after the deletion" in replay.json()["issue"][0]["diagnostics"]
    assert "after 2026-03-15T14:05:00+00:00" in replay.json()["issue"][0]["diagnostics"]
    # Within the EHR's allowed clock lead of the deletion: still taken for a replay.
    ahead = {**sent, "meta": {"lastUpdated": "2026-03-15T14:04:59Z"}}
    assert (await fhir.put("/fhir/Encounter/e1", json=ahead)).status_code == 200
    fhir.clock.now += timedelta(minutes=10)
    later = {**sent, "meta": {"lastUpdated": "2026-03-15T14:05:01Z"}}
    assert (await fhir.put("/fhir/Encounter/e1", json=later)).status_code == 201
    assert (await fhir.get("/fhir/Encounter/e1")).json()["length"]["value"] == 20
    assert [e["data"]["seconds"] for e in await events(fhir, "ingest.time-entry.logged.v1")] \
        == [1200, 1200]


async def test_a_stale_retry_is_kept_in_history_once(fhir):
    newer = {**ccm_encounter(minutes=30), "meta": {"lastUpdated": "2026-03-02T10:00:00Z"}}
    older = {**ccm_encounter(minutes=10), "meta": {"lastUpdated": "2026-03-01T10:00:00Z"}}
    await fhir.put("/fhir/Encounter/e1", json=newer)
    first = await fhir.put("/fhir/Encounter/e1", json=older)
    second = await fhir.put("/fhir/Encounter/e1", json=older)
    assert "kept in history as version 2" in first.json()["issue"][0]["diagnostics"]
    assert "already kept in history" in second.json()["issue"][0]["diagnostics"]
    assert (await fhir.get("/fhir/Encounter/e1/_history")).json()["total"] == 2


async def test_if_match_with_a_stale_version_answers_412_and_writes_nothing(fhir):
    patient = example("Patient/r4spec-example.json")
    await fhir.put("/fhir/Patient/example", json=patient)
    await fhir.put("/fhir/Patient/example", json={**patient, "active": False})
    before = await counts(fhir)
    r = await fhir.put("/fhir/Patient/example", json={**patient, "gender": "other"},
                       headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412 and r.json()["issue"][0]["expression"] == ["If-Match"]
    assert await counts(fhir) == before
    ok = await fhir.put("/fhir/Patient/example", json={**patient, "gender": "other"},
                        headers={"If-Match": 'W/"2"'})
    assert ok.status_code == 200 and ok.headers["etag"] == 'W/"3"'


async def test_delete_answers_410_afterwards_and_history_shows_it(fhir):
    await fhir.put("/fhir/Patient/example", json=example("Patient/r4spec-example.json"))
    assert (await fhir.delete("/fhir/Patient/example")).status_code == 204
    gone = await fhir.get("/fhir/Patient/example")
    assert gone.status_code == 410 and gone.json()["issue"][0]["code"] == "deleted"
    history = (await fhir.get("/fhir/Patient/example/_history")).json()
    assert history["entry"][0]["request"]["method"] == "DELETE"
    upserts = await events(fhir, "ingest.patient.upserted.v1")
    assert [e["data"]["deleted"] for e in upserts] == [False, True]
    assert (await fhir.delete("/fhir/Patient/example")).status_code == 204  # idempotent


async def test_missing_resource_answers_404_operation_outcome(fhir):
    r = await fhir.get("/fhir/Patient/nope")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert r.json()["issue"][0]["code"] == "not-found"


async def test_other_practice_resources_answer_404_and_ids_do_not_collide(fhir):
    patient = example("Patient/r4spec-example.json")
    assert (await fhir.put("/fhir/Patient/example", json=patient)).status_code == 201
    other = await fhir.get("/fhir/Patient/example", headers=as_practice(fhir, "beta"))
    assert other.status_code == 404
    theirs = await fhir.put("/fhir/Patient/example", json={**patient, "active": False},
                            headers=as_practice(fhir, "beta"))
    assert theirs.status_code == 201 and theirs.headers["etag"] == 'W/"1"'
    assert (await fhir.get("/fhir/Patient/example")).json()["active"] is True
    beta_search = await fhir.get("/fhir/Patient", params={"_id": "example"},
                                 headers=as_practice(fhir, "beta"))
    assert [e["resource"]["active"] for e in beta_search.json()["entry"]] == [False]
    tenants = {e["tenant"] for e in await events(fhir)}
    assert tenants == {"alpha", "beta"}


async def test_conditional_create_returns_the_existing_resource(fhir):
    patient = {"resourceType": "Patient",
               "identifier": [{"system": "urn:mrn", "value": "42"}]}
    first = await fhir.post("/fhir/Patient", json=patient,
                            headers={"If-None-Exist": "identifier=urn:mrn|42"})
    again = await fhir.post("/fhir/Patient", json=patient,
                            headers={"If-None-Exist": "identifier=urn:mrn|42"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert (await counts(fhir))["resources"] == 1


@pytest.mark.parametrize("prefer,expect_body", [
    ("return=minimal", None), ("return=representation", "Patient"),
    ("return=OperationOutcome", "OperationOutcome"),
    # RFC 7240: several preferences, parameters, any case, several headers
    ("handling=strict, return=minimal", None), ("return=minimal; x=1, respond-async", None),
    ('Return="OperationOutcome"', "OperationOutcome"),
    (["handling=lenient", "return=minimal"], None),
    ("handling=strict", "Patient"),
])
async def test_prefer_return_is_honoured(fhir, prefer, expect_body):
    headers = [("Prefer", p) for p in (prefer if isinstance(prefer, list) else [prefer])]
    r = await fhir.post("/fhir/Patient", json=example("Patient/r4spec-example.json"),
                        headers=headers)
    assert r.status_code == 201 and r.headers["etag"] == 'W/"1"'
    if expect_body is None:
        assert r.content == b""
    else:
        assert r.json()["resourceType"] == expect_body


async def test_search_by_patient_and_last_updated(fhir):
    await fhir.put("/fhir/Encounter/e1", json=ccm_encounter())
    fhir.clock.now = fhir.clock.now.replace(day=20)
    await fhir.put("/fhir/Encounter/e2", json=ccm_encounter("e2"))
    await fhir.put("/fhir/Encounter/e3", json={**ccm_encounter("e3"),
                                               "subject": {"reference": "Patient/p2"}})
    r = await fhir.get("/fhir/Encounter", params={"patient": "Patient/p1",
                                                  "_lastUpdated": "ge2026-03-18"})
    assert r.status_code == 200
    assert [e["resource"]["id"] for e in r.json()["entry"]] == ["e2"]
    bad = await fhir.get("/fhir/Encounter", params={"name": "x"})
    assert bad.status_code == 400 and bad.json()["issue"][0]["code"] == "not-supported"


async def test_a_search_parameter_given_twice_must_match_both_times(fhir):
    await fhir.put("/fhir/Encounter/e1", json=ccm_encounter())
    await fhir.put("/fhir/Encounter/e2", json={**ccm_encounter("e2"),
                                               "subject": {"reference": "Patient/p2"}})

    async def found(query: str) -> list[str]:
        r = await fhir.get(f"/fhir/Encounter?{query}")
        assert r.status_code == 200, r.text
        return sorted(e["resource"]["id"] for e in r.json().get("entry", []))

    assert await found("_id=e1&_id=e2") == []
    assert await found("_id=e1,e2&_id=e2") == ["e2"]
    assert await found("patient=p1&subject=Patient/p1") == ["e1"]
    assert await found("patient=p1&patient=p2") == []
    for query in ["subject=Practitioner/p1", "patient=Group/p1",
                  "identifier=urn:a|1&identifier=urn:b|2"]:
        bad = await fhir.get(f"/fhir/Encounter?{query}")
        assert bad.status_code == 400, query
        assert bad.json()["issue"][0]["code"] == "not-supported"


async def test_read_only_token_cannot_write(fhir):
    r = await fhir.post("/fhir/Patient", json=example("Patient/r4spec-example.json"),
                        headers=as_practice(fhir, "alpha-read"))
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"


async def test_missing_token_answers_401_operation_outcome(fhir):
    r = await fhir.get("/fhir/Patient/x", headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["issue"][0]["code"] == "login"


async def test_capability_statement_lists_the_supported_types(fhir):
    r = await fhir.get("/fhir/metadata")
    body = r.json()
    assert body["fhirVersion"] == "4.0.1"
    types = [res["type"] for res in body["rest"][0]["resource"]]
    assert types == ["Patient", "Practitioner", "PractitionerRole", "Organization",
                     "Condition", "CarePlan", "Consent", "Encounter"]
    params = {res["type"]: {p["name"] for p in res["searchParam"]}
              for res in body["rest"][0]["resource"]}
    assert "subject" in params["Encounter"] and "subject" not in params["Consent"]
    assert "patient" in params["Consent"] and "patient" not in params["Patient"]
    # It claims what the REST URLs do: conditional create, update, single delete and read.
    patient = body["rest"][0]["resource"][0]
    assert patient["conditionalCreate"] is True and patient["conditionalUpdate"] is True
    assert patient["conditionalDelete"] == "single"
    assert patient["conditionalRead"] == "full-support"
    created = await fhir.put("/fhir/Patient?identifier=x|1",
                             json={"resourceType": "Patient",
                                   "identifier": [{"system": "x", "value": "1"}]})
    assert created.status_code == 201, created.text


async def test_a_decimal_beyond_64_bits_is_stored_and_read_back_exactly(fhir):
    # JSON parsing gives such a number as a Python int; the fast writer cannot write it and the
    # standard library must take over (a 500 here would be a regression).
    patient = {"resourceType": "Patient", "active": True, "extension": [{
        "url": "http://example.org/big", "valueDecimal": 123456789012345678901234567890}]}
    r = await fhir.post("/fhir/Patient", content=(
        '{"resourceType":"Patient","active":true,"extension":[{"url":"http://example.org/big",'
        '"valueDecimal":123456789012345678901234567890}]}'), headers=FHIR)
    assert r.status_code == 201, r.text
    read = await fhir.get(f"/fhir/Patient/{r.json()['id']}")
    assert read.status_code == 200
    assert read.json()["extension"] == patient["extension"]
    assert '"valueDecimal":123456789012345678901234567890' in read.text


@pytest.mark.parametrize(("ahead", "status"), [(timedelta(minutes=4), 201),
                                               (timedelta(minutes=6), 422)])
async def test_a_meta_last_updated_ahead_of_the_server_clock_by_more_than_5_minutes_is_refused(
        fhir, ahead, status):
    when = (fhir.clock.now + ahead).isoformat()
    patient = {"resourceType": "Patient", "id": "clock", "meta": {"lastUpdated": when}}
    r = await fhir.put("/fhir/Patient/clock", json=patient)
    assert r.status_code == status, r.text
    if status == 422:
        assert r.json()["issue"][0]["expression"] == ["Patient.meta.lastUpdated"]
        assert (await fhir.get("/fhir/Patient/clock")).status_code == 404


@pytest.mark.parametrize(("text", "low", "high"), [
    ("2026", "2026-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ("2026-12", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ("2026-03-15", "2026-03-15T00:00:00+00:00", "2026-03-16T00:00:00+00:00"),
    ("2026-03-15T10:30", "2026-03-15T10:30:00+00:00", "2026-03-15T10:31:00+00:00"),
    ("2026-03-15T10:30:15-05:00", "2026-03-15T10:30:15-05:00", "2026-03-15T10:30:16-05:00"),
    ("2026-03-15T10:30:15.25Z", "2026-03-15T10:30:15.250000+00:00",
     "2026-03-15T10:30:15.260000+00:00"),  # as precise as its digits: a hundredth
    ("2026-03-15T10:30:15.123456Z", "2026-03-15T10:30:15.123456+00:00",
     "2026-03-15T10:30:15.123457+00:00"),
    ("9999", "9999-01-01T00:00:00+00:00", None),  # to the end of time
])
def test_a_search_date_covers_the_range_of_its_precision(text, low, high):
    """As ingest reads them (ccm_shared.fhir_dates): a time without a zone is UTC."""
    found = fhir_dates.date_range(text)
    assert [found.start.isoformat(), found.end and found.end.isoformat()] == [low, high]


@pytest.mark.parametrize(("value", "found"), [
    ("2026-03-15", ["e1", "e2"]), ("eq2026-03-15", ["e1", "e2"]), ("2026-03", ["e1", "e2", "e3"]),
    ("ne2026-03-15", ["e3"]), ("gt2026-03-15", ["e3"]), ("sa2026-03-15", ["e3"]),
    ("ge2026-03-15", ["e1", "e2", "e3"]), ("le2026-03-15", ["e1", "e2"]), ("lt2026-03-15", []),
    ("eb2026-03-16", ["e1", "e2"]), ("2026-03-15T14:00", ["e1"]),
    ("gt2026-03-15T14:00", ["e2", "e3"]),
    ("2026-03-15T09:00-05:00", ["e1"]),
    # an instant before what UTC holds (it was a 400): nothing is earlier, everything later
    ("lt0001-01-01T00:00:00+01:00", []), ("gt0001-01-01T00:00:00+01:00", ["e1", "e2", "e3"]),
])
async def test_last_updated_compares_with_the_whole_range_of_the_date(fhir, value, found):
    start = fhir.clock.now  # 2026-03-15T14:00Z
    for rid, later in (("e1", timedelta(0)), ("e2", timedelta(hours=5)), ("e3", timedelta(days=2))):
        fhir.clock.now = start + later
        assert (await fhir.put(f"/fhir/Encounter/{rid}", json=ccm_encounter(rid))).is_success
    r = await fhir.get("/fhir/Encounter", params={"_lastUpdated": value})
    assert r.status_code == 200, r.text
    assert sorted(e["resource"]["id"] for e in r.json().get("entry", [])) == found


@pytest.mark.parametrize("value", ["2026-03-15T10", "2026-3-15", "ap2026-03-15", "yesterday",
                                   "2026-03-15T10:00:00+15:00"])  # FHIR's zones: ±14:00
async def test_a_last_updated_that_is_no_search_date_is_400(fhir, value):
    r = await fhir.get("/fhir/Encounter", params={"_lastUpdated": value})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["_lastUpdated"]


async def test_search_pages_follow_next_links_to_every_match_once(fhir):
    start = fhir.clock.now
    for n in range(7):
        fhir.clock.now = start + timedelta(minutes=n)
        assert (await fhir.put(f"/fhir/Encounter/p{n}", json=ccm_encounter(f"p{n}"))).is_success
    seen, url, pages = [], "/fhir/Encounter?patient=Patient/p1&_count=3", 0
    while url:
        page = (await fhir.get(url)).json()
        assert page["total"] == 7
        seen += [e["resource"]["id"] for e in page["entry"]]
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert ("previous" in links) == (pages > 0)
        url, pages = links.get("next"), pages + 1
    assert seen == [f"p{n}" for n in reversed(range(7))] and pages == 3  # newest first
    last = (await fhir.get("/fhir/Encounter", params={"_offset": "6", "_count": "3"})).json()
    assert [e["resource"]["id"] for e in last["entry"]] == ["p0"]
    for odd in ({"_offset": "-1"}, {"_offset": "²"}, {"_count": "²"}, {"_count": "1001"}):
        assert (await fhir.get("/fhir/Encounter", params=odd)).status_code == 400
    counted = (await fhir.get("/fhir/Encounter", params={"_count": "0"})).json()
    # The total only (no entry: FHIR JSON has no empty arrays), and no next link.
    assert counted["total"] == 7 and "entry" not in counted
    assert [link["relation"] for link in counted["link"]] == ["self"]


@pytest.fixture
def public_base(monkeypatch):
    monkeypatch.setenv("CCM_INGEST_FHIR_BASE_URL", "https://ehr-gateway.example/fhir")


async def test_page_links_are_on_the_public_base_and_keep_the_criteria(public_base, fhir):
    for n in range(4):
        assert (await fhir.put(f"/fhir/Encounter/p{n}", json=ccm_encounter(f"p{n}"))).is_success
    page = (await fhir.get("/fhir/Encounter?patient=Patient/p1&_count=3&_format=json")).json()
    assert page["total"] == 4  # _format is no criterion
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert nxt.startswith("https://ehr-gateway.example/fhir/Encounter?")
    assert "patient=Patient%2Fp1" in nxt and "_offset=3" in nxt and "_count=3" in nxt


@pytest.fixture
def public_base_with_slash(monkeypatch):
    monkeypatch.setenv("CCM_INGEST_FHIR_BASE_URL", "https://ehr-gateway.example/fhir/")


async def test_a_public_base_configured_with_a_trailing_slash_makes_no_double_slash(
        public_base_with_slash, fhir):
    created = await fhir.post("/fhir/Patient", json={"resourceType": "Patient", "active": True})
    rid = created.json()["id"]
    assert created.headers["location"] == (
        f"https://ehr-gateway.example/fhir/Patient/{rid}/_history/1")


async def created_updated_deleted_recreated(fhir) -> str:
    """A Patient's four versions: POST, PUT, DELETE, PUT; its id."""
    created = await fhir.post("/fhir/Patient", json={"resourceType": "Patient", "active": True})
    rid = created.json()["id"]
    await fhir.put(f"/fhir/Patient/{rid}", json={"resourceType": "Patient", "id": rid})
    await fhir.delete(f"/fhir/Patient/{rid}")
    await fhir.put(f"/fhir/Patient/{rid}", json={"resourceType": "Patient", "id": rid,
                                                "active": False})
    return rid


async def test_history_tells_how_each_version_came(fhir):
    rid = await created_updated_deleted_recreated(fhir)
    entries = (await fhir.get(f"/fhir/Patient/{rid}/_history")).json()["entry"]
    assert [(e["request"]["method"], e["request"]["url"], e["response"]["status"])
            for e in entries] == [  # newest first
        ("PUT", f"Patient/{rid}", "201"), ("DELETE", f"Patient/{rid}", "204"),
        ("PUT", f"Patient/{rid}", "200"), ("POST", "Patient", "201")]


async def test_history_pages_keep_each_versions_status_and_link_the_next_page(fhir):
    rid = await created_updated_deleted_recreated(fhir)
    whole = (await fhir.get(f"/fhir/Patient/{rid}/_history")).json()
    seen, url = [], f"/fhir/Patient/{rid}/_history?_count=1"
    while url:
        page = (await fhir.get(url)).json()
        assert page["total"] == 4 and len(page["entry"]) == 1
        seen += page["entry"]
        url = next((link["url"].removeprefix("http://test") for link in page["link"]
                    if link["relation"] == "next"), None)
    assert seen == whole["entry"]  # a version's 201/200 does not depend on where the page ends
    total_only = (await fhir.get(f"/fhir/Patient/{rid}/_history?_count=0")).json()
    assert total_only["total"] == 4 and "entry" not in total_only


async def test_history_since_lists_the_versions_updated_at_or_after_it(fhir):
    for version, when in enumerate(["2026-01-05T10:00:00Z", "2026-02-05T10:00:00Z",
                                    "2026-03-05T10:00:00Z"], 1):
        r = await fhir.put("/fhir/Patient/dated", json={
            "resourceType": "Patient", "id": "dated", "meta": {"lastUpdated": when},
            "active": version % 2 == 0})
        assert r.status_code in (200, 201)
    since = (await fhir.get("/fhir/Patient/dated/_history?_since=2026-02")).json()
    assert since["total"] == 2
    assert [(e["response"]["etag"], e["response"]["status"]) for e in since["entry"]] == [
        ('W/"3"', "200"), ('W/"2"', "200")]
    instant = await fhir.get("/fhir/Patient/dated/_history",
                             params={"_since": "2026-03-05T10:00:00+00:00"})
    assert instant.json()["total"] == 1
    later = (await fhir.get("/fhir/Patient/dated/_history?_since=2027")).json()
    assert later["total"] == 0 and "entry" not in later
    for query, expression in [("_since=yesterday", "_since"), ("_at=2026", "_at"),
                              ("_count=x", "_count"), ("_since=2026-02&_since=2027", "_since"),
                              ("_since=2026&_since=2026", "_since"),
                              ("_count=1&_count=2", "_count")]:
        bad = await fhir.get(f"/fhir/Patient/dated/_history?{query}")
        assert bad.status_code == 400, query
        assert bad.json()["issue"][0]["expression"] == [expression]
    assert (await fhir.get("/fhir/Patient/nobody/_history?_since=2026")).status_code == 404


async def test_versions_stored_before_ingest_0004_show_as_before(fhir):
    await fhir.put("/fhir/Patient/old", json={"resourceType": "Patient", "id": "old"})
    await fhir.put("/fhir/Patient/old", json={"resourceType": "Patient", "id": "old",
                                              "active": True})
    async with fhir.runtime.db.unit_of_work() as uow:  # as the code before ingest_0004 left it
        await uow.session.execute(update(orm.resource_versions).values(method=None))
        await uow.commit()
    entries = (await fhir.get("/fhir/Patient/old/_history")).json()["entry"]
    assert [(e["request"]["method"], e["response"]["status"]) for e in entries] == [
        ("PUT", "200"), ("PUT", "201")]


async def test_conditional_create_does_not_answer_with_a_resource_that_no_longer_matches(fhir):
    b = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "B1"}]}
    only_b1 = {"If-None-Exist": "identifier=urn:mrn|B1"}
    first = await fhir.post("/fhir/Patient", json=b, headers=only_b1)
    assert first.status_code == 201
    rid = first.json()["id"]
    moved = {"resourceType": "Patient", "id": rid,
             "identifier": [{"system": "urn:mrn", "value": "C1"}]}
    assert (await fhir.put(f"/fhir/Patient/{rid}", json=moved)).status_code == 200
    again = await fhir.post("/fhir/Patient", json=b, headers=only_b1)
    assert again.status_code == 201 and again.json()["id"] != rid
    third = await fhir.post("/fhir/Patient", json=b, headers=only_b1)
    assert third.status_code == 200 and third.json()["id"] == again.json()["id"]


async def test_delete_with_if_match_only_deletes_that_version(fhir):
    await fhir.put("/fhir/Patient/d1", json={"resourceType": "Patient", "id": "d1"})
    stale = await fhir.delete("/fhir/Patient/d1", headers={"If-Match": 'W/"9"'})
    assert stale.status_code == 412 and stale.json()["issue"][0]["expression"] == ["If-Match"]
    assert (await fhir.get("/fhir/Patient/d1")).status_code == 200
    done = await fhir.delete("/fhir/Patient/d1", headers={"If-Match": 'W/"1"'})
    assert done.status_code == 204
    assert (await fhir.get("/fhir/Patient/d1")).status_code == 410


async def test_a_version_sent_without_a_time_applies_after_one_sent_slightly_ahead(fhir):
    ahead = (fhir.clock.now + timedelta(minutes=4)).isoformat()
    await fhir.put("/fhir/Patient/t1", json={"resourceType": "Patient", "id": "t1",
                                            "active": True, "meta": {"lastUpdated": ahead}})
    r = await fhir.put("/fhir/Patient/t1", json={"resourceType": "Patient", "id": "t1",
                                                 "active": False})
    assert r.status_code == 200 and r.json()["active"] is False  # applied, not kept aside
    assert (await fhir.get("/fhir/Patient/t1")).json()["meta"]["versionId"] == "2"


async def test_small_refusals_found_by_the_fourth_walkthrough(fhir):
    """Each says what is wrong, with the right status, and writes nothing."""
    assert (await fhir.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1",
                                                     "identifier": [{"system": "urn:x",
                                                                     "value": "cu3"}]})
            ).status_code == 201
    before = await counts(fhir)
    # A comma list of patients (FHIR: OR) is refused, not answered with nothing.
    r = await fhir.get("/fhir/Encounter", params={"patient": "p1,p2"})
    assert r.status_code == 400 and "no comma lists" in r.text
    # The last day there is is a date.
    for value in ("9999-12-31", "lt9999-12-31", "9999-12-31T23:59Z"):
        r = await fhir.get("/fhir/Patient", params={"_lastUpdated": value})
        assert r.status_code == 200, (value, r.text)
    # If-None-Exist names what its criteria may use (not the paging it refuses).
    r = await fhir.post("/fhir/Patient", json={"resourceType": "Patient"},
                        headers={"If-None-Exist": "identifier=urn:x|a&_count=5"})
    assert r.status_code == 400 and "'_count'" in r.text
    assert "_count" not in r.json()["issue"][0]["diagnostics"].split("supported:")[1]

    def bundle(*entries: dict) -> dict:
        return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}

    # PATCH inside a Bundle: not supported, said so.
    r = await fhir.post("/fhir", json=bundle({"request": {"method": "PATCH",
                                                          "url": "Patient/p1"}}))
    assert r.status_code == 422 and "PATCH is not supported" in r.text
    # A conditional update that finds Patient/p1 but carries another id: 400 (FHIR).
    r = await fhir.post("/fhir", json=bundle({
        "resource": {"resourceType": "Patient", "id": "zzz", "active": True},
        "request": {"method": "PUT", "url": "Patient?identifier=urn:x|cu3"}}))
    assert r.status_code == 400 and "Patient/p1" in r.text
    assert await counts(fhir) == before


async def test_a_conditional_update_works_in_a_batch_as_in_a_transaction(fhir):
    def batch(active: bool) -> dict:
        return {"resourceType": "Bundle", "type": "batch", "entry": [{
            "resource": {"resourceType": "Patient", "active": active,
                         "identifier": [{"system": "urn:x", "value": "cu1"}]},
            "request": {"method": "PUT", "url": "Patient?identifier=urn:x|cu1"}}]}

    first = (await fhir.post("/fhir", json=batch(True))).json()["entry"][0]
    assert first["response"]["status"] == "201 Created", first
    second = (await fhir.post("/fhir", json=batch(False))).json()["entry"][0]
    assert second["response"]["status"] == "200 OK", second
    assert second["response"]["location"].split("/_history")[0] == \
        first["response"]["location"].split("/_history")[0]
    assert second["response"]["etag"] == 'W/"2"'


async def test_more_refusals_found_by_the_fourth_walkthrough(fhir):
    r = await fhir.get("/fhir/Patient/_history")
    assert r.status_code == 400 and "type-level history" in r.text
    r = await fhir.get("/fhir/Patient", params=[("_count", "1"), ("_count", "2")])
    assert r.status_code == 400 and "_count is given more than once" in r.text
    body = json.dumps({"resourceType": "Patient", "name": [{"family": "Muñoz"}]})
    r = await fhir.post("/fhir/Patient", content=body.encode("latin-1"),
                        headers={"Content-Type": "application/fhir+json; charset=iso-8859-1"})
    assert r.status_code == 415 and "UTF-8" in r.text
    r = await fhir.post("/fhir/Patient", content=body.encode(),
                        headers={"Content-Type": "application/fhir+json; charset=UTF-8"})
    assert r.status_code == 201, r.text


def empty_arrays(value, path="$"):
    """Where a JSON value has an empty array or object (FHIR JSON forbids both: ele-1)."""
    found = [] if value not in ([], {}) else [path]
    if isinstance(value, dict):
        found += [p for k, v in value.items() for p in empty_arrays(v, f"{path}.{k}")]
    elif isinstance(value, list):
        found += [p for n, v in enumerate(value) for p in empty_arrays(v, f"{path}[{n}]")]
    return found


async def test_bundles_without_entries_carry_no_empty_entry_array(fhir):
    """A search or history with nothing to list (or _count=0), and a transaction or batch of no
    entries, answer a Bundle without ``entry``: ``"entry": []`` is no FHIR JSON."""
    await fhir.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    searched = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?_id=nobody"}}]}
    answers = [
        await fhir.get("/fhir/Patient", params={"_id": "nobody"}),
        await fhir.get("/fhir/Patient", params={"_count": "0"}),
        await fhir.get("/fhir/Patient/p1/_history", params={"_since": "2027"}),
        await fhir.get("/fhir/Patient/p1/_history", params={"_count": "0"}),
        await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "transaction"}),
        await fhir.post("/fhir", json={"resourceType": "Bundle", "type": "batch"}),
        await fhir.post("/fhir", json=searched),
    ]
    for r in answers:
        assert r.status_code == 200, r.text
        assert empty_arrays(r.json()) == [], r.request.url
    assert [r.json().get("total") for r in answers[:4]] == [0, 1, 0, 1]
    assert "entry" not in answers[0].json() and "entry" not in answers[4].json()
    inner = answers[6].json()["entry"][0]["resource"]
    assert inner["type"] == "searchset" and inner["total"] == 0 and "entry" not in inner
    for outcome in (await fhir.get("/fhir/Nope"), await fhir.get("/fhir/metadata"),
                    await fhir.post("/fhir/Patient/$validate",
                                    json={"resourceType": "Patient"})):
        assert empty_arrays(outcome.json()) == []


async def test_the_stu3_json_media_type_is_taken_as_a_body_as_accept_and_format_take_it(fhir):
    """``application/json+fhir`` (FHIR STU3's name for FHIR JSON): Accept and _format took it,
    a request body labelled so was a 415."""
    stu3 = "application/json+fhir"
    body = json.dumps({"resourceType": "Patient", "id": "s3"})
    for content_type in (stu3, f"{stu3}; charset=utf-8", "Application/JSON+FHIR; fhirVersion=4.0"):
        r = await fhir.put("/fhir/Patient/s3", content=body,
                           headers={"Content-Type": content_type, "Accept": stu3})
        assert r.status_code in (200, 201), (content_type, r.text)
    r = await fhir.post("/fhir?_format=" + stu3, content=json.dumps({
        "resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Patient/s3"}}]}),
        headers={"Content-Type": stu3})
    assert r.status_code == 200 and r.json()["entry"][0]["response"]["status"] == "200 OK"
    r = await fhir.post("/fhir/Patient/$validate", content=body, headers={"Content-Type": stu3})
    assert r.status_code == 200, r.text
    for refused in ("application/xml+fhir", "application/fhir+xml", "text/json+fhir"):
        r = await fhir.put("/fhir/Patient/s3", content=body, headers={"Content-Type": refused})
        assert r.status_code == 415, refused


@pytest.mark.parametrize("prefer", [None, "return=representation"])
async def test_a_write_only_token_reads_nothing_through_its_writes(fhir, prefer):
    """A conditional create that finds a match answers with it, and a Bundle entry with its
    resource when representation is preferred: a token with fhir:write but not fhir:read read
    any Patient by MBI (or anything by _id) that way. It gets an OperationOutcome instead."""
    from ccm_shared.tenancy import create_token

    mbi = {"system": "http://hl7.org/fhir/sid/us-mbi", "value": "7QX5TK9MN42"}
    stored = {"resourceType": "Patient", "identifier": [mbi], "name": [{"family": "Secretname"}],
              "birthDate": "1950-02-03"}
    assert (await fhir.post("/fhir/Patient", json=stored)).status_code == 201
    writer = await create_token(fhir.runtime.db.engine, practice_id="alpha",
                                scopes=("fhir:write",))
    headers = {"Authorization": f"Bearer {writer}", **({"Prefer": prefer} if prefer else {})}
    probe = {"resourceType": "Patient", "name": [{"family": "Probe"}]}
    r = await fhir.post("/fhir/Patient", json=probe, headers={
        **headers, "If-None-Exist": f"identifier={mbi['system']}|{mbi['value']}"})
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome", r.text
    assert "Secretname" not in r.text and "1950" not in r.text
    r = await fhir.post("/fhir", headers={**headers, "Prefer": "return=representation"}, json={
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": probe, "request": {"method": "POST", "url": "Patient",
                                            "ifNoneExist": f"identifier={mbi['value']}"}}]})
    assert r.status_code == 200 and "Secretname" not in r.text, r.text
    assert "resource" not in r.json()["entry"][0]
    # a token that may read gets what it asks for
    r = await fhir.post("/fhir/Patient", json=probe, headers={
        "Prefer": "return=representation",
        "If-None-Exist": f"identifier={mbi['system']}|{mbi['value']}"})
    assert r.json()["name"] == [{"family": "Secretname"}]


async def test_last_modified_is_never_later_than_now(fhir):
    """RFC 9110 §8.8.2.1: a meta.lastUpdated the EHR sent ahead of our clock (within the
    allowed difference) is the version's time, but its Last-Modified is capped at the time of
    the response (it was later than the response's Date)."""
    fhir.clock.now = datetime.now(UTC)
    ahead = (fhir.clock.now + timedelta(seconds=200)).isoformat()
    r = await fhir.put("/fhir/Patient/lu", json={"resourceType": "Patient", "id": "lu",
                                                 "meta": {"lastUpdated": ahead}})
    assert r.status_code == 201 and r.json()["meta"]["lastUpdated"] == ahead
    for answer in (r, await fhir.get("/fhir/Patient/lu")):
        assert parsedate_to_datetime(answer.headers["last-modified"]) <= datetime.now(UTC)
