"""FHIR's conditional interactions on the REST URL, on real PostgreSQL (and the relay on Kafka):
conditional update (``PUT /fhir/Type?criteria``) and delete (``DELETE /fhir/Type?criteria``)
through the same code as a Bundle's ``PUT``/``DELETE Type?criteria`` entries, and conditional
reads (``If-None-Match``, ``If-Modified-Since``; a Bundle GET entry's ``ifNoneMatch``,
``ifModifiedSince``) answering 304."""

import asyncio
import json
import re
import uuid
from email.utils import parsedate_to_datetime

import pytest
from sqlalchemy import func, select

from ccm_ingest.adapters.orm import conditional_creates, outbox, resource_versions, resources
from ccm_shared.audit import audit_log

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.integration]

MRN = "urn:mrn"
AMB = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}


def patient(value: str, **more) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": MRN, "value": value}], **more}


def ccm_encounter(value: str, **more) -> dict:
    """A CCM-time Encounter (25 minutes for Patient/p1) with the EHR's identifier ``value``."""
    return {"resourceType": "Encounter", "status": "finished", "class": AMB,
            "identifier": [{"system": "urn:visit", "value": value}],
            "type": [{"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                  "code": "99490"}]}],
            "subject": {"reference": "Patient/p1"}, "period": {"start": "2026-03-01T14:30:00Z"},
            "length": {"value": 25, "unit": "min", "system": "http://unitsofmeasure.org",
                       "code": "min"}, **more}


async def written(client) -> dict[str, int]:
    """What the practice has stored: resources, versions, claimed criteria, staged events."""
    async with client.runtime.db.engine.connect() as conn:
        return {name: (await conn.execute(select(func.count()).select_from(table).where(
            table.c.tenant == client.practice))).scalar_one()
            for name, table in (("resources", resources), ("versions", resource_versions),
                                ("criteria", conditional_creates), ("events", outbox))}


async def event_types(client) -> list[str]:
    async with client.runtime.db.engine.connect() as conn:
        return list((await conn.execute(select(outbox.c.event_type).where(
            outbox.c.tenant == client.practice).order_by(outbox.c.id))).scalars())


async def trail(client, practice: str) -> list[tuple]:
    """The practice's audit entries of ingest's API calls, oldest first: (action, what,
    entity, patient, outcome)."""
    async with client.runtime.db.engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(
            select(audit_log.c.action, audit_log.c.what, audit_log.c.entity,
                   audit_log.c.patient, audit_log.c.outcome)
            .where(audit_log.c.practice == practice, audit_log.c.service == "ingest")
            .order_by(audit_log.c.id))).all()]


def as_token(client, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.tokens[name]}"}


async def put(client, url: str, body: dict, **headers: str):
    r = await client.put(url, json=body, headers=headers)
    assert r.status_code in (200, 201), r.text
    return r


async def stored_patients(client) -> None:
    """Patient/one (urn:mrn|one, version 1) and two Patients answering urn:mrn|twin."""
    await put(client, "/fhir/Patient/one", patient("one", id="one"))
    for rid in ("twin-a", "twin-b"):
        await put(client, f"/fhir/Patient/{rid}", patient("twin", id=rid))


# ---- conditional update --------------------------------------------------------------------

ONE = "/fhir/Patient?identifier=urn:mrn|one"
NEW = "/fhir/Patient?identifier=urn:mrn|new"

# (what, url, body, headers, status, id it writes (None: a server id), version)
UPDATES = [
    ("nothing matches: created under a server id", NEW, patient("new"), {}, 201, None, 1),
    ("nothing matches: created under the body's id (update as create)", NEW,
     patient("new", id="mine"), {}, 201, "mine", 1),
    ("one match: updated", ONE, patient("one", active=True), {}, 200, "one", 2),
    ("one match, the body naming it", ONE, patient("one", id="one", active=True), {}, 200,
     "one", 2),
    ("one match by _id, the body without its identifier", "/fhir/Patient?_id=one",
     {"resourceType": "Patient", "active": True}, {}, 200, "one", 2),
    ("criteria in another order and encoding", "/fhir/Patient?_format=json&identifier="
     "urn%3Amrn%7Cone", patient("one", active=True), {}, 200, "one", 2),
    ("If-Match the match's version", ONE, patient("one", active=True), {"If-Match": 'W/"1"'},
     200, "one", 2),
    ("the same content: no new version", ONE, patient("one", id="one"), {}, 200, "one", 1),
]


