"""A client that goes away before its request is answered (a POST cut short, a body read after
``http.disconnect``) is its own doing: logged once, without a traceback, and counted as nginx's
499 (client closed request), never as a server error that pages whoever is on call."""

import asyncio
import json
import logging
from typing import Annotated, Any

import pytest
import pytest_asyncio
import uvicorn
from fastapi import Body, FastAPI, Request
from structlog.testing import capture_logs

from ccm_shared.http import CLIENT_CLOSED, EdgeMiddleware, install_error_handlers
from ccm_shared.observability import metrics
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime

BODY = json.dumps({"resourceType": "Patient", "name": [{"family": "Cut"}], "gender": "other",
                   "birthDate": "1950-01-01", "active": True}).encode()
assert len(BODY) > 100


def requests_counted(service: str, method: str, route: str, status: int) -> float:
    return metrics.registry.get_sample_value("ccm_http_requests_total", {
        "service": service, "method": method, "route": route, "status": str(status)}) or 0.0


def assert_client_closed_once(logged: list[dict], route: str) -> None:
    """One access line with status 499 at info, and nothing at error or with a traceback."""
    lines = [e for e in logged if e["event"] == "http request"]
    assert len(lines) == 1, logged
    assert lines[0]["status"] == CLIENT_CLOSED == 499 and lines[0]["route"] == route, lines
    assert lines[0]["log_level"] == "info" and lines[0].get("client_closed") is True
    loud = [e for e in logged if e["log_level"] in ("warning", "error", "critical")
            or "exc_info" in e or "exception" in e]
    assert loud == [], loud


# ---- a real client on a real socket, against uvicorn as `ccm up` runs it -----------------------

