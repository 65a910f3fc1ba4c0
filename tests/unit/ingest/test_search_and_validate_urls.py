"""What a FHIR client finds at the URLs a walkthrough tried: search by POST (FHIR: a server
that searches SHALL take both GET and POST), `Prefer: handling=lenient`, paging links that
name the entries before a page and no others, `$validate` at an instance's URL and only for
the FHIR API's tokens, and the search parameters a type really has."""

from datetime import timedelta
from urllib.parse import parse_qs, urlparse

import pytest

from ccm_shared.tenancy import create_token
from tests.unit.ingest.conftest import counts, example
from tests.unit.ingest.test_fhir_api import FHIR, ccm_encounter

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def seven_encounters(fhir) -> None:  # noqa: ANN001
    start = fhir.clock.now
    for n in range(7):
        fhir.clock.now = start + timedelta(minutes=n)
        assert (await fhir.put(f"/fhir/Encounter/p{n}", json=ccm_encounter(f"p{n}"))).is_success


def ids(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def links(bundle: dict) -> dict[str, dict[str, list[str]]]:
    return {link["relation"]: parse_qs(urlparse(link["url"]).query)
            for link in bundle["link"]}


async def test_a_search_by_post_finds_what_the_get_finds(fhir):
    """POST /fhir/Patient/_search answered 405 "a create with an id of your own is a PUT"."""
    await seven_encounters(fhir)
    got = (await fhir.get("/fhir/Encounter", params={"patient": "Patient/p1",
                                                     "_count": "3"})).json()
    posted = await fhir.post("/fhir/Encounter/_search", content="patient=Patient%2Fp1&_count=3",
                             headers=FORM)
    assert posted.status_code == 200, posted.text
    assert ids(posted.json()) == ids(got) and posted.json()["total"] == got["total"] == 7
    # Its links are GET URLs of what it searched: the next page is followed as any other.
    assert links(posted.json())["next"] == {"patient": ["Patient/p1"], "_offset": ["3"],
                                            "_count": ["3"]}
    # The URL's parameters and the body's are one search (FHIR).
    both = await fhir.post("/fhir/Encounter/_search?_count=2", content="_id=p1,p2,p3",
                           headers=FORM)
    assert ids(both.json()) == ["p3", "p2"] and both.json()["total"] == 3
    # An empty body: the URL's parameters alone.
    assert (await fhir.post("/fhir/Encounter/_search?_id=p4")).json()["total"] == 1


@pytest.mark.parametrize(("body", "headers", "status", "where"), [
    ('{"patient": "Patient/p1"}', FHIR, 415, "Content-Type"),
    ("patient=%FF", FORM, 400, None),
    ("_sort=date", FORM, 400, "_sort"),
    ("_count=5000", FORM, 400, "_count"),
])
async def test_a_search_by_post_refuses_what_it_cannot_read(fhir, body, headers, status, where):
    r = await fhir.post("/fhir/Encounter/_search", content=body, headers=headers)
    assert r.status_code == status, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0].get("expression", [None]) == [where]