@pytest.mark.parametrize(("url", "body", "headers", "status", "rid", "version"),
                         [row[1:] for row in UPDATES], ids=[row[0] for row in UPDATES])
async def test_a_conditional_update_updates_its_one_match_or_creates(
        ingest_pg, url, body, headers, status, rid, version):
    await stored_patients(ingest_pg)
    r = await ingest_pg.put(url, json=body, headers=headers)
    assert r.status_code == status, r.text
    made = r.json()
    assert made["resourceType"] == "Patient" and made["meta"]["versionId"] == str(version)
    if rid is None:
        assert str(uuid.UUID(made["id"])) == made["id"]  # a server-assigned id
    else:
        assert made["id"] == rid
    assert r.headers["etag"] == f'W/"{version}"'
    assert r.headers["location"] == \
        f"http://ingest/fhir/Patient/{made['id']}/_history/{version}"
    assert parsedate_to_datetime(r.headers["last-modified"]) == \
        parsedate_to_datetime(r.headers["last-modified"]).replace(microsecond=0)
    read = await ingest_pg.get(f"/fhir/Patient/{made['id']}")
    assert read.json() == made
    # The other Patients are untouched.
    for other in {"one", "twin-a", "twin-b"} - {made["id"]}:
        assert (await ingest_pg.get(f"/fhir/Patient/{other}")).json()["meta"]["versionId"] \
            == "1"


# (what, url, body, headers, token, status, issue code, expression)
REFUSED_UPDATES = [
    ("no criteria", "/fhir/Patient", patient("new"), {}, "alpha", 400, "required",
     "Patient?"),
    ("criteria of nothing but how to answer", "/fhir/Patient?_format=json", patient("new"), {},
     "alpha", 400, "invalid", "Patient?_format=json"),
    ("a search parameter not supported", "/fhir/Patient?name=Rivera", patient("new"), {},
     "alpha", 400, "not-supported", "Patient?name=Rivera"),
    ("paging in the criteria", f"{ONE}&_count=1", patient("one"), {}, "alpha", 400,
     "not-supported", "Patient?identifier=urn:mrn|one&_count=1"),
    ("a parameter without a value", "/fhir/Patient?identifier=", patient("new"), {}, "alpha",
     400, "required", "Patient?identifier="),
    ("criteria the search refuses", "/fhir/Patient?identifier=urn:mrn|a,b", patient("a"), {},
     "alpha", 400, "not-supported", "Patient?identifier=urn:mrn|a,b"),
    ("a body of another type", ONE, {"resourceType": "Practitioner"}, {}, "alpha", 400, None,
     None),
    ("a type not supported", "/fhir/Observation?identifier=x",
     {"resourceType": "Observation"}, {}, "alpha", 404, "not-supported", "resourceType"),
    ("content FHIR refuses", ONE, patient("one", gender="x"), {}, "alpha", 422, None, None),
    ("the one match has another id than the body's", ONE, patient("one", id="other"), {},
     "alpha", 400, "invalid", "Patient.id"),
    ("several match", "/fhir/Patient?identifier=urn:mrn|twin", patient("twin"), {}, "alpha",
     412, "multiple-matches", "Patient?identifier=urn:mrn|twin"),
    ("If-Match of another version", ONE, patient("one", active=True), {"If-Match": 'W/"7"'},
     "alpha", 412, "conflict", "If-Match"),
    ("If-Match where nothing matches", NEW, patient("new"), {"If-Match": 'W/"1"'}, "alpha",
     412, "conflict", "If-Match"),
    ("If-Match that is no version", ONE, patient("one", active=True), {"If-Match": "abc"},
     "alpha", 400, "value", "If-Match"),
    ("a token without fhir:write", ONE, patient("one", active=True), {}, "alpha-read", 403,
     "forbidden", None),
]


