"""Every route of billing, careplan and notification whose body FastAPI parses into a model reads
that body as the platform's JSON APIs take it (``ccm_shared.http.json_body``): a key given twice
in one object is a 400 problem+json naming the key, and nothing changes (FastAPI's own reading
kept the last value: ``{"amount": "10.00", "amount": "1000.00"}`` recorded a payment of 1000);
a body labelled other than JSON (``text/plain``), or not labelled at all, is a 415 problem+json
(a 422 before); the same body as ``application/json`` is taken as before. The caller is
authenticated first (401, and 403 without the service's scope, before anything about the body).
Routes without a body (close a month, retry a delivery, acknowledge an alert, resume a
subscription, the signed links' form POSTs) need no Content-Type."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import MetaData, insert, update

from ccm_billing.adapters.orm import duplicate_releases
from ccm_billing.adapters.orm import metadata as billing_tables
from ccm_careplan.adapters.orm import metadata as careplan_tables
from ccm_careplan.service_layer.common import tracker_id
from ccm_notification.adapters.orm import metadata as notification_tables
from ccm_notification.adapters.rendering import default_source
from ccm_notification.entrypoints.workers import notifier_of
from ccm_shared.http import json_body
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tables import practices
from ccm_shared.tenancy import create_token
from ccm_shared.transport import InProcessTransport
from tests.support.routes import calls, snapshot
from tests.unit.billing.conftest import PRICING, billing  # noqa: F401 - the services' fixtures
from tests.unit.billing.test_billing_flow import march_practice
from tests.unit.careplan.conftest import careplan  # noqa: F401
from tests.unit.careplan.test_api import seed
from tests.unit.notification.conftest import acme, api  # noqa: F401

PROBLEM_JSON = "application/problem+json"
JSON = {"Content-Type": "application/json"}


@dataclass
class Service:
    """A service under test: its runtime, client, a full-scope token, its tables, and the ids
    its setup made (``ids``: formatted into the routes' paths)."""

    runtime: Any
    client: Any
    auth: dict[str, str]
    tables: MetaData
    scope: str | None  # the scope a dependency checks before the body (careplan: in the route)
    ids: dict[str, str] = field(default_factory=dict)

    async def send(self, method: str, path: str, content: Any = None,
                   headers: dict | None = None, auth: dict | None = None):  # noqa: ANN201
        request = self.client.build_request(method, path.format(**self.ids),
                                            headers={**(self.auth if auth is None else auth),
                                                     **(headers or {})},
                                            content=content)
        if headers is not None and "Content-Type" not in headers:
            request.headers.pop("Content-Type", None)
        return await self.client.send(request)


async def _billing(runtime) -> Service:  # noqa: ANN001
    """March closed (an Invoice to pay, a month to recompute, patient p1 to release), the
    practice's contract changed since."""
    svc = Service(runtime, runtime.state["client"],
                  {"Authorization": f"Bearer {runtime.state['tokens']['alpha']}"},
                  billing_tables, "billing")
    await march_practice(runtime)
    runtime.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    closed = await svc.send("POST", "/v1/practices/alpha/billing-periods/2025-03/close")
    assert closed.status_code == 200, closed.text
    svc.ids["invoice"] = closed.json()["invoice"]["id"]
    # p1 was released for March (as if another practice had billed the same MBI): reclaimable.
    async with runtime.db.unit_of_work() as uow:
        await uow.session.execute(insert(duplicate_releases).values(
            practice="alpha", month="2025-03", patient="p1", released_at=datetime.now(UTC)))
        await uow.commit()
    # The contract changes after close: the explicit recompute reissues March (99490 at 50.00).
    rates = {**{code: str(rate) for code, rate in PRICING.rates.items()}, "99490": "50.00"}
    async with runtime.db.unit_of_work() as uow:
        await uow.session.execute(update(practices).where(practices.c.id == "alpha").values(
            pricing=json.dumps({**json.loads(PRICING.to_json()), "rates": rates})))
        await uow.commit()
    return svc


async def _billing_overpaid(runtime) -> Service:  # noqa: ANN001
    """As ``_billing``, then March paid in full and recomputed under a lower contract: its
    replacement (``overpaid``) carries the payment (``carried``) and owes the practice back."""
    svc = await _billing(runtime)
    reclaimed = await svc.send("POST", f"{B}/duplicates/p1/resolve",
                               json.dumps({"decision": "reclaim"}), JSON)
    assert reclaimed.status_code == 200, reclaimed.text  # March bills p1 again
    invoice = (await svc.send("GET", "/v1/invoices/{invoice}")).json()
    paid = await svc.send("POST", "/v1/invoices/{invoice}/payments", json.dumps(
        {"amount": invoice["balance"], "date": "2025-04-02", "reference": "full"}), JSON)
    assert paid.status_code == 201, paid.text
    rates = dict.fromkeys(PRICING.rates, "1.00")
    async with runtime.db.unit_of_work() as uow:
        await uow.session.execute(update(practices).where(practices.c.id == "alpha").values(
            pricing=json.dumps({**json.loads(PRICING.to_json()), "rates": rates})))
        await uow.commit()
    redone = await svc.send("POST", f"{B}/recompute", json.dumps({"reason": "lower rates"}), JSON)
    assert redone.status_code == 200, redone.text
    svc.ids["overpaid"] = (await svc.send("GET", "/v1/invoices/{invoice}")).json()["replacedBy"]
    replacement = (await svc.send("GET", "/v1/invoices/{overpaid}")).json()
    assert float(replacement["balance"]) < 0, replacement
    svc.ids["carried"] = replacement["payments"][0]["id"]
    return svc


async def _careplan(cp) -> Service:  # noqa: ANN001
    """Four tracked plans; ``tracker``: one due in ten days, sent to rn-diaz and dr-lee."""
    await seed(cp)
    return Service(cp.runtime, cp.client, cp.auth(), careplan_tables, None,
                   {"tracker": tracker_id("alpha", "CarePlan/soon")})


ALERT = {"kind": "deterioration-escalation", "provider": "doc-1", "patient": "Patient/p-2",
         "fields": {"patient": "Patient/p-2", "finding": "weight up 3 kg in 2 days"}}
CALL = {"provider": "doc-1", "reason": "discuss the care plan",
        "slots": ["2026-12-01T15:00:00+00:00", "2026-12-02T15:00:00+00:00"],
        "requester_name": "RN Diaz", "requester_email": "diaz@acme.test"}
SUBSCRIPTION = {"events": ["billing.invoice.issued.v1"], "endpoint": "https://acme.example/hook"}


async def _notification(served) -> Service:  # noqa: ANN001
    """Practice acme with provider doc-1, an alert (``alert``), a call request (``call``), a
    subscription (``sub``) and the signed links of the alert and of the call's second slot."""
    runtime, client, auth = served
    svc = Service(runtime, client, auth, notification_tables, "notification")
    for name, path, body in (("alert", "/v1/practices/acme/notifications", ALERT),
                             ("call", "/v1/practices/acme/calls", CALL),
                             ("sub", "/v1/practices/acme/subscriptions", SUBSCRIPTION)):
        made = await client.post(path, headers=auth, json=body)
        assert made.status_code == 201, made.text
        svc.ids[name] = made.json()["id"]
    # the signed links' paths (an email's Acknowledge button, a proposed slot)
    notifier = notifier_of(runtime)
    for name, link in (("ack_link", notifier.ack_url("acme", svc.ids["alert"])),
                       ("slot_link", notifier.slot_url("acme", svc.ids["call"], 1))):
        svc.ids[name] = link[link.index("/v1/"):]
    return svc


SETUP: dict[str, tuple[str, Callable[[Any], Awaitable[Service]]]] = {
    "billing": ("billing", _billing),
    "billing-overpaid": ("billing", _billing_overpaid),
    "careplan": ("careplan", _careplan),
    "notification": ("api", _notification),
}


def twice(body: dict, key: str, first: object) -> str:
    """``body`` as JSON text with ``key`` given twice: ``first``, then the body's own value (the
    one FastAPI's reading kept)."""
    return "{" + json.dumps(key) + ": " + json.dumps(first) + ", " + json.dumps(body)[1:]


@dataclass(frozen=True)
class Route:
    service: str
    method: str
    path: str  # formatted with the setup's ids
    body: dict  # a body the route takes
    key: str  # given twice in the refused body, first with ``first``
    first: object
    ok: int  # the valid body's status
    read: str | None  # a GET whose answer the refused bodies leave as it was

    def calls(self, method: str, template: str) -> bool:
        """Whether this row calls the operation ``method template`` (a route's path)."""
        pattern = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        return method == self.method and re.fullmatch(pattern, self.path.format_map(
            defaultdict(lambda: "id"))) is not None

    def __str__(self) -> str:
        return f"{self.service} {self.method} {self.path}"


B = "/v1/practices/alpha/billing-periods/2025-03"
N = "/v1/practices/acme"
ROUTES = [
    Route("billing", "POST", f"{B}/duplicates/p1/resolve", {"decision": "reclaim"},
          "decision", "keep", 200, f"{B}/worklist"),
    Route("billing", "POST", "/v1/invoices/{invoice}/payments",
          {"amount": "10.00", "date": "2025-04-02"}, "amount", "1000.00", 201,
          "/v1/invoices/{invoice}"),
    Route("billing-overpaid", "POST", "/v1/invoices/{overpaid}/refunds",
          {"amount": "1.00", "date": "2025-04-03", "reference": "ach-1"}, "amount", "1000.00",
          201, "/v1/invoices/{overpaid}"),
    Route("billing-overpaid", "POST", "/v1/invoices/{overpaid}/payments/{carried}/void",
          {"reason": "cheque bounced"}, "reason", "x" * 501, 200, "/v1/invoices/{overpaid}"),
    Route("billing", "POST", f"{B}/recompute", {"reason": "contract amended"},
          "reason", "x" * 501, 200, "/v1/practices/alpha/invoices"),
    Route("billing", "PUT", "/v1/practices/alpha/ehr-endpoint",
          {"baseUrl": "https://ehr.example.org/fhir"}, "baseUrl", "https://other.example/fhir",
          200, "/v1/practices/alpha/ehr-endpoint"),
    Route("careplan", "POST", "/v1/care-plans/{tracker}/reviews",
          {"reviewer": "Practitioner/dr-lee", "outcome": "approved"}, "outcome", "declined",
          201, "/v1/care-plans/{tracker}"),
    Route("careplan", "POST", "/v1/care-plans/{tracker}/acknowledgements",
          {"recipient": "Practitioner/rn-diaz"}, "recipient", "Practitioner/nobody", 204,
          "/v1/care-plans/{tracker}"),
    Route("careplan", "PUT", "/v1/practices/alpha/care-plan-rules",
          {"review_interval_months": 6}, "review_interval_months", 12, 200,
          "/v1/practices/alpha/care-plan-rules"),
    Route("notification", "PUT", f"{N}/providers/doc-9",
          {"name": "Dr. Nine", "email": "nine@acme.test"}, "email", "other@acme.test", 201,
          f"{N}/providers/doc-9"),
    Route("notification", "PUT", f"{N}/contacts", {"supervisor": "doc-1"},
          "supervisor", "doc-2", 200, f"{N}/contacts"),
    Route("notification", "PUT", f"{N}/templates/care-gap-alert",
          {"source": default_source("care-gap-alert")}, "source", "{% block subject %}x"
          "{% endblock %}", 200, f"{N}/templates/care-gap-alert"),
    Route("notification", "PUT", f"{N}/ack-policies/care-gap-alert",
          {"requires_ack": True, "sla_minutes": 5}, "sla_minutes", 600, 200,
          f"{N}/ack-policies/care-gap-alert"),
    Route("notification", "POST", f"{N}/notifications", ALERT | {"idempotency_key": "k-1"},
          "provider", "doc-2", 201, f"{N}/notifications"),
    Route("notification", "POST", f"{N}/calls", CALL, "reason", "another reason", 201, None),
    Route("notification", "POST", N + "/calls/{call}/confirm", {"slot": 0}, "slot", 1, 200,
          N + "/calls/{call}"),
    Route("notification", "POST", f"{N}/subscriptions",
          SUBSCRIPTION | {"endpoint": "https://ehr.example/hook"}, "endpoint",
          "https://other.example/hook", 201, f"{N}/subscriptions"),
    Route("notification", "PATCH", N + "/subscriptions/{sub}", {"description": "ERP"},
          "description", "other", 200, N + "/subscriptions/{sub}"),
]


@pytest.fixture
def served(request, route: Route) -> object:
    """The route's service as its own unit-test fixture gives it."""
    return request.getfixturevalue(SETUP[route.service][0])


@pytest.fixture
async def service(served, route: Route) -> Service:  # noqa: ANN001
    """The route's service, set up."""
    return await SETUP[route.service][1](served)


async def state(service: Service, route: Route) -> tuple:
    """What the refused requests must leave as it was: every row of the service's tables (its
    outbox included) and the route's read."""
    read = None
    if route.read is not None:
        got = await service.send("GET", route.read)
        read = (got.status_code, got.json())
    return await snapshot(service.runtime, service.tables), read


def problem(r, status: int) -> dict:  # noqa: ANN001
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM_JSON, r.headers["content-type"]
    doc = r.json()
    assert doc["status"] == status
    return doc


ids = pytest.mark.parametrize("route", ROUTES, ids=str)


@ids
async def test_a_key_given_twice_is_a_400_naming_it_and_changes_nothing(service, route):
    before = await state(service, route)
    r = await service.send(route.method, route.path, twice(route.body, route.key, route.first),
                           JSON)
    assert repr(route.key) in problem(r, 400)["detail"]
    # in a nested object too (FastAPI's reading kept the last value there as well)
    nested = json.dumps(route.body)[:-1] + ', "x": {"a": 1, "a": 2}}'
    assert "'a'" in problem(await service.send(route.method, route.path, nested, JSON),
                            400)["detail"]
    assert await state(service, route) == before


@ids
@pytest.mark.parametrize("content_type", ["text/plain", None,
                                          "application/json; charset=latin-1"])
async def test_a_body_not_labelled_json_is_a_415_and_changes_nothing(service, route,
                                                                     content_type):
    """text/plain was a 422 (FastAPI took the bytes for no JSON); no Content-Type stays refused,
    now as 415 too."""
    before = await state(service, route)
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = await service.send(route.method, route.path, json.dumps(route.body), headers)
    problem(r, 415)
    assert await state(service, route) == before


@ids
async def test_a_body_over_the_limit_without_a_length_is_a_413_and_changes_nothing(service,
                                                                                  route):
    """Sent chunked (no Content-Length), the edge stops the body while it streams; FastAPI's own
    reading of a model route turned that into a 400 "error parsing the body"."""
    limit = service.runtime.settings.max_body_bytes
    body = json.dumps(route.body)
    padded = (body[:-1] + ', "pad": "' + "x" * (limit + 1 - len(body)) + '"}').encode()

    async def chunks():  # noqa: ANN202
        for at in range(0, len(padded), 65536):
            yield padded[at:at + 65536]

    before = await state(service, route)
    r = await service.send(route.method, route.path, chunks(), JSON)
    assert "content-length" not in r.request.headers
    problem(r, 413)
    assert await state(service, route) == before


@ids
async def test_the_body_labelled_json_is_taken(service, route):
    before = await state(service, route)
    r = await service.send(route.method, route.path, json.dumps(route.body), JSON)
    assert r.status_code == route.ok, r.text
    assert await state(service, route) != before  # it changed what a refused one must not


@ids
async def test_the_caller_is_authenticated_before_the_body_is_read(service, route):
    """No token: 401, however the body is labelled (as ingest's configuration); a token without
    the service's scope: 403 where a dependency checks it (billing, notification)."""
    for content_type in ("text/plain", None):
        headers = {} if content_type is None else {"Content-Type": content_type}
        r = await service.send(route.method, route.path, "{}", headers, auth={})
        problem(r, 401)
        if service.scope is not None:
            practice = "alpha" if route.service.startswith("billing") else "acme"
            token = await create_token(service.runtime.db.engine, practice_id=practice,
                                       scopes=("fhir:read", "fhir:write"))
            r = await service.send(route.method, route.path, "{}", headers,
                                   auth={"Authorization": f"Bearer {token}"})
            problem(r, 403)


def _api_routes(routes) -> list[APIRoute]:  # noqa: ANN001
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):  # a router included in another
            found += _api_routes(route.original_router.routes)
    return found


