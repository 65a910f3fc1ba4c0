"""Billing's scopes (README, "Scopes"). Every read (GET) takes ``billing:read`` or ``billing``;
every write needs ``billing``. A practice system's ``billing:read`` token reads every invoice,
worklist, report, FHIR Invoice/ChargeItem, consent tracker and time log, and is refused (403,
nothing written) every payment, void, refund, close, recompute, duplicate-biller release or
reclaim, EHR endpoint change and push retry. The audit packet holds the patient's audit trail
(who read the patient, token ids and labels), which ``GET …/audit-events`` gives only to
``admin``: it needs ``admin`` besides a billing scope. An EHR connection's token (fhir:read +
fhir:write), or any token with neither billing scope — ``admin`` included — gets 403 on every
route: problem+json, an OperationOutcome under /fhir, and nothing is written. The table of
calls below is checked against the app's routes, so a new route cannot be left out of it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.routing import APIRoute

from ccm_billing.adapters.orm import metadata
from ccm_billing.compliance.http import build_compliance_router, packet_reader
from ccm_billing.entrypoints.http import billing_reader, billing_tenant, build_router
from ccm_billing.entrypoints.payment_corrections import build_payment_corrections_router
from ccm_shared.tenancy import DEFAULT_SCOPES, create_token
from tests.support.routes import calls, open_routes, snapshot
from tests.unit.billing.test_billing_flow import api, march_practice
from tests.unit.test_token_scopes import (  # noqa: F401 - platform_url: a fixture
    ccm_token_create,
    last_stdout_line,
    platform_url,
    resolve,
)

EHR = ("fhir:read", "fhir:write")
ALL_BUT_BILLING = tuple(s for s in DEFAULT_SCOPES if s not in ("billing", "billing:read"))
READ_ONLY = ("billing:read",)
FHIR_JSON = "application/fhir+json"
PROBLEM_JSON = "application/problem+json"

MONTH = "/v1/practices/{practice}/billing-periods/{month}"
# Every route of billing's routers: (method, route path, body). A route not in it fails
# test_the_table_has_every_route; GET is a read, every other method a write.
ROUTES: list[tuple[str, str, dict | None]] = [
    ("GET", f"{MONTH}/worklist", None),
    ("POST", f"{MONTH}/close", None),
    ("GET", f"{MONTH}/report.json", None),
    ("GET", f"{MONTH}/report.csv", None),
    ("POST", f"{MONTH}/duplicates/{{patient}}/resolve", {"decision": "release"}),
    ("GET", "/v1/practices/{practice}/invoices", None),
    ("GET", "/v1/invoices/{invoice_id}", None),
    ("POST", "/v1/invoices/{invoice_id}/payments", {"amount": "10.00", "date": "2025-04-02"}),
    ("POST", f"{MONTH}/recompute", {"reason": "contract amended"}),
    ("PUT", "/v1/practices/{practice}/ehr-endpoint", {"baseUrl": "https://ehr.example.org/fhir"}),
    ("GET", "/v1/practices/{practice}/ehr-endpoint", None),
    ("DELETE", "/v1/practices/{practice}/ehr-endpoint", None),
    ("GET", "/v1/practices/{practice}/ehr-deliveries", None),
    ("POST", "/v1/practices/{practice}/ehr-deliveries/{delivery_id}/retry", None),
    ("GET", "/fhir/Invoice/{resource_id}", None),
    ("GET", "/fhir/ChargeItem/{resource_id}", None),
    ("GET", "/fhir/Invoice", None),
    ("GET", "/fhir/ChargeItem", None),
    ("POST", "/v1/invoices/{invoice_id}/payments/{payment_id}/void", {"reason": "bounced"}),
    ("POST", "/v1/invoices/{invoice_id}/refunds", {"amount": "1.00", "date": "2025-04-02"}),
    ("GET", "/v1/practices/{practice}/consents", None),
    ("GET", "/v1/practices/{practice}/consents.csv", None),
    ("GET", "/v1/practices/{practice}/patients/{patient}/time-log", None),
    ("GET", "/v1/practices/{practice}/patients/{patient}/audit-packet", None),
]
QUERY = {"time-log": {"month": "2025-03"}, "audit-packet": {"from": "2025-03"}}
PACKET = "/v1/practices/{practice}/patients/{patient}/audit-packet"


def needs_admin(path: str) -> bool:
    """The audit packet: its audit trail needs ``admin`` (as ``…/audit-events`` does)."""
    return path.endswith("/audit-packet")


def routers(runtime) -> list[APIRoute]:  # noqa: ANN001
    return [r for router in (build_router(runtime), build_payment_corrections_router(runtime),
                             build_compliance_router(runtime))
            for r in router.routes if isinstance(r, APIRoute)]


def concrete(path: str, ids: dict[str, str]) -> str:
    """The route path with this test's ids (a FHIR read: the Invoice's or the ChargeItem's)."""
    resource = ids["item"] if path.startswith("/fhir/ChargeItem") else ids["invoice"]
    return path.format(practice="alpha", month="2025-03", patient="p1", delivery_id="d1",
                       invoice_id=ids["invoice"], payment_id=ids["payment"],
                       resource_id=resource)