@pytest.mark.parametrize(("url", "body", "headers", "token", "status", "code", "expression"),
                         [row[1:] for row in REFUSED_UPDATES],
                         ids=[row[0] for row in REFUSED_UPDATES])
async def test_a_conditional_update_refused_writes_nothing(
        ingest_pg, url, body, headers, token, status, code, expression):
    await stored_patients(ingest_pg)
    before = await written(ingest_pg)
    r = await ingest_pg.put(url, json=body, headers={**headers, **as_token(ingest_pg, token)})
    assert r.status_code == status, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    (issue,) = outcome["issue"]
    assert issue["severity"] == "error" and issue["diagnostics"]
    if code is not None:
        assert issue["code"] == code, issue
    if expression is not None:
        assert issue["expression"] == [expression], issue
    assert await written(ingest_pg) == before  # no version, no event, no claim


# One EHR's changes to a CCM-time Encounter, sent by id and by criteria: (body changes, headers).
STEPS = [
    ({}, {}),  # created
    ({}, {"Prefer": "return=OperationOutcome"}),  # the same content: nothing stored
    ({"length": {"value": 30, "unit": "min", "system": "http://unitsofmeasure.org",
                 "code": "min"}}, {"Prefer": "return=minimal"}),  # a change
    ({"meta": {"lastUpdated": "2026-03-01T15:00:00Z"}, "length": {
        "value": 40, "unit": "min", "system": "http://unitsofmeasure.org", "code": "min"}},
     {}),  # older than the state: kept in history only
    ({"status": "entered-in-error"}, {"If-Match": 'W/"1"'}),  # a stale If-Match
    ({"status": "entered-in-error"}, {"If-Match": 'W/"2"'}),  # the time is reversed
    ({"status": "entered-in-error"}, {}),  # the same again
]


async def test_a_conditional_update_answers_and_emits_as_an_update_by_id(ingest_pg):
    """The same changes sent as ``PUT Encounter/{id}`` and as ``PUT Encounter?identifier=…``:
    the same statuses, headers, bodies (Prefer), warnings, versions and CCM events."""
    answers: dict[str, list] = {"id": [], "criteria": []}
    for how in answers:
        rid = f"enc-{how}"
        url = f"/fhir/Encounter/{rid}" if how == "id" else \
            f"/fhir/Encounter?identifier=urn:visit|{rid}"
        for changes, headers in STEPS:
            body = {**ccm_encounter(rid), **changes}
            if how == "id":
                body["id"] = rid
            events_before = len(await event_types(ingest_pg))
            r = await ingest_pg.put(url, json=body, headers=headers)
            if "location" in r.headers:  # the resource's id, which the diagnostics name
                made = r.headers["location"].split("/Encounter/")[1].split("/")[0]
            sent = r.json() if r.content else None
            if sent is not None:
                sent.pop("id", None)
                sent.get("meta", {}).pop("lastUpdated", None)
                sent.pop("identifier", None)
                for issue in sent.get("issue", []):  # they name the resource
                    issue["diagnostics"] = re.sub(r"[0-9-]{10}T[0-9:.+]+", "…", issue[
                        "diagnostics"].replace(made, "…"))
            location = r.headers.get("location", "")
            answers[how].append((
                r.status_code, r.headers.get("etag"), "last-modified" in r.headers,
                location.endswith(f"/_history/{r.headers.get('etag', '')[3:-1]}"),
                sent, (await event_types(ingest_pg))[events_before:]))
        found = await ingest_pg.get("/fhir/Encounter", params={
            "identifier": f"urn:visit|{rid}"})
        (entry,) = found.json()["entry"]
        assert entry["resource"]["status"] == "entered-in-error"
        assert (entry["resource"]["id"] == rid) is (how == "id")
    assert answers["criteria"] == answers["id"]
    statuses = [(a[0], a[1], a[5]) for a in answers["id"]]
    assert statuses == [
        (201, 'W/"1"', ["ingest.time-entry.logged.v1"]), (200, 'W/"1"', []),
        (200, 'W/"2"', ["ingest.time-entry.logged.v1"]), (200, 'W/"2"', []),
        (412, None, []), (200, 'W/"4"', ["ingest.time-entry.reversed.v1"]),
        (200, 'W/"4"', [])]
    assert answers["id"][1][4]["issue"][0]["diagnostics"].startswith("same content")
    assert answers["id"][2][4] is None  # return=minimal
    assert answers["id"][3][4]["issue"][0]["severity"] == "warning"  # kept, not applied


