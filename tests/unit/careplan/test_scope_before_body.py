"""The token is checked before the body (README: "The token is checked first (401, 403)"): on
every route of careplan, and of ingest's configuration, that takes a JSON body, a token without
the route's scope gets 403 whatever its body is (none and no Content-Type, not JSON, a key
twice, one that does not validate), and no token 401. Both services checked the scope in the
handler, after the body: such a token was answered 415, 400 or 422, as billing's and
notification's never were."""

from __future__ import annotations

import re

import httpx
import pytest
import pytest_asyncio

from ccm_shared.tenancy import DEFAULT_SCOPES, Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime

JSON = {"Content-Type": "application/json"}
BAD_BODIES = [
    ({}, b""),  # no body, no Content-Type
    ({"Content-Type": "text/plain"}, b"{}"),
    (JSON, b'{"notes": "a", "notes": "b"}'),  # a key twice
    (JSON, b"{}"),  # does not validate (careplan's models; an empty override set is valid)
    (JSON, b"[]"),  # no JSON object
]
EHR = ("fhir:read", "fhir:write")


async def body_routes(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    """(method, path) of every operation of the app's own API that takes a body, its path
    parameters filled in (the practice: alpha)."""
    doc = (await client.get("/openapi.json")).json()
    return [(method.upper(), re.sub(r"\{[^}]+\}", "x", path.replace("{practice}", "alpha")))
            for path, item in doc["paths"].items() if path.startswith("/v1/")
            for method, operation in item.items() if "requestBody" in operation]


async def assert_scope_comes_first(client: httpx.AsyncClient, routes, token: str,  # noqa: ANN001
                                   scope: str) -> None:
    for method, path in routes:
        for headers, body in BAD_BODIES:
            r = await client.request(method, path, content=body,
                                     headers=headers | {"Authorization": f"Bearer {token}"})
            assert r.status_code == 403, (method, path, headers, body, r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert f"{scope!r} scope" in r.json()["detail"]
            anonymous = await client.request(method, path, content=body, headers=headers)
            assert anonymous.status_code == 401, (method, path, body, anonymous.text)


@pytest.mark.parametrize("scopes", [("notification",), EHR,
                                    tuple(s for s in DEFAULT_SCOPES if s != "careplan")])
async def test_careplan_answers_a_token_without_its_scope_403_before_the_body(careplan, scopes):
    cp = careplan
    routes = await body_routes(cp.client)
    assert sorted(routes) == [("POST", "/v1/care-plans/x/acknowledgements"),
                              ("POST", "/v1/care-plans/x/reviews"),
                              ("PUT", "/v1/practices/alpha/care-plan-rules")]
    token = await create_token(cp.runtime.db.engine, practice_id="alpha", scopes=scopes)
    await assert_scope_comes_first(cp.client, routes, token, "careplan")


@pytest_asyncio.fixture
async def ingest(tmp_path):
    runtime = await embedded_runtime(tmp_path, "ingest")
    await create_practice(runtime.db.engine, practice_id="alpha", name="Alpha",
                          timezone="America/Chicago", pricing=Pricing())
    transport = httpx.ASGITransport(app=runtime.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield runtime, client
    await runtime.db.dispose()


@pytest.mark.parametrize("scopes", [EHR, tuple(s for s in DEFAULT_SCOPES if s != "admin")])
async def test_ingest_config_answers_a_token_without_admin_403_before_the_body(ingest, scopes):
    runtime, client = ingest
    routes = await body_routes(client)
    assert routes == [("PUT", "/v1/practices/alpha/ingest-config")]
    token = await create_token(runtime.db.engine, practice_id="alpha", scopes=scopes)
    await assert_scope_comes_first(client, routes, token, "admin")
    read = await client.get(routes[0][1], headers={"Authorization": f"Bearer {token}"})
    assert read.json()["overrides"] == {}  # nothing was stored
