"""Every status a route answers to the platform's generic failures is in the route's OpenAPI
document, with the media type (and headers) it is sent with: practice systems generate their
clients from contracts/openapi, so an undocumented status is one their code cannot handle.

For every service (as ``ccm contracts`` finds them), on real PostgreSQL, every operation of its
document is sent probes: no token, an unknown token, a token without any scope, another
practice's URL, unknown ids in the path; every POST, PUT and PATCH also a body that is no JSON,
malformed JSON, a key twice, JSON nested too deeply, no body, a body over the limit (declared
and streamed); every /fhir operation a URL with a NUL. Whatever each one answers must be
documented for that path and method (and no probe may answer 500)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from ccm_shared.http import is_fhir_path
from ccm_shared.migrate import upgrade_async, upgrade_platform
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from ccm_shared.transport import InProcessTransport
from tests.support.infra import start_infra

pytestmark = pytest.mark.integration

LIMIT = 2048  # CCM_MAX_BODY_BYTES of the probed apps: every probe body but the oversized is below
DEPTH = 100  # nesting of the "too deep" body, beyond CCM_MAX_JSON_DEPTH's default of 64
# Parameters whose unknown value is refused before any id is looked up (in the path) or that
# a route requires (in the query): given a value the route takes, so the unknown id is reached.
TAKEN = {"month": "2025-03", "rtype": "Patient", "from": "2025-03"}
BODY_METHODS = ("post", "put", "patch")
# What a route itself documents wrongly, not the platform: each must be fixed in its service
# (``responses=`` or ``response_class=``), then taken out of here (a fixed one fails the test).
SERVICE_OWNED: dict[tuple[str, str, str], str] = {}
PARAMETER = re.compile(r"\{([^}]+)\}")


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    infra = start_infra()
    upgrade_platform(infra.database_url)
    yield infra.database_url
    infra.close()


def _filled(template: str, practice: str, taken: bool) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "practice":
            return practice
        return TAKEN[name] if taken and name in TAKEN else f"unknown-{name}"

    return PARAMETER.sub(value, template)


async def _streamed(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 512):  # no Content-Length: the limit is met while reading
        yield body[start:start + 512]


def _probes(path: str, method: str, operation: dict, own: str, other: str,
            tokens: dict[str, str]) -> list[tuple[str, str, dict]]:
    """(what, URL, httpx request arguments) of every probe of one operation; its required
    query parameters are given (a value it takes where ``TAKEN`` has one)."""
    full = {"Authorization": f"Bearer {tokens['full']}"}
    query = {p["name"]: TAKEN.get(p["name"], "x") for p in operation.get("parameters", [])
             if p["in"] == "query" and p.get("required")}
    url = _filled(path, own, taken=True)
    probes = [
        ("no token", url, {}),
        ("an unknown token", url, {"headers": {"Authorization": "Bearer ccm_unknown"}}),
        ("a token without any scope", url,
         {"headers": {"Authorization": f"Bearer {tokens['scopeless']}"}}),
        ("unknown ids in the path", _filled(path, own, taken=False), {"headers": full}),
        ("unknown ids, other parameters taken", url, {"headers": full}),
    ]
    if "{practice}" in path:
        probes.append(("another practice's URL", _filled(path, other, taken=True),
                       {"headers": full}))
    if is_fhir_path(path):
        probes.append(("a URL with a NUL", url, {"headers": full,
                                                 "params": {**query, "name": "\x00"}}))
    if method in BODY_METHODS:
        media = "application/fhir+json" if is_fhir_path(path) else "application/json"
        over = b"[" + b"0," * LIMIT + b"0]"
        for what, content_type, content in (
            ("a body that is no JSON", "text/plain", b"x"),
            ("malformed JSON", media, b'{"a": '),
            ("a key twice", media, b'{"a": 1, "a": 2}'),
            ("JSON nested too deeply", media, b"[" * DEPTH + b"]" * DEPTH),
            ("a body over the limit", media, over),
        ):
            probes.append((what, url, {"headers": {**full, "Content-Type": content_type},
                                       "content": content}))
        probes.append(("a body over the limit, streamed", url, {
            "headers": {**full, "Content-Type": media}, "content": _streamed(over)}))
        probes.append(("no body", url, {"headers": full}))
    for _, _, arguments in probes:
        arguments.setdefault("params", query)
    return probes


def _undocumented(doc: dict, path: str, method: str, response: httpx.Response) -> str | None:
    """Why ``response`` is not what the document says ``method path`` may answer, or None."""
    status = str(response.status_code)
    if response.status_code >= 500 and response.status_code != 503:
        return f"{status}: {response.text[:300]}"
    documented = doc["paths"][path][method]["responses"].get(status)
    if documented is None:
        return f"{status} is not documented ({response.text[:200]})"
    media = response.headers.get("content-type", "").split(";")[0].strip()
    content = documented.get("content", {})
    if content and media not in content:
        return f"{status} sent as {media!r}, documented as {sorted(content)}"
    if not content and response.content:
        return f"{status} sent a body ({media!r}), documented without one"
    missing = [h for h in documented.get("headers", {}) if h.lower() not in response.headers]
    if missing:
        return f"{status} sent without the documented header(s) {missing}"
    return None


async def _probe_service(database_url: str, name: str) -> tuple[list[str], int]:
    definition = discover_services()[name]
    await upgrade_async(database_url, definition.schema, definition.migrations_package)
    settings = load_settings(database_url=database_url, max_body_bytes=LIMIT)
    runtime = ServiceRuntime.build(definition, settings, transport=InProcessTransport())
    own, other = (f"{kind}-{uuid.uuid4().hex[:10]}" for kind in ("own", "other"))
    failures: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    sent = 0
    try:
        for practice in (own, other):
            await create_practice(runtime.db.engine, practice_id=practice, name=practice,
                                  timezone="America/New_York", pricing=Pricing())
        tokens = {"full": await create_token(runtime.db.engine, practice_id=own),
                  "scopeless": await create_token(runtime.db.engine, practice_id=own, scopes=())}
        app = runtime.app()
        doc = json.loads(json.dumps(app.openapi()))  # as ``ccm contracts`` writes it
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://probe", timeout=60) as client:
            for path, operations in doc["paths"].items():
                for method, operation in operations.items():
                    for what, url, arguments in _probes(path, method, operation, own, other,
                                                        tokens):
                        r = await client.request(method.upper(), url, **arguments)
                        sent += 1
                        why = _undocumented(doc, path, method, r)
                        owned = (name, f"{method.upper()} {path}", str(r.status_code))
                        if why is not None and owned in SERVICE_OWNED:
                            seen.add(owned)
                        elif why is not None:
                            failures.append(f"{method.upper()} {path} [{what}]: {why}")

            async def unready() -> dict[str, str]:
                return {"database": "unavailable: OSError"}

            runtime.readiness = unready  # type: ignore[method-assign]
            r = await client.get("/readyz")
            sent += 1
            assert r.status_code == 503, r.text
            if (why := _undocumented(doc, "/readyz", "get", r)) is not None:
                failures.append(f"GET /readyz [not ready]: {why}")
    finally:
        await runtime.db.dispose()
    failures += [f"{operation} {status} is documented as sent now: take it out of SERVICE_OWNED"
                 for service, operation, status in SERVICE_OWNED
                 if service == name and (service, operation, status) not in seen]
    return failures, sent


@pytest.mark.parametrize("service", sorted(discover_services()))
async def test_every_status_a_generic_failure_answers_is_documented_with_its_media_type(
        database_url, service):
    failures, sent = await _probe_service(database_url, service)
    assert sent > 50, sent  # every operation of the document was probed
    assert failures == [], f"{len(failures)} of {sent} probes:\n" + "\n".join(failures)