async def test_20_concurrent_identical_conditional_updates_make_exactly_one_resource(ingest_pg):
    """``PUT Patient?identifier=…`` matching nothing, 20 at once: one creates, the others
    update what it created (the criteria are claimed as a conditional create claims them)."""
    mrn = uuid.uuid4().hex
    url = f"/fhir/Patient?identifier=urn:mrn|{mrn}"

    async def push(n: int):
        return await ingest_pg.put(url, json={**patient(mrn), "name": [{"family": f"Put{n}"}]})

    answers = await asyncio.gather(*(push(n) for n in range(20)))
    assert sorted(r.status_code for r in answers) == [200] * 19 + [201], \
        [r.text for r in answers if r.status_code not in (200, 201)][:2]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sorted(r.headers["etag"] for r in answers) == sorted(f'W/"{n}"'
                                                                for n in range(1, 21))
    assert (await written(ingest_pg))["resources"] == 1
    found = await ingest_pg.get("/fhir/Patient", params={"identifier": f"urn:mrn|{mrn}"})
    assert found.json()["total"] == 1
    history = await ingest_pg.get(f"/fhir/Patient/{answers[0].json()['id']}/_history")
    assert history.json()["total"] == 20


async def test_rest_and_bundle_conditional_updates_settle_the_same_resource(ingest_pg):
    """One code path: what a REST conditional update created, a batch's and a transaction's
    ``PUT Patient?criteria`` update, and the REST URL again; and they refuse alike."""
    criteria = "identifier=urn:mrn|shared"

    def bundle(kind: str, active: bool, **more) -> dict:
        return {"resourceType": "Bundle", "type": kind, "entry": [{
            "resource": patient("shared", active=active, **more),
            "request": {"method": "PUT", "url": f"Patient?{criteria}"}}]}

    first = await ingest_pg.put(f"/fhir/Patient?{criteria}", json=patient("shared"))
    assert first.status_code == 201, first.text
    rid = first.json()["id"]
    for n, kind in enumerate(("batch", "transaction"), start=2):
        r = await ingest_pg.post("/fhir", json=bundle(kind, n % 2 == 0))
        (entry,) = r.json()["entry"]
        assert entry["response"]["status"] == "200 OK", entry
        assert entry["response"]["location"] == f"Patient/{rid}/_history/{n}"
    last = await ingest_pg.put(f"/fhir/Patient?{criteria}", json=patient("shared", active=True))
    assert (last.status_code, last.json()["id"], last.headers["etag"]) == (200, rid, 'W/"4"')
    # The same refusal: a body naming another resource than the one match.
    rest = await ingest_pg.put(f"/fhir/Patient?{criteria}", json=patient("shared", id="x"))
    batch = await ingest_pg.post("/fhir", json=bundle("batch", True, id="x"))
    (entry,) = batch.json()["entry"]
    assert rest.status_code == 400 and entry["response"]["status"] == "400 Bad Request"
    (rest_issue,) = rest.json()["issue"]
    (entry_issue,) = entry["response"]["outcome"]["issue"]
    assert entry_issue["diagnostics"] == rest_issue["diagnostics"]
    assert (rest_issue["expression"], entry_issue["expression"]) == (
        ["Patient.id"], ["Bundle.entry[0].resource.id"])