@pytest_asyncio.fixture
async def served(tmp_path):
    """The ingest API under uvicorn on a free port: (host, port, token)."""
    runtime = await embedded_runtime(tmp_path, "ingest")
    await create_practice(runtime.db.engine, practice_id="alpha", name="Alpha",
                          timezone="America/New_York", pricing=Pricing())
    token = await create_token(runtime.db.engine, practice_id="alpha")
    server = uvicorn.Server(uvicorn.Config(runtime.app(), host="127.0.0.1", port=0,
                                           log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    served = {"host": "127.0.0.1", "port": port, "token": token}

    async def stop() -> None:  # waits for the requests under way, as a shutdown does
        server.should_exit = True
        await asyncio.wait_for(task, 10)

    served["stop"] = stop
    try:
        yield served
    finally:
        if not task.done():
            await stop()
        await runtime.db.dispose()


async def send_raw(served: dict, head: str, body: bytes) -> None:
    """Send a request's head and part of its body on a socket, then close it."""
    reader, writer = await asyncio.open_connection(served["host"], served["port"])
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize(("method", "path", "route", "content_type"), [
    ("POST", "/fhir/Patient", "/fhir/{rtype}", "application/fhir+json"),
    ("POST", "/fhir", "/fhir", "application/fhir+json"),
    ("PUT", "/v1/practices/alpha/ingest-config", "/v1/practices/{practice}/ingest-config",
     "application/json"),
])
async def test_a_client_that_closes_mid_body_is_a_499_not_a_500(
        served, caplog, method, path, route, content_type):
    """Content-Length: 100, 42 bytes sent, connection closed: was ``status 500``, an ``unhandled
    error`` ClientDisconnect with its traceback, and uvicorn's "Exception in ASGI
    application"."""
    counted = requests_counted("ingest", method, route, 499)
    failed = requests_counted("ingest", method, route, 500)
    caplog.set_level(logging.INFO)
    with capture_logs() as logged:
        await send_raw(served, f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
                               f"Authorization: Bearer {served['token']}\r\n"
                               f"Content-Type: {content_type}\r\nContent-Length: 100\r\n\r\n",
                       BODY[:42])
        for _ in range(1000):
            if any(e["event"] == "http request" for e in logged):
                break
            await asyncio.sleep(0.01)
        await served["stop"]()  # the request's task has ended: nothing more can be logged
    assert_client_closed_once(logged, route)
    assert requests_counted("ingest", method, route, 499) == counted + 1
    assert requests_counted("ingest", method, route, 500) == failed
    server_errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert server_errors == [], [r.getMessage() for r in server_errors]


async def test_a_whole_request_on_the_same_server_is_answered_as_before(served):
    """The 499 is for requests cut short only: one sent whole is answered and logged with its
    status."""
    reader, writer = await asyncio.open_connection(served["host"], served["port"])
    with capture_logs() as logged:
        writer.write((f"POST /fhir/Patient HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer "
                      f"{served['token']}\r\nContent-Type: application/fhir+json\r\n"
                      f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n").encode()
                     + BODY)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        await served["stop"]()  # the access line follows the answer (and its audit entry)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]
    assert [e["status"] for e in logged if e["event"] == "http request"] == [201]


# ---- the shared HTTP layer at the ASGI level: every service's app has it -------------------------

def edge_app() -> FastAPI:
    """A service's app as ``create_app`` builds it: the platform's error handlers and edge
    middleware around routes that read their bodies as the services' routes do."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/read")
    async def read(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.post("/model")  # FastAPI reads the body (and turned a disconnect into a 400)
    async def model(payload: Annotated[dict[str, Any], Body()]) -> dict:
        return payload

    app.add_middleware(EdgeMiddleware, service="edge-test", max_body_bytes=10_000)
    return app


def scope_for(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                        (b"content-length", b"100")],
            "client": ("127.0.0.1", 5000), "server": ("test", 80)}


async def call(app, path: str, messages: list[dict]) -> list[dict]:
    """Run one request whose ``receive`` yields ``messages``, then ``http.disconnect`` for
    ever (as uvicorn does once the client is gone); what the app sent."""
    pending = list(messages)
    sent: list[dict] = []

    async def receive() -> dict:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope_for(path), receive, send)
    return sent


@pytest.mark.parametrize("path", ["/read", "/model"])
@pytest.mark.parametrize("before", [
    [{"type": "http.request", "body": b'{"resourceType": "Pat', "more_body": True}],
    [],  # gone before the first byte of the body: read after http.disconnect
], ids=["mid-body", "before-the-body"])
async def test_the_edge_counts_a_client_gone_before_its_answer_as_499(path, before):
    app = edge_app()
    counted = requests_counted("edge-test", "POST", path, 499)
    with capture_logs() as logged:
        await call(app, path, before)  # raises nothing: nobody is left to answer
    assert_client_closed_once(logged, path)
    assert requests_counted("edge-test", "POST", path, 499) == counted + 1


async def test_a_disconnect_after_the_answer_leaves_its_status_alone():
    """uvicorn answers ``receive`` with http.disconnect once the response is complete too (and
    an app may listen for it while it streams): a request already answered keeps its
    status."""

    async def answered_then_listens(scope, receive, send) -> None:  # noqa: ANN001
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        assert (await receive())["type"] == "http.disconnect"

    app = EdgeMiddleware(answered_then_listens, service="edge-test", max_body_bytes=10_000)
    with capture_logs() as logged:
        sent = await call(app, "/after", [{"type": "http.request", "body": b"{}",
                                           "more_body": False}])
    assert sent[0]["status"] == 201
    assert [(e["status"], e.get("client_closed")) for e in logged
            if e["event"] == "http request"] == [(201, None)]


async def test_a_failure_after_the_client_has_gone_is_still_a_server_error():
    """A disconnect seen first (499) hid an exception that then escaped from the 5xx counts."""

    async def fails_after_the_disconnect(scope, receive, send) -> None:  # noqa: ANN001
        assert (await receive())["type"] == "http.disconnect"
        raise RuntimeError("a fault of the server's")

    app = EdgeMiddleware(fails_after_the_disconnect, service="edge-test", max_body_bytes=10_000)
    counted = requests_counted("edge-test", "POST", "unmatched", 500)
    with capture_logs() as logged, pytest.raises(RuntimeError):
        await call(app, "/fails", [])
    assert [e["status"] for e in logged if e["event"] == "http request"] == [500]
    assert requests_counted("edge-test", "POST", "unmatched", 500) == counted + 1
