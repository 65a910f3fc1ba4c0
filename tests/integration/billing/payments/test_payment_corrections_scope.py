"""The routes that void payments and record refunds are behind the ``billing`` scope as every
route of billing's own router is (tests/unit/billing/test_scopes.py counts that router's
routes; these live in a router of their own)."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi.routing import APIRoute

from ccm_billing.bootstrap import SERVICE
from ccm_billing.entrypoints.http import billing_tenant
from ccm_billing.entrypoints.payment_corrections import build_payment_corrections_router
from ccm_shared.http import json_body
from tests.support.routes import calls


def test_every_route_of_the_payment_corrections_router_requires_the_billing_scope():
    routes = [r for r in build_payment_corrections_router(SimpleNamespace(db=None)).routes
              if isinstance(r, APIRoute)]
    assert sorted((sorted(r.methods)[0], r.path) for r in routes) == [
        ("POST", "/v1/invoices/{invoice_id}/payments/{payment_id}/void"),
        ("POST", "/v1/invoices/{invoice_id}/refunds")]
    for route in routes:
        assert {billing_tenant, json_body} <= calls(route.dependant), route.path


def test_the_service_serves_the_router_and_declares_its_events():
    runtime = SimpleNamespace(db=None)
    paths = {r.path for router in SERVICE.routers(runtime) for r in router.routes}
    assert {"/v1/invoices/{invoice_id}/payments/{payment_id}/void",
            "/v1/invoices/{invoice_id}/refunds"} <= paths
    assert {"billing.payment.voided.v1", "billing.payment.refunded.v1"} <= set(SERVICE.produces)