def billing_calls(ids: dict[str, str]) -> list[tuple[str, str, dict | None, dict]]:
    """(method, URL, body, query) of every route."""
    return [(method, concrete(path, ids), body, QUERY.get(path.rsplit("/", 1)[-1], {}))
            for method, path, body in ROUTES]


def test_the_table_has_every_route(billing):
    assert sorted((m, p) for m, p, _ in ROUTES) == sorted(
        (m, r.path) for r in routers(billing) for m in r.methods)


def test_reads_take_billing_read_and_writes_need_billing(billing):
    """The dependencies as declared: a read resolves ``billing_reader`` (never the write
    check), a write ``billing_tenant``."""
    wrong = []
    for route in routers(billing):
        deps = calls(route.dependant)
        read = route.methods == {"GET"}
        if read and (billing_reader not in deps or billing_tenant in deps):
            wrong.append(f"GET {route.path}")
        if not read and billing_tenant not in deps:
            wrong.append(f"{sorted(route.methods)} {route.path}")
    assert wrong == []


async def closed_march(runtime) -> tuple[str, str]:  # noqa: ANN001
    """March closed with the full-scope token: the Invoice id and one ChargeItem id."""
    await march_practice(runtime)
    runtime.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    r = await api(runtime).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert r.status_code == 200, r.text
    invoice = r.json()["invoice"]["id"]
    items = (await api(runtime).get("/fhir/ChargeItem", params={"subject": "Patient/p1"})).json()
    return invoice, items["entry"][0]["resource"]["id"]


async def closed_and_paid(runtime) -> dict[str, str]:  # noqa: ANN001
    """March closed and paid $5.00 with the full-scope token: the Invoice's, one ChargeItem's
    and the payment's ids."""
    invoice, item = await closed_march(runtime)
    paid = await api(runtime).post(f"/v1/invoices/{invoice}/payments",
                                   json={"amount": "5.00", "date": "2025-04-02"})
    assert paid.status_code == 201, paid.text
    return {"invoice": invoice, "item": item, "payment": paid.json()["payment"]["id"]}


def refused(r, method: str, path: str, scope: str) -> None:  # noqa: ANN001
    assert r.status_code == 403, (method, path, r.status_code, r.text)
    if path.startswith("/fhir"):
        assert r.headers["content-type"] == FHIR_JSON, path
        assert r.json()["resourceType"] == "OperationOutcome"
        assert r.json()["issue"][0]["code"] == "forbidden"
    else:
        assert r.headers["content-type"] == PROBLEM_JSON, path
        assert r.json()["status"] == 403
    assert f"{scope!r} scope" in r.text, path


@pytest.mark.parametrize("scopes", [EHR, ALL_BUT_BILLING], ids=["ehr", "all-but-billing"])
async def test_a_token_without_a_billing_scope_gets_403_everywhere_and_writes_nothing(
        billing, scopes):
    ids = await closed_and_paid(billing)
    token = await create_token(billing.db.engine, practice_id="alpha", scopes=scopes)
    auth = {"Authorization": f"Bearer {token}"}
    before = await snapshot(billing, metadata)
    client = billing.state["client"]
    for method, path, body, query in billing_calls(ids):
        r = await client.request(method, path, headers=auth, json=body, params=query)
        refused(r, method, path, "billing:read" if method == "GET" else "billing")
    assert await snapshot(billing, metadata) == before  # no payment, close, release, endpoint…
    full = api(billing)
    assert len((await full.get(f"/v1/invoices/{ids['invoice']}")).json()["payments"]) == 1
    assert (await full.get("/v1/practices/alpha/ehr-endpoint")).status_code == 404


async def test_a_billing_read_token_reads_everything_and_writes_nothing(billing):
    """A practice system's token: every read answers (200; the EHR endpoint none is set: 404),
    every write 403 before anything is written: the invoice stays unpaid by it, the month
    closed once, the payment not voided, no endpoint set, no patient released."""
    ids = await closed_and_paid(billing)
    token = await create_token(billing.db.engine, practice_id="alpha", scopes=READ_ONLY)
    auth = {"Authorization": f"Bearer {token}"}
    before = await snapshot(billing, metadata)
    client = billing.state["client"]
    for method, path, body, query in billing_calls(ids):
        r = await client.request(method, path, headers=auth, json=body, params=query)
        if method == "GET" and needs_admin(path):
            refused(r, method, path, "admin")  # the packet's audit trail is not the ERP's
        elif method == "GET":
            expected = 404 if path.endswith("/ehr-endpoint") else 200
            assert r.status_code == expected, (method, path, r.status_code, r.text)
        else:
            refused(r, method, path, "billing")
    assert await snapshot(billing, metadata) == before
    got = await client.get(f"/v1/invoices/{ids['invoice']}", headers=auth)
    assert [(p["amount"], p["voided"]) for p in got.json()["payments"]] == [("5.00", None)]


