"""Notification's API needs a token with the ``notification`` scope: an EHR connection's token
(fhir:read + fhir:write), or any token without ``notification`` — ``admin`` included — gets 403
(problem+json) on every authenticated route of notification's own router and of its
subscriptions router, and nothing is written or sent; a token with only ``notification`` works;
the signed links (acknowledgement, slot choice) still work without any token."""

from __future__ import annotations

import httpx
import pytest
import pytest_asyncio
from fastapi.routing import APIRoute

from ccm_notification.adapters.orm import metadata
from ccm_notification.entrypoints.api import build_router, notification_tenant
from ccm_notification.entrypoints.workers import notifier_of
from ccm_notification.subscriptions.api import build_subscriptions_router
from ccm_shared.http import authenticate
from ccm_shared.tenancy import DEFAULT_SCOPES, create_token
from tests.support.routes import calls, open_routes, snapshot

EHR = ("fhir:read", "fhir:write")
ALL_BUT_NOTIFICATION = tuple(s for s in DEFAULT_SCOPES if s != "notification")
SIGNED_LINKS = {"/v1/ack/{token}", "/v1/calls/choose/{token}"}
P = "/v1/practices/acme"
ALERT = {
    "kind": "deterioration-escalation",
    "provider": "doc-1",
    "patient": "Patient/p-2",
    "fields": {"patient": "Patient/p-2", "finding": "weight up 3 kg in 2 days"},
}
CALL = {
    "provider": "doc-1",
    "reason": "discuss the care plan",
    "slots": ["2026-12-01T15:00:00+00:00", "2026-12-02T15:00:00+00:00"],
    "requester_name": "RN Diaz",
    "requester_email": "diaz@acme.test",
}


@pytest_asyncio.fixture
async def notification(acme):
    """The service on SQLite: practice acme with provider doc-1, an alert and a call request
    made with a full-scope token (``full``)."""
    rt = acme
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app()), base_url="http://n")
    full = {"Authorization": f"Bearer {await create_token(rt.db.engine, practice_id='acme')}"}
    alert = await client.post(f"{P}/notifications", headers=full, json=ALERT)
    assert alert.status_code == 201, alert.text
    call = await client.post(f"{P}/calls", headers=full, json=CALL)
    assert call.status_code == 201, call.text
    rt.state.update(client=client, full=full, alert=alert.json()["id"], call=call.json()["id"])
    yield rt
    await client.aclose()


async def token(rt, scopes) -> dict:  # noqa: ANN001
    return {"Authorization": f"Bearer {await create_token(rt.db.engine, practice_id='acme', scopes=scopes)}"}  # noqa: E501





def notification_calls(alert: str, call: str) -> list[tuple[str, str, dict | None]]:
    """One call of every authenticated route of notification's router."""
    return [
        ("GET", f"{P}/providers", None),
        ("GET", f"{P}/providers/doc-1", None),
        ("PUT", f"{P}/providers/doc-9", {"name": "Dr. Nine", "email": "nine@acme.test"}),
        ("GET", f"{P}/providers/doc-1/history", None),
        ("GET", f"{P}/contacts", None),
        ("PUT", f"{P}/contacts", {"supervisor": "doc-1"}),
        ("GET", f"{P}/templates", None),
        ("GET", f"{P}/templates/care-gap-alert", None),
        ("PUT", f"{P}/templates/care-gap-alert", {"source": "{% block subject %}x{% endblock %}"}),
        ("DELETE", f"{P}/templates/care-gap-alert", None),
        ("GET", f"{P}/ack-policies/care-gap-alert", None),
        ("PUT", f"{P}/ack-policies/care-gap-alert", {"requires_ack": True, "sla_minutes": 5}),
        ("GET", f"{P}/webhook-secret", None),
        ("POST", f"{P}/notifications", ALERT | {"idempotency_key": "via-ehr-token"}),
        ("GET", f"{P}/notifications", None),
        ("GET", f"{P}/notifications/{alert}", None),
        ("POST", f"/v1/notifications/{alert}/ack", None),
        ("POST", f"{P}/calls", CALL),
        ("GET", f"{P}/calls/{call}", None),
        ("POST", f"{P}/calls/{call}/confirm", {"slot": 0}),
    ]


@pytest.mark.parametrize(
    "scopes", [EHR, ALL_BUT_NOTIFICATION], ids=["ehr", "all-but-notification"]
)
async def test_a_token_without_the_notification_scope_gets_403_and_changes_nothing(
    notification, scopes
):
    rt = notification
    auth = await token(rt, scopes)
    before = await snapshot(rt, metadata)
    for method, path, body in notification_calls(rt.state["alert"], rt.state["call"]):
        r = await rt.state["client"].request(method, path, headers=auth, json=body)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json", path
        assert r.json()["status"] == 403 and "'notification' scope" in r.json()["detail"]
        assert "secret" not in r.json(), path
    # no provider, message, ack, call, template, policy…
    assert await snapshot(rt, metadata) == before
    full = rt.state["full"]
    alert = await rt.state["client"].get(f"{P}/notifications/{rt.state['alert']}", headers=full)
    assert alert.json()["ack_state"] == "pending"