async def test_a_conditional_write_is_in_the_trail_of_the_resource_it_wrote(ingest_pg):
    """The audit trail names the resource a conditional update or delete found, created or
    deleted (``Patient/id``, the patient's trail), as it names the one of ``PUT Patient/id``."""
    r = await ingest_pg.put(NEW, json=patient("new"))
    created = r.json()["id"]
    await ingest_pg.put(NEW, json=patient("new", active=True))
    await ingest_pg.delete(NEW)
    refused = await ingest_pg.put("/fhir/Patient?identifier=urn:mrn|x&name=y",
                                  json=patient("x"))
    assert refused.status_code == 400
    assert await trail(ingest_pg, ingest_pg.practice) == [
        ("U", "PUT /fhir/{rtype}", f"Patient/{created}", created, 0),
        ("U", "PUT /fhir/{rtype}", f"Patient/{created}", created, 0),
        ("D", "DELETE /fhir/{rtype}", f"Patient/{created}", created, 0),
        ("U", "PUT /fhir/{rtype}", "/fhir/Patient", None, 4)]


# ---- conditional delete --------------------------------------------------------------------

async def test_a_conditional_delete_deletes_its_single_match_as_a_delete_by_id(ingest_pg):
    rid = (await put(ingest_pg, "/fhir/Encounter?identifier=urn:visit|v1",
                     ccm_encounter("v1"))).json()["id"]
    r = await ingest_pg.delete("/fhir/Encounter?identifier=urn:visit|v1")
    assert (r.status_code, r.content) == (204, b"")
    assert (await ingest_pg.get(f"/fhir/Encounter/{rid}")).status_code == 410
    assert await event_types(ingest_pg) == ["ingest.time-entry.logged.v1",
                                            "ingest.time-entry.reversed.v1"]
    # Deleted, it answers its criteria no more: a second delete finds nothing, and says so.
    before = await written(ingest_pg)
    again = await ingest_pg.delete("/fhir/Encounter?identifier=urn:visit|v1")
    assert again.status_code == 200, again.text
    (issue,) = again.json()["issue"]
    assert (issue["severity"], issue["code"]) == ("information", "not-found")
    assert "nothing matches Encounter?identifier=urn:visit|v1" in issue["diagnostics"]
    minimal = await ingest_pg.delete("/fhir/Encounter?identifier=urn:visit|v1",
                                     headers={"Prefer": "return=minimal"})
    assert (minimal.status_code, minimal.content) == (204, b"")
    assert await written(ingest_pg) == before
    # … and a conditional update creates a new resource for them.
    anew = await ingest_pg.put("/fhir/Encounter?identifier=urn:visit|v1",
                               json=ccm_encounter("v1"))
    assert anew.status_code == 201 and anew.json()["id"] != rid


# (what, url, headers, token, status, issue code, deleted)
DELETES = [
    ("If-Match of the match's version", ONE, {"If-Match": 'W/"1"'}, "alpha", 204, None, True),
    ("by _id", "/fhir/Patient?_id=one", {}, "alpha", 204, None, True),
    ("several match", "/fhir/Patient?identifier=urn:mrn|twin", {}, "alpha", 412,
     "multiple-matches", False),
    ("If-Match of another version", ONE, {"If-Match": 'W/"2"'}, "alpha", 412, "conflict",
     False),
    ("If-Match where nothing matches", NEW, {"If-Match": 'W/"1"'}, "alpha", 412, "conflict",
     False),
    ("If-Match that is no version", ONE, {"If-Match": "abc"}, "alpha", 400, "value", False),
    ("no criteria", "/fhir/Patient", {}, "alpha", 400, "required", False),
    ("a search parameter not supported", "/fhir/Patient?birthdate=2026", {}, "alpha", 400,
     "not-supported", False),
    ("a type not supported", "/fhir/Observation?identifier=x", {}, "alpha", 404,
     "not-supported", False),
    ("a token without fhir:write", ONE, {}, "alpha-read", 403, "forbidden", False),
    ("another practice's token", ONE, {}, "beta", 200, "not-found", False),
]


