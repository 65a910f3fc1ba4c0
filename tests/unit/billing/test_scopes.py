"""Billing's API needs a token with the ``billing`` scope: an EHR connection's token (fhir:read +
fhir:write), or any token without ``billing`` — ``admin`` included — gets 403 on every route of
billing's own router and of its compliance router (consents, time logs, audit packets):
problem+json, an OperationOutcome under /fhir, and nothing is written; a token with only
``billing`` works."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.routing import APIRoute

from ccm_billing.adapters.orm import metadata
from ccm_billing.compliance.http import build_compliance_router
from ccm_billing.entrypoints.http import billing_tenant, build_router
from ccm_shared.tenancy import DEFAULT_SCOPES, create_token
from tests.support.routes import calls, open_routes, snapshot
from tests.unit.billing.test_billing_flow import api, march_practice

EHR = ("fhir:read", "fhir:write")
ALL_BUT_BILLING = tuple(s for s in DEFAULT_SCOPES if s != "billing")
FHIR_JSON = "application/fhir+json"
PROBLEM_JSON = "application/problem+json"





async def closed_march(runtime) -> tuple[str, str]:  # noqa: ANN001
    """March closed with the full-scope token: the Invoice id and one ChargeItem id."""
    await march_practice(runtime)
    runtime.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    r = await api(runtime).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert r.status_code == 200, r.text
    invoice = r.json()["invoice"]["id"]
    items = (await api(runtime).get("/fhir/ChargeItem", params={"subject": "Patient/p1"})).json()
    return invoice, items["entry"][0]["resource"]["id"]


def billing_calls(invoice: str, item: str) -> list[tuple[str, str, dict | None]]:
    """One call of every route of billing's router (reads, writes, FHIR reads)."""
    month = "/v1/practices/alpha/billing-periods/2025-03"
    return [
        ("GET", f"{month}/worklist", None),
        ("POST", "/v1/practices/alpha/billing-periods/2025-02/close", None),
        ("GET", f"{month}/report.json", None),
        ("GET", f"{month}/report.csv", None),
        ("POST", f"{month}/duplicates/p1/resolve", {"decision": "release"}),
        ("GET", "/v1/practices/alpha/invoices", None),
        ("GET", f"/v1/invoices/{invoice}", None),
        ("POST", f"/v1/invoices/{invoice}/payments", {"amount": "10.00", "date": "2025-04-02"}),
        ("POST", f"{month}/recompute", {"reason": "contract amended"}),
        ("PUT", "/v1/practices/alpha/ehr-endpoint", {"baseUrl": "https://ehr.example.org/fhir"}),
        ("GET", "/v1/practices/alpha/ehr-endpoint", None),
        ("DELETE", "/v1/practices/alpha/ehr-endpoint", None),
        ("GET", "/v1/practices/alpha/ehr-deliveries", None),
        ("POST", "/v1/practices/alpha/ehr-deliveries/d1/retry", None),
        ("GET", f"/fhir/Invoice/{invoice}", None),
        ("GET", f"/fhir/ChargeItem/{item}", None),
        ("GET", "/fhir/Invoice", None),
        ("GET", "/fhir/ChargeItem", None),
    ]


@pytest.mark.parametrize("scopes", [EHR, ALL_BUT_BILLING], ids=["ehr", "all-but-billing"])
async def test_a_token_without_the_billing_scope_gets_403_everywhere_and_writes_nothing(
        billing, scopes):
    invoice, item = await closed_march(billing)
    token = await create_token(billing.db.engine, practice_id="alpha", scopes=scopes)
    auth = {"Authorization": f"Bearer {token}"}
    before = await snapshot(billing, metadata)
    client = billing.state["client"]
    for method, path, body in billing_calls(invoice, item):
        r = await client.request(method, path, headers=auth, json=body)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        if path.startswith("/fhir"):
            assert r.headers["content-type"] == FHIR_JSON, path
            assert r.json()["resourceType"] == "OperationOutcome"
            assert r.json()["issue"][0]["code"] == "forbidden"
        else:
            assert r.headers["content-type"] == PROBLEM_JSON, path
            assert r.json()["status"] == 403
        assert "'billing' scope" in r.text, path
    assert await snapshot(billing, metadata) == before  # no payment, close, release, endpoint…
    full = api(billing)
    assert (await full.get(f"/v1/invoices/{invoice}")).json()["payments"] == []
    assert (await full.get("/v1/practices/alpha/ehr-endpoint")).status_code == 404