async def test_every_route_with_a_body_reads_it_as_json_and_no_other_does(tmp_path):
    """Every route with a body of the three services is in the table above and wired; no route
    without one is (they keep working without a Content-Type)."""
    services = discover_services()
    with_body, wired = set(), set()
    for name in ("billing", "careplan", "notification"):
        runtime = ServiceRuntime.build(  # routes are built, nothing is read
            services[name], load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/{name}.db"),
            transport=InProcessTransport())
        for router in services[name].routers(runtime):
            for r in _api_routes(router.routes):
                for method in r.methods:
                    if r.body_field is not None:
                        with_body.add((method, r.path))
                    if json_body in calls(r.dependant):
                        wired.add((method, r.path))
        await runtime.db.dispose()
    assert wired == with_body
    # each operation with a body is called by one row of the table, each row calls one of them
    assert {op: sum(r.calls(*op) for r in ROUTES) for op in with_body} == dict.fromkeys(
        with_body, 1)
    assert {str(r): sum(r.calls(*op) for op in with_body) for r in ROUTES} == dict.fromkeys(
        map(str, ROUTES), 1)


BODYLESS = [
    # (service, method, path, status), the POSTs that take no body
    ("billing", "POST", "/v1/practices/alpha/billing-periods/2025-03/close", 200),  # again
    ("billing", "POST", "/v1/practices/alpha/billing-periods/2025-02/close", 200),
    ("billing", "POST", "/v1/practices/alpha/ehr-deliveries/d1/retry", 404),  # none: not a 415
    ("notification", "POST", "/v1/notifications/{alert}/ack", 200),
    ("notification", "POST", "{ack_link}", 200),
    ("notification", "POST", "{slot_link}", 200),
    ("notification", "POST", N + "/subscriptions/{sub}/resume", 200),
    ("notification", "POST", N + "/subscriptions/{sub}/secret", 200),
]


@pytest.mark.parametrize("route", [Route(s, m, p, {}, "", None, ok, None)
                                   for s, m, p, ok in BODYLESS], ids=str)
@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"],
                         ids=["no Content-Type", "an empty HTML form"])
async def test_routes_without_a_body_need_no_content_type(service, route, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = await service.send(route.method, route.path, None, headers)
    assert r.status_code == route.ok, r.text