@pytest.mark.parametrize(("url", "headers", "token", "status", "code", "deleted"),
                         [row[1:] for row in DELETES], ids=[row[0] for row in DELETES])
async def test_a_conditional_delete_deletes_one_match_only(ingest_pg, url, headers, token,
                                                           status, code, deleted):
    await stored_patients(ingest_pg)
    before = await written(ingest_pg)
    r = await ingest_pg.delete(url, headers={**headers, **as_token(ingest_pg, token)})
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["issue"][0]["code"] == code
    gone = {rid for rid in ("one", "twin-a", "twin-b")
            if (await ingest_pg.get(f"/fhir/Patient/{rid}")).status_code == 410}
    assert gone == ({"one"} if deleted else set())
    if not deleted:
        assert await written(ingest_pg) == before


async def test_a_bundles_conditional_delete_is_the_rest_one(ingest_pg):
    """Its ``ifMatch`` guards the match's version (it was not read: a stale one deleted), and
    an entry that matches nothing says so in its outcome."""
    await stored_patients(ingest_pg)

    def deleting(url: str, **request) -> dict:
        return {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "DELETE", "url": url, **request}}]}

    stale = await ingest_pg.post("/fhir", json=deleting("Patient?identifier=urn:mrn|one",
                                                        ifMatch='W/"2"'))
    assert stale.status_code == 412, stale.text
    assert stale.json()["issue"][0]["expression"] == ["Bundle.entry[0].request.ifMatch"]
    assert (await ingest_pg.get("/fhir/Patient/one")).status_code == 200
    r = await ingest_pg.post("/fhir", json=deleting("Patient?identifier=urn:mrn|one",
                                                    ifMatch='W/"1"'))
    assert r.json()["entry"][0]["response"]["status"] == "204 No Content", r.text
    assert (await ingest_pg.get("/fhir/Patient/one")).status_code == 410
    r = await ingest_pg.post("/fhir", json=deleting("Patient?identifier=urn:mrn|one"))
    response = r.json()["entry"][0]["response"]
    assert response["status"] == "204 No Content"
    assert response["outcome"]["issue"][0]["code"] == "not-found"


# ---- conditional read ----------------------------------------------------------------------

V1_AT, V2_AT = "2026-03-01T10:00:00.500Z", "2026-03-02T10:00:00.500Z"
V2_HTTP = "Mon, 02 Mar 2026 10:00:00 GMT"  # version 2's Last-Modified


async def two_versions(client) -> None:
    """Patient/p: version 1 at V1_AT, version 2 (current) at V2_AT; Patient/gone, deleted."""
    await put(client, "/fhir/Patient/p", patient("p", id="p", meta={"lastUpdated": V1_AT}))
    await put(client, "/fhir/Patient/p", patient("p", id="p", active=True,
                                                  meta={"lastUpdated": V2_AT}))
    await put(client, "/fhir/Patient/gone", patient("gone", id="gone"))
    assert (await client.delete("/fhir/Patient/gone")).status_code == 204