async def test_a_token_with_only_the_notification_scope_reads_and_writes(notification):
    rt = notification
    auth = await token(rt, ("notification",))
    client = rt.state["client"]
    providers = await client.get(f"{P}/providers", headers=auth)
    assert providers.status_code == 200 and [p["id"] for p in providers.json()] == ["doc-1"]
    put = await client.put(f"{P}/providers/doc-9", headers=auth, json={"name": "Dr. Nine"})
    assert put.status_code == 201, put.text
    acked = await client.post(f"/v1/notifications/{rt.state['alert']}/ack", headers=auth)
    assert acked.status_code == 200, acked.text
    got = await client.get(f"{P}/notifications/{rt.state['alert']}", headers=auth)
    assert got.json()["ack_state"] == "acknowledged"
    assert (await client.get(f"{P}/providers")).status_code == 401  # no token


async def test_the_signed_acknowledgement_link_needs_no_token(notification):
    rt = notification
    link = notifier_of(rt).ack_url("acme", rt.state["alert"])
    path = link[link.index("/v1/ack/"):]
    client = rt.state["client"]
    assert (await client.get(path)).status_code == 200
    assert (await client.post(path)).status_code == 200
    got = await client.get(f"{P}/notifications/{rt.state['alert']}", headers=rt.state["full"])
    assert got.json()["ack_state"] == "acknowledged"


def test_every_authenticated_route_of_the_router_requires_the_notification_scope(notification):
    notifier_of(notification)
    routes = [r for r in build_router(notification).routes if isinstance(r, APIRoute)]
    authenticated = [r for r in routes if authenticate in calls(r.dependant)]
    assert len(authenticated) == len(notification_calls("m", "c"))  # the 403 test calls each
    assert [r.path for r in authenticated if notification_tenant not in calls(r.dependant)] == []
    assert {r.path for r in routes if r not in authenticated} == SIGNED_LINKS


async def test_the_routes_open_without_a_token_are_the_probes_metrics_and_signed_links(
    notification,
):
    links = {(m, path) for m in ("GET", "POST") for path in SIGNED_LINKS}
    assert await open_routes(notification.state["client"]) == {
        ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), *links
    }


SUBSCRIPTION = {"events": ["billing.invoice.issued.v1"], "endpoint": "https://acme.example/hook"}


def subscription_calls(sub: str) -> list[tuple[str, str, dict | None]]:
    """One call of every route of the subscriptions router."""
    one = f"{P}/subscriptions/{sub}"
    return [
        ("POST", f"{P}/subscriptions", SUBSCRIPTION | {"endpoint": "https://ehr.example/hook"}),
        ("GET", f"{P}/subscriptions", None),
        ("GET", one, None),
        ("PATCH", one, {"endpoint": "https://other.example/hook"}),
        ("DELETE", one, None),
        ("POST", f"{one}/resume", None),
        ("POST", f"{one}/secret", None),
        ("POST", f"{one}/test", None),
        ("GET", f"{one}/events", None),
        ("GET", f"{one}/status", None),
        ("GET", f"{one}/deliveries", None),
    ]


@pytest.mark.parametrize(
    "scopes", [EHR, ALL_BUT_NOTIFICATION], ids=["ehr", "all-but-notification"]
)
async def test_subscriptions_need_the_notification_scope(notification, scopes):
    rt = notification
    client = rt.state["client"]
    made = await client.post(f"{P}/subscriptions", headers=rt.state["full"], json=SUBSCRIPTION)
    assert made.status_code == 201, made.text
    sub = made.json()["id"]
    auth = await token(rt, scopes)
    before = await snapshot(rt, metadata)
    for method, path, body in subscription_calls(sub):
        r = await client.request(method, path, headers=auth, json=body)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json", path
        assert r.json()["status"] == 403 and "'notification' scope" in r.json()["detail"]
        assert "secret" not in r.json(), path
    assert await snapshot(rt, metadata) == before  # no subscription created, deleted or resumed
    listed = await client.get(f"{P}/subscriptions", headers=rt.state["full"])
    assert [s["id"] for s in listed.json()] == [sub]


async def test_a_token_with_only_the_notification_scope_manages_subscriptions(notification):
    rt = notification
    auth = await token(rt, ("notification",))
    client = rt.state["client"]
    made = await client.post(f"{P}/subscriptions", headers=auth, json=SUBSCRIPTION)
    assert made.status_code == 201 and "secret" in made.json(), made.text
    one = f"{P}/subscriptions/{made.json()['id']}"
    assert (await client.get(f"{one}/status", headers=auth)).status_code == 200
    assert (await client.delete(one, headers=auth)).status_code == 204
    assert (await client.get(f"{P}/subscriptions", headers=auth)).json() == []
    assert (await client.get(f"{P}/subscriptions")).status_code == 401  # no token


def test_every_route_of_the_subscriptions_router_requires_the_notification_scope(notification):
    routes = [r for r in build_subscriptions_router(notification).routes
              if isinstance(r, APIRoute)]
    assert len(routes) == len(subscription_calls("s"))  # the 403 test above calls each
    assert [r.path for r in routes if notification_tenant not in calls(r.dependant)] == []
