"""A 405 names the methods its URL takes (RFC 9110: ``Allow`` is required), problem+json, on
every path of every service's own API (/fhir has its own edge): the platform's handler dropped
the header Starlette gives, and that one named only the first route matching the path (a GET
beside a PUT of the same path is a route of its own)."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support.embedded import embedded_runtime

METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")


@pytest.mark.parametrize("service", ["billing", "careplan", "notification", "ingest"])
async def test_every_405_names_the_methods_its_url_takes(tmp_path, service):
    runtime = await embedded_runtime(tmp_path, service)
    transport = httpx.ASGITransport(app=runtime.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            paths = (await client.get("/openapi.json")).json()["paths"]
            templates = [(_pattern(p), {m.upper() for m in ops}) for p, ops in paths.items()
                         if not (p == "/fhir" or p.startswith("/fhir/"))]
            refused = 0
            for template in paths:
                if template == "/fhir" or template.startswith("/fhir/"):
                    continue
                url = re.sub(r"\{[^}]+\}", "x", template)
                # What the document says the URL takes: every path of it matching the URL.
                takes = set().union(*(ms for p, ms in templates if p.match(url)))
                if "GET" in takes:  # answered as GET without the body (RFC 9110 §9.3.2)
                    takes.add("HEAD")
                for method in sorted(set(METHODS) - takes):
                    r = await client.request(method, url)
                    assert r.status_code == 405, (method, url, r.status_code)
                    assert r.headers["allow"] == ", ".join(sorted(takes)), (method, url)
                    assert r.headers["content-type"] == "application/problem+json"
                    assert r.json()["status"] == 405 and method in r.json()["detail"]
                    refused += 1
            assert refused > len(paths)  # most paths refuse several methods
    finally:
        await runtime.db.dispose()


async def test_a_path_with_a_get_and_a_put_route_names_both(tmp_path):
    runtime = await embedded_runtime(tmp_path, "careplan")
    transport = httpx.ASGITransport(app=runtime.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.patch("/v1/practices/alpha/care-plan-rules", json={})
    finally:
        await runtime.db.dispose()
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, PUT"
    assert r.json() == {"type": "about:blank", "title": "Method Not Allowed", "status": 405,
                        "detail": "PATCH is not taken here; this URL takes GET, HEAD, PUT"}


@pytest.mark.parametrize("service", ["billing", "careplan", "notification", "ingest"])
async def test_head_is_answered_as_get_without_the_body(tmp_path, service):
    """RFC 9110 §9.3.2: a resource that takes GET takes HEAD (it was a 405): the same status
    and headers, no body."""
    runtime = await embedded_runtime(tmp_path, service)
    transport = httpx.ASGITransport(app=runtime.app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            got = await client.get("/openapi.json")
            head = await client.head("/openapi.json")
    finally:
        await runtime.db.dispose()
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and got.content
    assert head.headers["content-length"] == got.headers["content-length"]
    assert head.headers["content-type"] == got.headers["content-type"]