# (what, path, headers, status: 304 answers with the version given, 200 with the resource)
READS = [
    ("the current version", "p", {"If-None-Match": 'W/"2"'}, 304),
    ("an older version", "p", {"If-None-Match": 'W/"1"'}, 200),
    ("a strong ETag", "p", {"If-None-Match": '"2"'}, 304),
    ("a bare version", "p", {"If-None-Match": "2"}, 304),
    ("a list with the current version", "p", {"If-None-Match": 'W/"1", W/"2"'}, 304),
    ("any version", "p", {"If-None-Match": "*"}, 304),
    ("a tag of no version", "p", {"If-None-Match": 'W/"abc"'}, 200),
    ("its Last-Modified", "p", {"If-Modified-Since": V2_HTTP}, 304),
    ("a later date", "p", {"If-Modified-Since": "Tue, 01 Jan 2030 00:00:00 GMT"}, 304),
    ("a second before", "p", {"If-Modified-Since": "Mon, 02 Mar 2026 09:59:59 GMT"}, 200),
    ("If-None-Match decides: an older version, a later date", "p",
     {"If-None-Match": 'W/"1"', "If-Modified-Since": "Tue, 01 Jan 2030 00:00:00 GMT"}, 200),
    ("If-None-Match decides: the current version, an earlier date", "p",
     {"If-None-Match": 'W/"2"', "If-Modified-Since": "Sun, 01 Jan 2000 00:00:00 GMT"}, 304),
    ("a vread of that version", "p/_history/1", {"If-None-Match": 'W/"1"'}, 304),
    ("a vread of another version", "p/_history/1", {"If-None-Match": 'W/"2"'}, 200),
    ("a vread since its Last-Modified", "p/_history/1",
     {"If-Modified-Since": "Sun, 01 Mar 2026 10:00:00 GMT"}, 304),
    ("a vread modified since", "p/_history/2",
     {"If-Modified-Since": "Sun, 01 Mar 2026 10:00:00 GMT"}, 200),
    ("If-None-Match that is no ETag", "p", {"If-None-Match": "v2"}, 400),
    ("If-None-Match empty", "p", {"If-None-Match": ""}, 400),
    ("If-Modified-Since that is no HTTP date", "p", {"If-Modified-Since": "2026-03-02"}, 400),
    ("a deleted resource", "gone", {"If-None-Match": "*"}, 410),
    ("a resource never stored", "nope", {"If-None-Match": "*"}, 404),
]


@pytest.mark.parametrize(("path", "headers", "status"), [row[1:] for row in READS],
                         ids=[row[0] for row in READS])
async def test_a_conditional_read_answers_304_when_the_clients_copy_is_current(
        ingest_pg, path, headers, status):
    await two_versions(ingest_pg)
    plain = await ingest_pg.get(f"/fhir/Patient/{path}")
    r = await ingest_pg.get(f"/fhir/Patient/{path}", headers=headers)
    assert r.status_code == status, r.text
    if status == 304:
        assert r.content == b""
        assert (r.headers["etag"], r.headers["last-modified"]) == \
            (plain.headers["etag"], plain.headers["last-modified"])
        assert "location" not in r.headers and "content-type" not in r.headers
    elif status == 200:
        assert (r.json(), r.headers["etag"]) == (plain.json(), plain.headers["etag"])
    else:
        assert r.json()["resourceType"] == "OperationOutcome"
        if status == 400:
            assert r.json()["issue"][0]["expression"] == list(headers)


async def test_a_conditional_read_of_another_practices_resource_is_a_404(ingest_pg):
    """A 304 would say that the id exists, and which version it is at: another practice's
    token gets what any unknown id gets, over REST and in a Bundle."""
    await two_versions(ingest_pg)
    beta = as_token(ingest_pg, "beta")
    for path in ("p", "p/_history/2"):
        for conditions in ({"If-None-Match": 'W/"2"'}, {"If-None-Match": "*"},
                           {"If-Modified-Since": "Tue, 01 Jan 2030 00:00:00 GMT"}):
            own = await ingest_pg.get(f"/fhir/Patient/{path}", headers=conditions)
            r = await ingest_pg.get(f"/fhir/Patient/{path}", headers={**conditions, **beta})
            assert (own.status_code, r.status_code) == (304, 404), (path, conditions)
            assert "etag" not in r.headers and "last-modified" not in r.headers
    reads = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p", "ifNoneMatch": 'W/"2"'}},
        {"request": {"method": "GET", "url": "Patient/p", "ifModifiedSince": V2_AT}}]}
    own = await ingest_pg.post("/fhir", json=reads)
    assert [e["response"]["status"] for e in own.json()["entry"]] == ["304 Not Modified"] * 2
    r = await ingest_pg.post("/fhir", headers=beta, json=reads)
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["404 Not Found"] * 2
    assert all("resource" not in e and "etag" not in e["response"] for e in r.json()["entry"])