async def test_a_token_with_only_the_billing_scope_reads_and_writes(billing):
    """``billing`` (every token made before ``billing:read`` existed) still reads and writes."""
    ids = await closed_and_paid(billing)
    token = await create_token(billing.db.engine, practice_id="alpha", scopes=("billing",))
    auth = {"Authorization": f"Bearer {token}"}
    client = billing.state["client"]
    for method, path, _, query in billing_calls(ids):
        if method == "GET":
            r = await client.get(path, headers=auth, params=query)
            if needs_admin(path):
                refused(r, method, path, "admin")
            else:
                assert r.status_code == (404 if path.endswith("/ehr-endpoint") else 200), path
    paid = await client.post(f"/v1/invoices/{ids['invoice']}/payments", headers=auth,
                             json={"amount": "10.00", "date": "2025-04-02"})
    assert paid.status_code == 201, paid.text
    voided = await client.post(f"/v1/invoices/{ids['invoice']}/payments/{ids['payment']}/void",
                               headers=auth, json={"reason": "recorded in error"})
    assert voided.status_code == 200, voided.text
    got = await client.get(f"/v1/invoices/{ids['invoice']}", headers=auth)
    assert [p["amount"] for p in got.json()["payments"] if p["voided"] is None] == ["10.00"]
    assert (await client.get("/v1/practices/alpha/invoices")).status_code == 401  # no token


@pytest.mark.parametrize(("scopes", "status", "lacking"), [
    (("billing:read",), 403, "admin"),  # a practice ERP's token: the finding
    (("billing",), 403, "admin"),
    (("admin",), 403, "billing:read"),  # the trail's scope alone reads no billing record
    (("fhir:read", "fhir:write"), 403, "billing:read"),
    (("billing:read", "admin"), 200, None),
    (("billing", "admin"), 200, None),
    (DEFAULT_SCOPES, 200, None),
], ids=["billing-read", "billing", "admin", "ehr", "billing-read+admin", "billing+admin",
        "default"])
async def test_the_audit_packet_needs_what_its_audit_trail_needs(billing, scopes, status,
                                                                 lacking):
    """The packet holds who read the patient (token ids and labels): ``GET …/audit-events``
    gives that only to ``admin``, so the packet needs ``admin`` too (besides a billing scope),
    in both formats; refused before anything is read."""
    await closed_march(billing)
    token = await create_token(billing.db.engine, practice_id="alpha", scopes=scopes)
    auth = {"Authorization": f"Bearer {token}"}
    client = billing.state["client"]
    path = PACKET.format(practice="alpha", patient="p1")
    for fmt in ("fhir", "pdf"):
        r = await client.get(path, headers=auth, params={"from": "2025-03", "format": fmt})
        if status == 403:
            refused(r, "GET", path, lacking)
        else:
            assert r.status_code == 200, (scopes, fmt, r.text)
    trail = await client.get("/v1/practices/alpha/audit-events", headers=auth,
                             params={"patient": "p1"})
    assert (trail.status_code == 200) == ("admin" in scopes)
    # Never more of the trail through the packet than directly.
    assert status == 403 or trail.status_code == 200


def test_the_audit_packet_route_resolves_the_packet_check():
    """Declared on the route (and on no other): ``packet_reader`` over ``billing_reader``."""
    class Runtime:  # building the router reads nothing of it but ``db``
        db = None

    found = {r.path: calls(r.dependant) for r in build_compliance_router(Runtime()).routes
             if isinstance(r, APIRoute)}
    assert {p for p, deps in found.items() if packet_reader in deps} == {PACKET}
    assert billing_reader in found[PACKET]


async def test_the_routes_open_without_a_token_are_only_the_probes_and_metrics(billing):
    assert await open_routes(billing.state["client"]) == {
        ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


def test_ccm_token_create_makes_a_billing_read_token(platform_url):  # noqa: F811 - the fixture
    """``ccm token create --scope billing:read`` (the CLI checks against DEFAULT_SCOPES): a
    token with exactly that scope."""
    result = ccm_token_create("--scope", "billing:read", "--label", "practice erp")
    assert result.exit_code == 0, result.output
    tenant = resolve(platform_url, last_stdout_line(result))
    assert tenant is not None and tenant.scopes == {"billing:read"}