async def test_a_search_by_post_needs_the_read_scope(fhir):
    token = await create_token(fhir.runtime.db.engine, practice_id="alpha",
                               scopes=("fhir:write",))
    r = await fhir.post("/fhir/Encounter/_search", content="_id=p1",
                        headers={**FORM, "Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"


async def test_another_method_at_the_search_url_names_post(fhir):
    r = await fhir.patch("/fhir/Encounter/_search", content="_id=1", headers=FORM)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await fhir.patch("/fhir/Encounter/p1/$validate", content="{}", headers=FHIR)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.parametrize("url", [
    "/fhir/Encounter?_sort=-date&_summary=count&_total=accurate&_count=2",
    "/fhir/Encounter/p1/_history?_at=2026&_count=2",
])
async def test_prefer_handling_lenient_ignores_unsupported_parameters(fhir, url):
    """`Prefer: handling=lenient` was ignored: _sort, _summary and _total still gave 400."""
    await seven_encounters(fhir)
    assert (await fhir.get(url)).status_code == 400  # strict, FHIR's default
    r = await fhir.get(url, headers={"Prefer": "return=minimal, handling=lenient"})
    assert r.status_code == 200, r.text
    # The self link names only what was used.
    assert links(r.json())["self"] == {"_count": ["2"]}
    # A bad value of a supported parameter is still refused.
    bad = await fhir.get("/fhir/Encounter?_count=x&_sort=date",
                         headers={"Prefer": "handling=lenient"})
    assert bad.status_code == 400 and bad.json()["issue"][0]["expression"] == ["_count"]


@pytest.mark.parametrize(("rtype", "listed"), [
    ("Patient", "_count, _id, _lastUpdated, _offset, identifier"),
    ("Consent", "_count, _id, _lastUpdated, _offset, identifier, patient"),
    ("Encounter", "_count, _id, _lastUpdated, _offset, identifier, patient, subject"),
])
async def test_an_unsupported_parameter_lists_the_types_own(fhir, rtype, listed):
    """A Patient's refusal listed patient and subject, which a Patient search refuses too."""
    r = await fhir.get(f"/fhir/{rtype}", params={"name": "x"})
    assert r.status_code == 400
    assert f"supported: {listed} (" in r.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize(("query", "previous"), [
    ({"_offset": "2", "_count": "3"}, {"_offset": ["0"], "_count": ["2"]}),  # not 0..2 again
    ({"_offset": "3", "_count": "3"}, {"_offset": ["0"], "_count": ["3"]}),
    ({"_offset": "6", "_count": "3"}, {"_offset": ["3"], "_count": ["3"]}),
    ({"_offset": "100", "_count": "3"}, {"_offset": ["4"], "_count": ["3"]}),  # the last page
])
async def test_the_previous_link_names_the_entries_before_the_page(fhir, query, previous):
    await seven_encounters(fhir)
    page = (await fhir.get("/fhir/Encounter", params=query)).json()
    found = links(page)
    assert found["previous"] == previous and found["first"]["_offset"] == ["0"]
    before = (await fhir.get("/fhir/Encounter", params={
        k: v[0] for k, v in previous.items()})).json()
    assert ids(before) and not set(ids(before)) & set(ids(page))


async def test_past_the_end_of_nothing_there_is_no_previous_page(fhir):
    page = (await fhir.get("/fhir/Encounter", params={"_offset": "5"})).json()
    assert page["total"] == 0 and "previous" not in links(page) and "first" in links(page)


async def test_validate_at_an_instance_url_is_an_update_of_that_id(fhir):
    """POST /fhir/Patient/example/$validate answered 404 "Not Found"."""
    patient = example("Patient/r4spec-example.json")
    before = await counts(fhir)
    ok = await fhir.post(f"/fhir/Patient/{patient['id']}/$validate", json=patient)
    assert ok.status_code == 200, ok.text
    assert ok.json()["issue"][0]["severity"] == "information"
    other = await fhir.post("/fhir/Patient/someone-else/$validate", json=patient)
    assert other.status_code == 400 and other.json()["issue"][0]["expression"] == ["Patient.id"]
    # An update needs the id in the body, as PUT does; mode=create does not.
    bare = {k: v for k, v in patient.items() if k != "id"}
    assert (await fhir.post("/fhir/Patient/x/$validate", json=bare)).status_code == 400
    assert (await fhir.post("/fhir/Patient/x/$validate?mode=create",
                            json=bare)).status_code == 200
    bad = await fhir.post("/fhir/Patient/x/$validate", json={**patient, "id": "x",
                                                             "gender": "m"})
    assert bad.status_code == 422
    assert await counts(fhir) == before  # nothing stored


async def test_validate_needs_a_token_of_the_fhir_api(fhir):
    """$validate answered any token, one of another service's included."""
    token = await create_token(fhir.runtime.db.engine, practice_id="alpha",
                               scopes=("careplan",))
    r = await fhir.post("/fhir/Patient/$validate", json=example("Patient/r4spec-example.json"),
                        headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    for scope in ("fhir:read", "fhir:write"):
        token = await create_token(fhir.runtime.db.engine, practice_id="alpha", scopes=(scope,))
        r = await fhir.post("/fhir/Patient/$validate",
                            json=example("Patient/r4spec-example.json"),
                            headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, (scope, r.text)


async def test_if_match_on_a_deleted_resource_says_it_is_deleted(fhir):
    """After a delete (version 2), If-Match W/"2" was told "does not match the current version
    (2)", and W/"1" "(none)": the two answers disagreed."""
    patient = {"resourceType": "Patient", "id": "hp1", "active": True}
    assert (await fhir.put("/fhir/Patient/hp1", json=patient)).status_code == 201
    stale = await fhir.put("/fhir/Patient/hp1", json=patient, headers={"If-Match": 'W/"7"'})
    assert stale.status_code == 412
    assert "its current version is W/\"1\"" in stale.json()["issue"][0]["diagnostics"]
    assert (await fhir.delete("/fhir/Patient/hp1")).status_code == 204
    for etag in ('W/"2"', 'W/"1"'):
        for r in (await fhir.put("/fhir/Patient/hp1", json=patient, headers={"If-Match": etag}),
                  await fhir.delete("/fhir/Patient/hp1", headers={"If-Match": etag})):
            assert r.status_code == 412
            said = r.json()["issue"][0]["diagnostics"]
            assert "Patient/hp1: it is deleted (version 2 is its deletion)" in said, said
    unknown = await fhir.put("/fhir/Patient/nobody", json={**patient, "id": "nobody"},
                             headers={"If-Match": 'W/"1"'})
    assert unknown.status_code == 412
    assert "no such resource is stored" in unknown.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize(("scope", "statuses"), [
    ("fhir:write", ["201", "403"]),
    ("fhir:read", ["403", "200"]),
])
async def test_a_batch_entry_the_token_may_not_do_is_refused_alone(fhir, scope, statuses):
    """A batch with a PUT and a GET, from a token without fhir:read, was refused whole (403)."""
    assert (await fhir.put("/fhir/Patient/b1", json={"resourceType": "Patient", "id": "b1"})
            ).status_code == 201
    token = await create_token(fhir.runtime.db.engine, practice_id="alpha", scopes=(scope,))
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "PUT", "url": "Patient/b2"},
         "resource": {"resourceType": "Patient", "id": "b2"}},
        {"request": {"method": "GET", "url": "Patient/b1"}}]}
    r = await fhir.post("/fhir", json=bundle, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert [e["response"]["status"].split()[0] for e in entries] == statuses
    refused = entries[statuses.index("403")]["response"]["outcome"]["issue"][0]
    assert refused["code"] == "forbidden" and "scope" in refused["diagnostics"]
    assert "resource" not in entries[statuses.index("403")]
    # A transaction is one: it is refused whole.
    whole = await fhir.post("/fhir", json={**bundle, "type": "transaction"},
                            headers={"Authorization": f"Bearer {token}"})
    assert whole.status_code == 403


async def test_a_conditional_create_matching_other_content_warns_that_nothing_changed(fhir):
    """An EHR that re-sent an Encounter as entered-in-error by ifNoneExist (the README's
    pattern for re-sending) got 200 OK: nothing stored, nothing said."""
    from tests.unit.ingest.conftest import events

    enc = {**ccm_encounter(), "identifier": [{"system": "urn:ehr:enc", "value": "E-1"}]}
    enc.pop("id", None)

    def bundle(resource: dict) -> dict:
        return {"resourceType": "Bundle", "type": "transaction", "entry": [{
            "fullUrl": "urn:uuid:5b0b6a8e-3f7e-4d0e-9d37-2c1f0f3c2a10", "resource": resource,
            "request": {"method": "POST", "url": "Encounter",
                        "ifNoneExist": "identifier=urn:ehr:enc|E-1"}}]}

    first = (await fhir.post("/fhir", json=bundle(enc))).json()["entry"][0]["response"]
    assert first["status"] == "201 Created" and "outcome" not in first
    same = (await fhir.post("/fhir", json=bundle(enc))).json()["entry"][0]["response"]
    assert same["status"] == "200 OK" and "outcome" not in same  # the same: nothing to say
    changed = {**enc, "status": "entered-in-error"}
    for kind in ("transaction", "batch"):
        r = (await fhir.post("/fhir", json={**bundle(changed), "type": kind})).json()
        answer = r["entry"][0]["response"]
        assert answer["status"] == "200 OK"
        (issue,) = answer["outcome"]["issue"]
        assert issue["severity"] == "warning" and issue["code"] == "duplicate"
        assert "PUT Encounter?identifier=urn:ehr:enc|E-1" in issue["diagnostics"]
    rest = await fhir.post("/fhir/Encounter", json=changed, headers={
        "If-None-Exist": "identifier=urn:ehr:enc|E-1", "Prefer": "return=OperationOutcome"})
    assert rest.status_code == 200 and rest.json()["issue"][0]["code"] == "duplicate"
    # As FHIR says: the match is not changed, and no reversal went out.
    assert len(await events(fhir, "ingest.time-entry.logged.v1")) == 1
    assert await events(fhir, "ingest.time-entry.reversed.v1") == []


async def test_head_of_a_read_answers_its_headers_without_the_body(fhir):
    """RFC 9110 §9.3.2 (an EHR's HEAD to check a version was a 405): the read's status, ETag and
    Last-Modified, no body; a deleted one's 410 too."""
    assert (await fhir.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1"},
                           headers=FHIR)).status_code == 201
    for url in ("/fhir/Patient/p1", "/fhir/Patient/p1/_history/1", "/fhir/metadata",
                "/fhir/Patient?_id=p1"):
        got, head = await fhir.get(url), await fhir.head(url)
        assert head.status_code == got.status_code == 200, url
        assert head.content == b"" and head.headers.get("etag") == got.headers.get("etag")
        assert head.headers["content-length"] == got.headers["content-length"]
    await fhir.delete("/fhir/Patient/p1")
    assert (await fhir.head("/fhir/Patient/p1")).status_code == 410


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_a_write_to_metadata_is_a_405_naming_get(fhir, method):
    """/fhir/metadata is read only: a write to it was a 404 'resource type metadata is not
    supported' (the create route took it for a type)."""
    r = await fhir.request(method, "/fhir/metadata", json={"resourceType": "Patient"},
                           headers=FHIR)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert r.json()["resourceType"] == "OperationOutcome"
    # a URL under it names nothing (it was a 405 naming GET as taken)
    for under in ("/fhir/metadata/x", "/fhir/metadata/x/_history"):
        assert (await fhir.get(under)).status_code == 404, under


@pytest.mark.parametrize("url", ["/fhir/Patient?_lastUpdated=ge2026-11-29T03:00:00+01:00",
                                 "/fhir/Patient/p1/_history?_since=2026-11-29T03:00:00+01:00"])
async def test_an_unencoded_plus_in_a_date_is_named(fhir, url):
    r = await fhir.get(url)
    assert r.status_code == 400
    assert "write a zone ahead of UTC as %2B" in r.json()["issue"][0]["diagnostics"]
    encoded = await fhir.get(url.replace("+", "%2B"))
    assert encoded.status_code in (200, 404), encoded.text