@pytest.mark.parametrize("kind", ["batch", "transaction"])
async def test_a_bundles_conditional_reads_answer_304_entries(ingest_pg, kind):
    await two_versions(ingest_pg)
    read = await ingest_pg.post("/fhir", json={"resourceType": "Bundle", "type": "batch",
                                               "entry": [{"request": {"method": "GET",
                                                                      "url": "Patient/p"}}]})
    modified = read.json()["entry"][0]["response"]["lastModified"]
    assert modified == "2026-03-02T10:00:00.500000+00:00"

    def get(url: str, **conditions) -> dict:
        return {"request": {"method": "GET", "url": url, **conditions}}

    r = await ingest_pg.post("/fhir", headers={"Prefer": "return=representation"}, json={
        "resourceType": "Bundle", "type": kind, "entry": [
            get("Patient/p", ifNoneMatch='W/"2"'),
            get("Patient/p", ifNoneMatch='W/"1"'),
            get("Patient/p", ifModifiedSince=modified),
            get("Patient/p", ifModifiedSince="2026-03-02T10:00:00.499Z"),
            get("Patient/p/_history/1", ifNoneMatch='W/"1"'),
            get("Patient/p", ifModifiedSince="yesterday"),
            get("Patient?_id=p", ifNoneMatch='W/"2"'),  # a search has no version: answered
            get("Patient/nope", ifNoneMatch="*"),
            get("Patient/gone", ifNoneMatch="*")]})
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "304 Not Modified", "200 OK", "304 Not Modified", "200 OK", "304 Not Modified",
        "400 Bad Request", "200 OK", "404 Not Found", "410 Gone"]
    for n in (0, 2, 4):  # the version's etag and time; no resource, even when asked for one
        response = entries[n]["response"]
        assert "resource" not in entries[n]
        assert response["etag"] == ('W/"1"' if n == 4 else 'W/"2"')
        assert response["lastModified"] == ("2026-03-01T10:00:00.500000+00:00" if n == 4
                                             else modified)
    assert entries[1]["resource"]["meta"]["versionId"] == "2"
    assert entries[3]["resource"]["meta"]["versionId"] == "2"
    assert entries[5]["response"]["outcome"]["issue"][0]["expression"] == \
        ["Bundle.entry[5].request.ifModifiedSince"]
    assert entries[6]["resource"]["total"] == 1


async def test_a_304_is_a_read_in_the_patients_trail(ingest_pg):
    """A 304 tells the client the resource is there, unchanged: a read (R) of it, with its
    outcome (success), over REST and in a Bundle; another practice's attempt is in that
    practice's trail (a failure), never in this one's."""
    await two_versions(ingest_pg)
    assert (await ingest_pg.get("/fhir/Patient/p",
                                headers={"If-None-Match": 'W/"2"'})).status_code == 304
    r = await ingest_pg.post("/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p", "ifNoneMatch": 'W/"2"'}}]})
    assert r.json()["entry"][0]["response"]["status"] == "304 Not Modified"
    beta = as_token(ingest_pg, "beta")
    assert (await ingest_pg.get("/fhir/Patient/p", headers={
        "If-None-Match": 'W/"2"', **beta})).status_code == 404
    reads = [e for e in await trail(ingest_pg, ingest_pg.practice) if e[0] == "R"]
    assert reads == [("R", "GET /fhir/{rtype}/{rid}", "Patient/p", "p", 0),
                     ("R", "POST /fhir", "/fhir", "p", 0)]
    assert await trail(ingest_pg, ingest_pg.other) == [
        ("R", "GET /fhir/{rtype}/{rid}", "Patient/p", "p", 4)]


# ---- what the server says it does ----------------------------------------------------------

async def test_the_capability_statement_says_what_is_supported(ingest_pg):
    body = (await ingest_pg.get("/fhir/metadata")).json()
    for resource in body["rest"][0]["resource"]:
        assert (resource["conditionalCreate"], resource["conditionalUpdate"],
                resource["conditionalDelete"], resource["conditionalRead"]) == \
            (True, True, "single", "full-support"), resource["type"]
    r = await ingest_pg.patch("/fhir/Patient?identifier=x", json={})
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, HEAD, POST, PUT"
    assert json.loads(r.content)["resourceType"] == "OperationOutcome"