async def test_a_token_with_only_the_billing_scope_reads_and_writes(billing):
    invoice, item = await closed_march(billing)
    token = await create_token(billing.db.engine, practice_id="alpha", scopes=("billing",))
    auth = {"Authorization": f"Bearer {token}"}
    client = billing.state["client"]
    listed = await client.get("/v1/practices/alpha/invoices", headers=auth)
    assert listed.status_code == 200 and [i["id"] for i in listed.json()["invoices"]] == [invoice]
    paid = await client.post(f"/v1/invoices/{invoice}/payments", headers=auth,
                             json={"amount": "10.00", "date": "2025-04-02"})
    assert paid.status_code == 201, paid.text
    got = await client.get(f"/v1/invoices/{invoice}", headers=auth)
    assert [p["amount"] for p in got.json()["payments"]] == ["10.00"]
    fhir = await client.get(f"/fhir/Invoice/{invoice}", headers=auth)
    assert fhir.status_code == 200 and fhir.json()["resourceType"] == "Invoice"
    assert (await client.get(f"/fhir/ChargeItem/{item}", headers=auth)).status_code == 200
    assert (await client.get("/v1/practices/alpha/invoices")).status_code == 401  # no token


def test_every_route_of_billings_router_requires_the_billing_scope(billing):
    routes = [r for r in build_router(billing).routes if isinstance(r, APIRoute)]
    assert len(routes) == len(billing_calls("i", "c"))  # the 403 test above calls each
    missing = [f"{sorted(r.methods)} {r.path}" for r in routes
               if billing_tenant not in calls(r.dependant)]
    assert missing == []


async def test_the_routes_open_without_a_token_are_only_the_probes_and_metrics(billing):
    assert await open_routes(billing.state["client"]) == {
        ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


def compliance_calls() -> list[tuple[str, dict]]:
    """One call of every route of billing's compliance router (all reads)."""
    return [
        ("/v1/practices/alpha/consents", {}),
        ("/v1/practices/alpha/consents.csv", {"state": "all"}),
        ("/v1/practices/alpha/patients/p1/time-log", {"month": "2025-03"}),
        ("/v1/practices/alpha/patients/p1/audit-packet", {"from": "2025-03"}),
    ]


@pytest.mark.parametrize("scopes", [EHR, ALL_BUT_BILLING], ids=["ehr", "all-but-billing"])
async def test_compliance_records_need_the_billing_scope(billing, scopes):
    await march_practice(billing)
    token = await create_token(billing.db.engine, practice_id="alpha", scopes=scopes)
    auth = {"Authorization": f"Bearer {token}"}
    before = await snapshot(billing, metadata)
    client = billing.state["client"]
    for path, params in compliance_calls():
        r = await client.get(path, headers=auth, params=params)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert r.headers["content-type"] == PROBLEM_JSON, path
        assert r.json()["status"] == 403 and "'billing' scope" in r.text, path
    assert await snapshot(billing, metadata) == before


async def test_a_token_with_only_the_billing_scope_reads_the_compliance_records(billing):
    await march_practice(billing)
    token = await create_token(billing.db.engine, practice_id="alpha", scopes=("billing",))
    auth = {"Authorization": f"Bearer {token}"}
    client = billing.state["client"]
    for path, params in compliance_calls():
        r = await client.get(path, headers=auth, params=params)
        assert r.status_code == 200, (path, r.status_code, r.text)
    packet = await client.get("/v1/practices/alpha/patients/p1/audit-packet", headers=auth,
                              params={"from": "2025-03"})
    assert packet.headers["content-type"] == FHIR_JSON and packet.json()["type"] == "collection"
    assert (await client.get("/v1/practices/alpha/consents")).status_code == 401  # no token


def test_every_route_of_the_compliance_router_requires_the_billing_scope(billing):
    routes = [r for r in build_compliance_router(billing).routes if isinstance(r, APIRoute)]
    assert len(routes) == len(compliance_calls())  # the 403 test above calls each
    missing = [f"{sorted(r.methods)} {r.path}" for r in routes
               if billing_tenant not in calls(r.dependant)]
    assert missing == []
