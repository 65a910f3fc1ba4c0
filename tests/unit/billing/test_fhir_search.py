"""Billing's /fhir: every error an OperationOutcome (application/fhir+json) with its status — a
search parameter refused is a 400, as FHIR has it, not the platform's 422 problem+json — and a
search does what its parameters ask or says which one it cannot do: ``_id``, ``identifier``,
``status`` are searched, any other parameter is refused (a server SHALL NOT ignore one
silently: ``_id=does-not-exist`` answered every Invoice), and the links name only what was
used."""

import json
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from ccm_billing.adapters import fhir, filed
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver
from tests.unit.billing.test_scopes import closed_march

FHIR_JSON = "application/fhir+json"


def outcome(r: httpx.Response, status: int, code: str) -> dict:
    """The issue of an OperationOutcome answered with ``status``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == FHIR_JSON, r.headers
    doc = r.json()
    assert doc["resourceType"] == "OperationOutcome" and doc["issue"][0]["code"] == code, doc
    return doc["issue"][0]


def ids(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [e["resource"]["id"] for e in r.json().get("entry", [])]


def self_params(r: httpx.Response) -> list[tuple[str, str]]:
    link = next(x["url"] for x in r.json()["link"] if x["relation"] == "self")
    return parse_qsl(urlsplit(link).query)


@pytest.mark.parametrize("path", ["/fhir/Invoice", "/fhir/ChargeItem"])
@pytest.mark.parametrize(("params", "where"), [
    ({"_count": "5000"}, "_count"), ({"_count": "-1"}, "_count"), ({"_count": "x"}, "_count"),
    ({"_offset": "-1"}, "_offset"), ({"_offset": "100001"}, "_offset"),
])
async def test_a_paging_parameter_out_of_range_is_a_400_operation_outcome(billing, path, params,
                                                                         where):
    issue = outcome(await api(billing).get(path, params=params), 400, "invalid")
    assert issue["expression"] == [where] and issue["diagnostics"].startswith(f"{where}: ")


async def test_every_other_error_under_fhir_is_an_operation_outcome_too(billing):
    client = billing.state["client"]
    missing = outcome(await client.get("/fhir/Invoice"), 401, "login")
    assert "bearer" in missing["diagnostics"]
    assert (await client.get("/fhir/Invoice")).headers["www-authenticate"] == 'Bearer realm="ccm"'
    outcome(await api(billing).get("/fhir/Patient"), 404, "not-found")  # no such route here
    outcome(await api(billing).post("/fhir/Invoice"), 405, "not-supported")
    outcome(await api(billing).get("/fhir/Invoice", params={"date": "soon"}), 400, "value")
    # No text of PostgreSQL holds a NUL: the database's refusal was a 422 (as ingest's: 400).
    outcome(await api(billing).get("/fhir/Invoice", params={"_id": "a\x00b"}), 400, "value")
    outcome(await api(billing).get("/fhir/Invoice/a%00b"), 400, "value")
    outcome(await api(billing).get("/fhir/ChargeItem", params={"subject": "Group/g1"}), 400,
            "not-supported")
    # Elsewhere the platform's problem+json stays, with its 422.
    other = await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist",
                                   params={"status": "bogus"})
    assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"


async def test_an_unexpected_failure_and_the_body_limit_under_fhir_are_operation_outcomes(
        billing, monkeypatch):
    async def failing(*args, **kwargs):
        raise RuntimeError("the disk is on fire")

    await closed_march(billing)
    monkeypatch.setattr(filed, "invoice_resources", failing)
    app = billing.app()
    headers = {"Authorization": f"Bearer {billing.state['tokens']['alpha']}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://t") as client:
        issue = outcome(await client.get("/fhir/Invoice", headers=headers), 500, "exception")
    assert "disk" not in issue["diagnostics"]  # the platform's words, not the error's
    sent = []

    async def receive():  # noqa: ANN202
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):  # noqa: ANN001, ANN202
        sent.append(message)

    too_big = str(billing.settings.max_body_bytes + 1).encode()
    await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
               "scheme": "http", "path": "/fhir/Invoice", "raw_path": b"/fhir/Invoice",
               "query_string": b"", "server": ("t", 80), "client": ("c", 1), "root_path": "",
               "headers": [(b"host", b"t"), (b"authorization", headers["Authorization"].encode()),
                           (b"content-length", too_big)]}, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    assert start["status"] == 413 and (b"content-type", FHIR_JSON.encode()) in start["headers"]
    assert (b"content-length", str(len(body)).encode()) in start["headers"]
    assert json.loads(body)["issue"][0]["code"] == "too-costly"


@pytest.mark.parametrize("path", ["/fhir/Invoice", "/fhir/ChargeItem"])
@pytest.mark.parametrize("name", ["foo", "patient", "status:not", "_sort", "_summary", "_total"])
async def test_a_parameter_a_search_does_not_take_is_refused_naming_it(billing, path, name):
    issue = outcome(await api(billing).get(path, params={name: "x"}), 400, "not-supported")
    assert issue["expression"] == [name]
    assert f"{name!r} is not supported; supported: _id, identifier, status" in issue["diagnostics"]


async def test_paging_given_twice_is_refused_and_format_is_no_criterion(billing):
    outcome(await api(billing).get("/fhir/Invoice?_count=1&_count=2"), 400, "value")
    found = await api(billing).get("/fhir/Invoice", params={"_format": "json", "_pretty": "true"})
    assert found.status_code == 200 and self_params(found) == [("_count", "50"), ("_offset", "0")]


async def test_an_invoice_search_by_id_identifier_and_status(billing):
    invoice, _ = await closed_march(billing)
    get = api(billing).get
    assert ids(await get("/fhir/Invoice", params={"_id": "does-not-exist"})) == []
    assert ids(await get("/fhir/Invoice", params={"_id": f"nope,{invoice}"})) == [invoice]
    assert ids(await get(f"/fhir/Invoice?_id=nope&_id={invoice}")) == []  # both must match
    for found, identifier in (([], "alpha:2099-01"), ([invoice], "alpha:2025-03"),
                              ([invoice], f"{fhir.INVOICE_SYSTEM}|alpha:2025-03"),
                              ([invoice], f"{fhir.INVOICE_SYSTEM}|"),
                              ([], "https://example.org/other|alpha:2025-03"),
                              ([], "|alpha:2025-03"), ([], "")):
        assert ids(await get("/fhir/Invoice", params={"identifier": identifier})) == found, \
            identifier
    assert ids(await get("/fhir/Invoice", params={"status": "cancelled"})) == []
    assert ids(await get("/fhir/Invoice", params={"status": "cancelled,issued"})) == [invoice]
    # Given twice, each date bound counts (the last one alone did: this found the Invoice).
    assert ids(await get("/fhir/Invoice?date=lt2025-01&date=ge2025-04")) == []
    assert ids(await get("/fhir/Invoice?date=ge2025-04&date=lt2025-05")) == [invoice]
    # Another practice's identifier is none of this one's Invoices.
    beta = api(billing, "beta")
    assert ids(await beta.get("/fhir/Invoice", params={"identifier": "alpha:2025-03"})) == []
    assert ids(await beta.get("/fhir/Invoice", params={"_id": invoice})) == []
    # Corrected: the cancelled Invoice and its replacement, each by its own identifier.
    await deliver(billing, ev.time_reversed("alpha", "p1", "e2"))
    replacement = (await get(f"/v1/invoices/{invoice}")).json()["replacedBy"]
    assert ids(await get("/fhir/Invoice", params={"identifier": "alpha:2025-03:r1"})) == [
        replacement]
    assert ids(await get("/fhir/Invoice", params={"status": "cancelled"})) == [invoice]
    both = await get("/fhir/Invoice", params={"identifier": "alpha:2025-03,alpha:2025-03:r1",
                                              "status": "issued", "_count": "5"})
    assert ids(both) == [replacement]
    assert self_params(both) == [("identifier", "alpha:2025-03,alpha:2025-03:r1"),
                                 ("status", "issued"), ("_count", "5"), ("_offset", "0")]


async def test_a_charge_item_search_by_id_identifier_and_status(billing):
    invoice, item = await closed_march(billing)
    get = api(billing).get
    everything = ids(await get("/fhir/ChargeItem"))
    assert len(everything) == 2 and item in everything
    assert ids(await get("/fhir/ChargeItem", params={"_id": "does-not-exist"})) == []
    assert ids(await get("/fhir/ChargeItem", params={"_id": item})) == [item]
    by_code = {}
    for code in ("99490", "99439"):
        found = ids(await get("/fhir/ChargeItem",
                              params={"identifier": f"alpha:p1:2025-03:{code}"}))
        assert len(found) == 1
        by_code[code] = found[0]
    assert sorted(by_code.values()) == sorted(everything)
    for nothing in ("alpha:p1:2025-04:99490", "beta:p1:2025-03:99490", "alpha:p1",
                    "https://example.org/x|alpha:p1:2025-03:99490"):
        assert ids(await get("/fhir/ChargeItem", params={"identifier": nothing})) == [], nothing
    system = fhir.CHARGE_ITEM_SYSTEM
    assert ids(await get("/fhir/ChargeItem", params={
        "identifier": f"{system}|alpha:p1:2025-03:99490"})) == [by_code["99490"]]
    assert ids(await get("/fhir/ChargeItem", params={"status": "entered-in-error"})) == []
    # Corrected (e2 in error: 99439 no longer billed), every revision has its identifier.
    await deliver(billing, ev.time_reversed("alpha", "p1", "e2"))
    voided = ids(await get("/fhir/ChargeItem", params={"status": "entered-in-error"}))
    assert sorted(voided) == sorted(everything)
    again = await get("/fhir/ChargeItem", params={"identifier": "alpha:p1:2025-03:99490",
                                                  "status": "billable"})
    assert len(ids(again)) == 1 and ids(again)[0] not in everything
    assert self_params(again)[:2] == [("identifier", "alpha:p1:2025-03:99490"),
                                      ("status", "billable")]


@pytest.mark.parametrize(("query", "previous"), [
    ({"_offset": "1", "_count": "2"}, {"_offset": ["0"], "_count": ["1"]}),  # not 0..1 again
    ({"_offset": "100", "_count": "2"}, {"_offset": ["0"], "_count": ["2"]}),  # the last page
])
async def test_the_previous_link_names_the_entries_before_the_page(billing, query, previous):
    """Billing's paging had the bug ingest's had: previous overlapped the page, and from past
    the end it named another empty page."""
    from urllib.parse import parse_qs, urlparse

    await closed_march(billing)  # two ChargeItems
    page = (await api(billing).get("/fhir/ChargeItem", params=query)).json()
    found = {link["relation"]: parse_qs(urlparse(link["url"]).query) for link in page["link"]}
    assert {k: v for k, v in found["previous"].items() if k in ("_offset", "_count")} == previous
