"""The HTTP edge every service shares: app factory, auth, errors, health, metrics, limits."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Query, Request
from fastapi import routing as fastapi_routing
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from ccm_shared.db import REFUSED_VALUES, gave_way, sqlstate
from ccm_shared.errors import (
    AppError,
    Forbidden,
    InvalidInput,
    MalformedRequest,
    PayloadTooLarge,
    TryAgain,
    Unauthorized,
    UnsupportedMediaType,
    problem,
)
from ccm_shared.observability import (
    metrics,
    new_correlation_id,
    reset_correlation_id,
    set_correlation_id,
)
from ccm_shared.tenancy import Tenant, TokenCache, get_practice

if TYPE_CHECKING:
    from ccm_shared.service import ServiceRuntime

log = structlog.get_logger(__name__)
PROBLEM_JSON = "application/problem+json"
CORRELATION_HEADER = "x-correlation-id"

AUDIT_SCOPE = "admin"  # reading the practice's audit trail
PRICING_SCOPES = frozenset({"admin", "billing"})  # seeing how the practice is billed


_ID_CHARACTERS = re.compile(rb"[A-Za-z0-9._:/+=;-]+")


def _correlation_id(sent: bytes) -> str:
    """A caller's correlation id, its first 64 characters, when it is a plain token (letters,
    digits, ``._:/+=;-``: a UUID, a W3C or AWS trace id): it goes into every log line and
    event of the request. Anything else (bytes that are no UTF-8 answered 500 on every route)
    is replaced by a new one."""
    return sent[:64].decode() if _ID_CHARACTERS.fullmatch(sent) else ""


# nginx's status for a request whose client closed the connection before it was answered: in
# the access log and the request metrics, never sent (there is nobody to send it to).
CLIENT_CLOSED = 499
_CLOSED = {"client_closed": True}


class EdgeMiddleware:
    """Correlation id, request metrics and the body-size limit, as plain ASGI."""

    def __init__(self, app, *, service: str, max_body_bytes: int, audit=None) -> None:  # noqa: ANN001
        self.app = app
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.audit = audit  # async (scope, status) -> None, called after the response

    async def __call__(self, scope, receive, send):  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        method = scope["method"]
        if method == "HEAD":
            # RFC 9110 §9.3.2: HEAD is GET without the body (the routes declare GET only); the
            # routing writes into this scope, so it is the one changed.
            scope["method"] = "GET"
        cid = _correlation_id(headers.get(CORRELATION_HEADER.encode(), b"")) or \
            new_correlation_id()
        token = set_correlation_id(cid)
        started = time.perf_counter()
        # The status sent; None until a response starts. The client closing the connection
        # before that (seen in ``receive``, or a ClientDisconnect from reading the body) makes
        # it CLIENT_CLOSED: the request's outcome is the client's doing, not a server error.
        status_holder: dict[str, int | None] = {"status": None}
        limit = self.max_body_bytes

        async def send_wrapper(message):  # noqa: ANN001, ANN202
            if message["type"] == "http.response.start":
                if status_holder["status"] != CLIENT_CLOSED:
                    status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-correlation-id", cid.encode())]
            elif message["type"] == "http.response.body" and method == "HEAD" \
                    and message.get("body"):
                message = {**message, "body": b""}  # its headers say what GET would send
            await send(message)

        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                response = JSONResponse(
                    problem(413, "Payload too large", f"request body exceeds {limit} bytes"),
                    status_code=413,
                    media_type=PROBLEM_JSON,
                )
                return await response(scope, receive, send_wrapper)
            seen = 0

            async def receive_limited():  # noqa: ANN202
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                elif message["type"] == "http.disconnect" and status_holder["status"] is None:
                    status_holder["status"] = CLIENT_CLOSED  # gone before it was answered
                return message

            try:
                await self.app(scope, receive_limited, send_wrapper)
            except ClientDisconnect:
                # Its body was read after the client had gone (a POST cut short): nobody to
                # answer, nothing failed here. Not re-raised: the platform's 500 handler and
                # the server's "Exception in ASGI application" would log it as a fault.
                status_holder["status"] = CLIENT_CLOSED
            except Exception:
                # A failure is the server's, whatever the client did meanwhile (a disconnect
                # seen first must not take it out of the 5xx counts).
                if status_holder["status"] in (None, CLIENT_CLOSED):
                    status_holder["status"] = 500
                raise
            if self.audit is not None:
                await self.audit(scope, status_holder["status"] or 500)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            status = status_holder["status"] or 500  # no response: an error escaped (logged)
            metrics.http_requests.labels(self.service, method, path, str(status)).inc()
            metrics.http_latency.labels(self.service, path).observe(elapsed)
            # The route template, never the concrete path: ids in paths are not logged.
            log.info(
                "http request",
                method=method,
                route=path,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                **(_CLOSED if status == CLIENT_CLOSED else {}),
            )
            reset_correlation_id(token)


def runtime_of(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


async def authenticate(request: Request) -> Tenant:
    """Resolve the bearer token to a tenant, or answer 401."""
    if len(request.headers.getlist("authorization")) > 1:  # which one counts is ambiguous
        raise Unauthorized("more than one Authorization header")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token")
    cache: TokenCache = request.app.state.token_cache  # set by create_app (ttl 0: no caching)
    tenant = await cache.resolve(runtime_of(request).db.engine, token.strip())
    if tenant is None:
        raise Unauthorized("invalid or revoked token")
    structlog.contextvars.bind_contextvars(practice=tenant.practice_id)
    request.state.tenant = tenant  # read by the audit trail after the response
    return tenant


TenantDep = Annotated[Tenant, Depends(authenticate)]


PATIENT_PARAMS = ("patient", "subject", "patient_id")
# A route's resource: (type, id) path parameters by the names routes give them (``/fhir/{rtype}/
# {rid}`` in ingest).
RESOURCE_PARAMS = (("type", "id"), ("rtype", "rid"))


def _resource_of(params: dict) -> tuple[str, str | None] | None:
    """(type, id or None) of the resource a route names (``/fhir/Patient/p1``,
    ``/fhir/Patient``)."""
    for kind, ident in RESOURCE_PARAMS:
        if params.get(kind):
            return str(params[kind]), str(params[ident]) if params.get(ident) else None
    return None


def audited_patient(scope) -> str | None:  # noqa: ANN001
    """The patient an API call concerns: the one whose record it wrote, when the route says so
    (``request.state.resource_patient``: a FHIR write's resource is about that patient, which
    its URL need not name: ``PUT /fhir/Encounter/x``, ``POST /fhir/Condition``); else the one
    the path, the query or the search parameters a route read from its body
    (``request.state.search_params``: FHIR's search by POST) name: a Patient's own URL (read,
    history, version, update, delete), a Patient search by one ``_id``, or a
    ``patient``/``subject`` parameter."""
    state = scope.get("state") or {}
    if written := state.get("resource_patient"):
        return str(written)
    params = scope.get("path_params") or {}
    resource = _resource_of(params)
    for name in PATIENT_PARAMS:
        if params.get(name):
            return str(params[name]).removeprefix("Patient/")
    from urllib.parse import parse_qs

    query = parse_qs((scope.get("query_string") or b"").decode(errors="replace"))
    for name, value in state.get("search_params") or ():
        query.setdefault(name, []).append(value)
    return named_patient(resource, query)


def named_patient(resource: tuple[str, str | None] | None,
                  query: dict[str, list[str]]) -> str | None:
    """The patient a call on ``resource`` (type, id or None) with search parameters ``query``
    names: a Patient's own id, a Patient search by one ``_id``, or a ``patient``/``subject``
    parameter's patient (a FHIR Bundle's GET entries are read so too)."""
    if resource is not None and resource[0] == "Patient" and resource[1]:
        return resource[1]
    if resource == ("Patient", None):
        ids = [i for value in query.get("_id", []) for i in value.split(",")]
        if len(set(ids)) == 1 and ids[0]:
            return ids[0]
    for name in PATIENT_PARAMS:
        for value in query.get(name, []):
            if value:
                return value.rsplit("/", 1)[-1] if "/Patient/" in value or value.startswith(
                    "Patient/") else value
    return None


def _kept(text: str | None, column) -> str | None:  # noqa: ANN001 - an audit_log column
    """A request's text as the audit trail can keep it in ``column``: a NUL (``%00`` in a URL)
    written as ``%00``, cut to the column's width. As sent, either made the entry fail to
    store, and the call went unaudited."""
    return None if text is None else text.replace("\x00", "%00")[:column.type.length]


def audit_recorder(runtime: ServiceRuntime):  # noqa: ANN201
    """Record every authenticated API call in the audit trail (who, what, when, outcome);
    concurrent calls share a transaction (``AuditWriter``), each waits for its entry's commit."""
    from ccm_shared.audit import METHOD_ACTION, AuditRecord, AuditWriter, audit_log, outcome_for
    from ccm_shared.observability import current_correlation_id

    writer = AuditWriter(runtime.db.engine)

    async def record(scope, status: int) -> None:  # noqa: ANN001
        tenant = (scope.get("state") or {}).get("tenant")
        if tenant is None:
            return
        route = getattr(scope.get("route"), "path", scope.get("path", ""))
        # The entity the route says it acted on (``request.state.audited_entity``: a write by
        # criteria names the resource it found), else the one its path names.
        entity = (scope.get("state") or {}).get("audited_entity")
        if entity is None and (resource := _resource_of(scope.get("path_params") or {})):
            entity = f"{resource[0]}/{resource[1]}" if resource[1] else None
        entry = AuditRecord(
            practice=tenant.practice_id,
            service=runtime.definition.name,
            actor_type="client",
            actor=tenant.token_id,
            actor_label=tenant.label,
            action=METHOD_ACTION.get(scope["method"], "E"),
            what=_kept(f"{scope['method']} {route}", audit_log.c.what),
            entity=_kept(entity or scope.get("path"), audit_log.c.entity),
            patient=_kept(audited_patient(scope), audit_log.c.patient),
            outcome=outcome_for(status),
            correlation_id=current_correlation_id(),
        )
        # A call whose parts read or write several patients' records (a FHIR Bundle's
        # entries) is in each one's trail: an entry per patient and action (R, C, U, D, as
        # ``METHOD_ACTION`` maps the part's method), with the outcome of the first such part
        # (``audited_patients``: (patient, method, status) of each part that ran; ids only).
        parts: dict[tuple[str, str], int] = {}
        for patient, method, part_status in (scope.get("state") or {}).get(
                "audited_patients") or ():
            action = METHOD_ACTION.get(method, "E")
            kept = _kept(patient, audit_log.c.patient)
            if kept and (kept, action) != (entry.patient, entry.action):
                parts.setdefault((kept, action), part_status)
        done = await asyncio.gather(writer.record(entry), *(
            writer.record(replace(entry, patient=p, action=a, outcome=outcome_for(s)))
            for (p, a), s in sorted(parts.items())), return_exceptions=True)
        if failed := [r for r in done if isinstance(r, BaseException)]:
            # the response is already sent; say so loudly, and count it (an alert's figure:
            # a role without the audit trail's grants lost every entry, and /readyz stayed 200)
            metrics.audit_failures.labels(runtime.definition.name).inc()
            log.error("audit entry could not be recorded", error=type(failed[0]).__name__,
                      entries=len(failed))

    return record


def problem_response(exc: AppError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="ccm"'} if exc.status == 401 else None
    return JSONResponse(
        problem(exc.status, exc.title, exc.detail),
        status_code=exc.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


# What a 405's Allow may name: the methods the platform's routes are declared with.
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(app: FastAPI, scope) -> list[str]:  # noqa: ANN001 - an ASGI scope
    """The methods ``app`` takes at the request's path (a 405's ``Allow``): each one asked of
    the routes as a request of that method would be. A path's GET and PUT are routes of their
    own, and Starlette's 405 named only those of the first route matching the path."""
    taken = [method for method in _METHODS
             if any(route.matches({**scope, "method": method})[0] is Match.FULL
                    for route in app.router.routes)]
    # HEAD wherever GET (EdgeMiddleware answers it as GET without the body)
    return sorted({*taken, "HEAD"}) if "GET" in taken else taken


# -- /fhir: every error an OperationOutcome ------------------------------------------------------

FHIR_JSON = "application/fhir+json"
# The OperationOutcome issue type of an HTTP status (else "exception" for a 5xx, "processing").
FHIR_ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
                    405: "not-supported", 406: "not-supported", 409: "conflict", 410: "deleted",
                    413: "too-costly", 415: "not-supported", 422: "invalid", 429: "throttled",
                    503: "transient"}


def is_fhir_path(path: str) -> bool:
    return path == "/fhir" or path.startswith("/fhir/")


def fhir_issue_code(status: int) -> str:
    return FHIR_ISSUE_CODES.get(status, "exception" if status >= 500 else "processing")


def outcome_body(status: int, diagnostics: str, code: str | None = None) -> bytes:
    """An OperationOutcome of one error issue, as JSON."""
    return json.dumps({"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": code or fhir_issue_code(status),
        "diagnostics": diagnostics}]}).encode()


def _outcome_response(status: int, diagnostics: str, code: str):  # noqa: ANN202 - ASGI app
    body = outcome_body(status, diagnostics, code)

    async def respond(scope, receive, send) -> None:  # noqa: ANN001
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", FHIR_JSON.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return respond


class FhirErrors:
    """ASGI wrapper around a service's whole app (the platform's middleware included), for its
    /fhir paths: a FHIR client reads OperationOutcomes, not problem+json. A URL with a NUL is a
    400 before anything reads it (PostgreSQL text cannot hold one: an id or search value with it
    was a 422 of the database's refusal). Whatever the platform answers as problem+json there
    (the body limit's 413, an unknown URL's 404, a 405, an unexpected error's 500) is sent as
    the OperationOutcome of the same status, its headers kept (``Allow``,
    ``WWW-Authenticate``, ``Retry-After``)."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or not is_fhir_path(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            return await _outcome_response(400, "the URL has a NUL character (%00)", "value")(
                scope, receive, send)
        held: dict = {}

        async def rewrite(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start" and any(
                    k == b"content-type" and v.startswith(PROBLEM_JSON.encode())
                    for k, v in message.get("headers", [])):
                held.update(start=message, body=b"")
                return
            if "start" not in held or message["type"] != "http.response.body":
                return await send(message)
            held["body"] += message.get("body", b"")
            if message.get("more_body"):
                return
            start = held.pop("start")
            try:
                problem_doc = json.loads(held.pop("body") or b"{}")
            except ValueError:
                problem_doc = {}
            status = start["status"]
            body = outcome_body(status, problem_doc.get("detail") or problem_doc.get("title")
                                or str(status))
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k not in (b"content-type", b"content-length")]
            headers += [(b"content-type", FHIR_JSON.encode()),
                        (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def wrap_fhir_errors(app: FastAPI, outer: Callable[[Any], Any] | None = None) -> None:
    """Serve ``app`` through ``FhirErrors`` (and ``outer`` around that, a service's own /fhir
    edge), from the first request on."""
    build = app.build_middleware_stack

    def build_with_outcomes():  # noqa: ANN202
        wrapped = FhirErrors(build())
        return outer(wrapped) if outer is not None else wrapped

    app.build_middleware_stack = build_with_outcomes  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        handler = getattr(request.app.state, "fhir_error_handler", None)
        if handler is not None and is_fhir_path(request.url.path):
            response = handler(exc)
        else:
            response = problem_response(exc)
        if isinstance(exc, TryAgain):  # whoever raised it: when to send the request again
            response.headers["Retry-After"] = str(exc.retry_after_seconds)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")}
            for e in exc.errors()
        ]
        return JSONResponse(
            problem(422, "Invalid input", "request did not validate", errors=errors),
            status_code=422,
            media_type=PROBLEM_JSON,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, AppError):
            # FastAPI reads a model route's body itself and answers any failure while reading
            # as a 400 "error parsing the body": a body over the limit sent without a
            # Content-Length (the edge stops it while streaming) is a 413, as everywhere else.
            return problem_response(exc.__cause__)
        headers = dict(exc.headers or {})
        detail = ""
        if exc.status_code == 405 and (allowed := allowed_methods(request.app, request.scope)):
            # RFC 9110: a 405 names the methods the resource takes (Starlette's names only
            # those of the first route matching the path, and the platform dropped even that).
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not taken here; this URL takes {', '.join(allowed)}"
        return JSONResponse(
            problem(exc.status_code, str(exc.detail), detail),
            status_code=exc.status_code,
            media_type=PROBLEM_JSON,
            headers=headers or None,
        )

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError):  # noqa: ANN202
        state = sqlstate(exc)
        if (refused := REFUSED_VALUES.get(state or "")) is not None:
            # Logged as a warning with the kind only (the value may be PHI); nothing stored.
            log.warning("the database refused a value", sqlstate=state)
            return await _app_error(request, InvalidInput(f"{refused}; nothing was stored"))
        if not gave_way(exc):
            return await _unexpected(request, exc)
        log.warning("request gave way to a concurrent transaction", error=type(exc.orig).__name__)
        return await _app_error(request, TryAgain(
            "the database rolled this request back so that a concurrent one could go on (a "
            "deadlock or serialization failure); nothing was stored: send it again"))

    @app.exception_handler(UnicodeEncodeError)
    async def _not_text(request: Request, exc: UnicodeEncodeError):  # noqa: ANN202
        # A JSON body may escape a lone surrogate (\ud800), which no encoder writes: on its way
        # to the database (SQLite) or into an answer, a value of the request, not a fault.
        log.warning("a request's text could not be encoded", reason=exc.reason)
        return await _app_error(request, InvalidInput(
            "a text of the request has a lone surrogate (\\ud800-\\udfff without its pair): "
            "no text; nothing was stored"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", error=type(exc).__name__)
        return JSONResponse(
            problem(500, "Internal server error", "an unexpected error occurred; see logs"),
            status_code=500,
            media_type=PROBLEM_JSON,
        )


# /readyz's answer, ready (200) or not (503): a report, not an error (no problem+json).
_READINESS = {
    "type": "object", "title": "Readiness", "required": ["status", "checks"],
    "properties": {"status": {"enum": ["ok", "unavailable"]},
                   "checks": {"type": "object", "additionalProperties": {"type": "string"},
                              "description": "Each check (database, kafka, a consumer…): ok, "
                                             "or why not"}},
}


def create_app(runtime: ServiceRuntime, *, operations_only: bool = False) -> FastAPI:
    """The FastAPI app of one service: platform routes plus the service's own routers.

    ``operations_only``: just /healthz, /readyz and /metrics, for processes that run consumers,
    the relay or schedulers without the API (their probes and scrapes still need HTTP).
    """
    definition = runtime.definition
    app = FastAPI(
        title=f"ccm-platform {definition.name}",
        version="0.1.0",
        description=definition.description,
    )
    app.state.runtime = runtime
    app.state.token_cache = TokenCache(runtime.settings.auth_cache_seconds)
    install_error_handlers(app)
    document = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _errors_as_sent(document(), app.routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok", "service": definition.name}

    @app.get("/readyz", tags=["operations"], summary="Readiness: database, Kafka, consumers",
             responses={200: {"description": "Ready: every check is ok",
                              "content": {"application/json": {"schema": _READINESS}}},
                        503: {"description": "Not ready: a check is not ok (the orchestrator "
                                             "sends this process no traffic until it is)",
                              "content": {"application/json": {"schema": _READINESS}}}})
    async def readyz() -> JSONResponse:
        checks = await runtime.readiness()
        ok = all(c == "ok" for c in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "checks": checks},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        await runtime.refresh_metrics()
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if operations_only:
        app.add_middleware(
            EdgeMiddleware, service=definition.name, max_body_bytes=runtime.settings.max_body_bytes
        )
        return app

    @app.get("/v1/practices/{practice}", tags=["tenancy"], summary="The caller's practice")
    async def read_practice(practice: str, tenant: TenantDep) -> dict:
        tenant.require_practice(practice)
        found = await get_practice(runtime.db.engine, practice)
        if not PRICING_SCOPES & tenant.scopes:  # the vendor's terms: not for an EHR's token
            found.pop("pricing")
        return found

    @app.get(
        "/v1/practices/{practice}/audit-events",
        tags=["audit"],
        summary="The practice's audit trail as a FHIR Bundle of AuditEvents (newest first)",
    )
    async def audit_events(
        practice: str,
        tenant: TenantDep,
        patient: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        before: int | None = Query(None, ge=0, le=2**63 - 1,
                                   description="Only entries with a smaller id (paging)"),
    ) -> dict:
        from sqlalchemy import select

        from ccm_shared.audit import as_fhir_audit_event, audit_log

        tenant.require_practice(practice)
        # Who read which patient, in every service: for the practice's administrators only,
        # not any connection's token (an EHR's, a subscriber's).
        if AUDIT_SCOPE not in tenant.scopes:
            raise Forbidden(f"the audit trail needs a token with the {AUDIT_SCOPE!r} scope")
        stmt = select(audit_log).where(audit_log.c.practice == practice)
        if patient:
            stmt = stmt.where(audit_log.c.patient == patient.removeprefix("Patient/"))
        if before is not None:
            stmt = stmt.where(audit_log.c.id < before)
        stmt = stmt.order_by(audit_log.c.id.desc()).limit(limit)
        async with runtime.db.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(rows),
            "entry": [{"resource": as_fhir_audit_event(r)} for r in rows],
        }

    for router in definition.routers(runtime):
        app.include_router(router)
    if definition.configure_app is not None:
        definition.configure_app(app, runtime)
    app.add_middleware(
        EdgeMiddleware,
        service=definition.name,
        max_body_bytes=runtime.settings.max_body_bytes,
        audit=audit_recorder(runtime),
    )
    return app


_PROBLEM_SCHEMA = {
    "type": "object", "title": "Problem", "required": ["type", "title", "status"],
    "description": "RFC 9457 problem details: every error of the non-FHIR routes",
    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                   "status": {"type": "integer"}, "detail": {"type": "string"},
                   "errors": {"type": "array", "items": {"type": "object"}}},
}
_OUTCOME_SCHEMA = {
    "type": "object", "title": "OperationOutcome", "required": ["resourceType", "issue"],
    "description": "FHIR R4 OperationOutcome: every error under /fhir",
    "properties": {"resourceType": {"const": "OperationOutcome"},
                   "issue": {"type": "array", "items": {"type": "object"}}},
}


# What the platform answers a route, by what the route is (``_platform_answers``): the title of
# each status (as its errors carry it) and the headers it is sent with.
_TITLES = {"400": "Bad request", "401": "Unauthorized", "403": "Forbidden", "404": "Not found",
           "413": "Payload too large", "415": "Unsupported media type", "422": "Invalid input",
           "503": "Try again"}
_HEADERS = {
    "401": {"WWW-Authenticate": {"description": 'The challenge: Bearer realm="ccm"',
                                 "schema": {"type": "string"}}},
    "503": {"Retry-After": {"description": "Seconds to wait before sending the request again",
                            "schema": {"type": "integer"}}},
}
_BODY_METHODS = frozenset({"post", "put", "patch"})  # a request body is theirs (RFC 9110)
_WRITE_METHODS = _BODY_METHODS | {"delete"}


def _dependencies(dependant) -> set:  # noqa: ANN001 - a FastAPI Dependant
    """Every dependency a route resolves, however deep (its ``dependencies=`` included)."""
    found = set()
    for sub in dependant.dependencies:
        found.add(sub.call)
        found |= _dependencies(sub)
    return found


def _api_routes(routes: list | tuple) -> list:
    """The API routes of ``routes`` as the OpenAPI document has them, an included router's
    too: FastAPI (0.16x) keeps one as a single entry of ``app.routes``, its routes resolved in
    the context of the inclusion (``iter_route_contexts``)."""
    contexts = getattr(fastapi_routing, "iter_route_contexts", None)
    found = contexts(routes) if contexts is not None else routes
    return [route for route in found
            if isinstance(getattr(route, "original_route", route), APIRoute)]


def _platform_answers(route, method: str, fhir: bool) -> dict[str, list[str]]:  # noqa: ANN001
    """Status → why, for each status the platform itself answers ``method`` of ``route``
    with, from what the route is: its dependency on the bearer token (``authenticate``: 401,
    403), on the JSON body (``json_body``, ``json_object``: 400, 415, 422) or a body FastAPI
    reads into a model, a FHIR interaction's body (POST, PUT, PATCH under /fhir), its path
    parameters (404), a method that carries a body (the edge's 413) or writes (503)."""
    calls = _dependencies(route.dependant)
    authenticated = authenticate in calls
    json_read = bool({json_body, json_object} & calls)
    model = route.body_field is not None
    fhir_body = fhir and method in _BODY_METHODS
    found: dict[str, list[str]] = {}

    def add(status: str, why: str) -> None:
        found.setdefault(status, []).append(why)

    if fhir:
        add("400", "a parameter is refused (a search FHIR cannot do, a value out of range), or "
            "the URL has a NUL (%00)")
    if json_read:
        add("400", "the body is no JSON the platform takes: malformed, not UTF-8, a key twice "
            "in one object, NaN or Infinity, or nested deeper than CCM_MAX_JSON_DEPTH")
    if fhir_body:
        add("400", "the body cannot be read as what the interaction takes (FHIR JSON, a "
            "search's form): malformed, not UTF-8, a key twice in one object, NaN or "
            "Infinity, or nested deeper than CCM_MAX_JSON_DEPTH")
    if authenticated:
        add("401", "no usable bearer token: Authorization is missing, not `Bearer <token>` or "
            "sent more than once, or the token is unknown or revoked")
        add("403", "the token lacks a scope this route needs")
    if route.param_convertors:
        named = ", ".join(f"{{{name}}}" for name in route.param_convertors)
        names = "names" if len(route.param_convertors) == 1 else "name"
        add("404", f"the path's {named} {names} nothing this caller may see: unknown, or "
            "another practice's (which does not exist for it)" if authenticated else
            f"the path's {named} {names} nothing: unknown or invalid")
    if method in _BODY_METHODS:
        add("413", "the request body is larger than CCM_MAX_BODY_BYTES")
    if json_read:
        add("415", "the body's Content-Type is not JSON (application/json or "
            "application/…+json, UTF-8), or there is none")
    if fhir_body:
        add("415", "the body's Content-Type is not a media type the interaction takes (FHIR "
            "JSON: application/fhir+json, R4, UTF-8, uncompressed)")
    if (json_read or model) and not fhir:
        add("422", "a parameter or the body does not validate, or is refused (`errors`, where "
            "given, names each problem)")
    if method in _WRITE_METHODS:
        add("503", "the database rolled the request back so that a concurrent one could go on "
            "(a deadlock or serialization failure); nothing was stored: send it again")
    return found


def _generated_error(content: dict) -> bool:
    """Whether an error's ``content`` is FastAPI's own (its HTTPValidationError, or none given
    by a route's ``responses=``), not a body a route documents as it sends it (/readyz's)."""
    schema = content.get("application/json", {}).get("schema")
    return not schema or schema == {"$ref": "#/components/schemas/HTTPValidationError"}


def _errors_as_sent(schema: dict, routes: list | tuple = ()) -> dict:
    """FastAPI documents a request that fails validation as a 422 of ``application/json``
    ``HTTPValidationError``; this platform answers every error as problem+json (RFC 9457), and
    under /fhir as an OperationOutcome (``application/fhir+json``): the document says so.

    Each operation also lists what the platform answers it with, as ``_platform_answers``
    derives from its route in ``routes``; a status the route documents itself
    (``responses=``) stays as the route has it."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    by_operation = {(route.path_format, method.lower()): route
                    for route in _api_routes(routes) for method in route.methods}
    used = set()
    for path, operations in schema.get("paths", {}).items():
        fhir = is_fhir_path(path)
        media, name = (("application/fhir+json", "OperationOutcome") if fhir
                       else ("application/problem+json", "Problem"))
        ref = f"#/components/schemas/{name}"
        for method, operation in operations.items():
            responses = operation.get("responses", {})
            if fhir and "422" in responses and "400" not in responses:
                # Under /fhir a request that does not validate (a search's _count=5000) is a
                # 400, FHIR's status for a refused parameter, as both services answer it; a 422
                # stays only where a route says what else it means (invalid FHIR content).
                validation = responses["422"]
                responses["400"] = {**validation, "description": "Bad Request"}
                if validation.get("description") == "Validation Error":
                    del responses["422"]
            for status, response in responses.items():
                content = response.get("content", {})
                if status[:1] in ("4", "5") and "application/json" in content and \
                        _generated_error(content):
                    response["content"] = {media: {"schema": {"$ref": ref}}}
                    used.add(name)
                elif fhir and status[:1] == "2" and "application/json" in content:
                    # What /fhir answers is FHIR JSON (a resource, a Bundle, a
                    # CapabilityStatement), whichever Response class a route returns it with.
                    response["content"] = {"application/fhir+json": content["application/json"]}
            if responses.get("422", {}).get("description") == "Validation Error":
                responses["422"]["description"] = ("Invalid input: a parameter does not "
                                                   "validate, or is refused (`errors`, where "
                                                   "given, names each problem)")
            route = by_operation.get((path, method))
            if route is None:
                continue
            explicit = {str(status) for status in route.responses}
            for status, why in _platform_answers(route, method, fhir).items():
                if status in explicit:
                    continue
                responses[status] = {"description": f"{_TITLES[status]}: {'; '.join(why)}",
                                     "content": {media: {"schema": {"$ref": ref}}},
                                     **({"headers": _HEADERS[status]} if status in _HEADERS
                                        else {})}
                used.add(name)
            operation["responses"] = dict(sorted(responses.items()))
    for name, body in (("Problem", _PROBLEM_SCHEMA), ("OperationOutcome", _OUTCOME_SCHEMA)):
        if name in used:
            components[name] = body
    for name in ("HTTPValidationError", "ValidationError"):  # the first refers to the second
        if f'"#/components/schemas/{name}"' not in json.dumps(schema):
            components.pop(name, None)
    return schema


def json_depth(value: object, limit: int) -> int:
    """Depth of a decoded JSON value (a scalar counts as one level, so ``{"a": 1}`` is 2);
    raises ValueError past ``limit`` without walking deeper.

    Only containers are visited (a resource's many scalars are not): four to five times faster
    than visiting every value, which had cost as much as parsing the body.
    """

    def deeper(item: dict | list, depth: int) -> int:  # ``item`` is a container at ``depth``
        if not item:
            return depth
        if depth >= limit:  # its members sit one level deeper
            raise ValueError(f"JSON nested deeper than {limit} levels")
        deepest = depth + 1
        for member in item.values() if type(item) is dict else item:
            if type(member) is dict or type(member) is list:
                found = deeper(member, depth + 1)
                if found > deepest:
                    deepest = found
        return deepest

    if type(value) is not dict and type(value) is not list:
        return 1
    try:
        return deeper(value, 1)
    except RecursionError:  # a limit configured beyond what Python can walk
        raise ValueError(f"JSON nested deeper than {limit} levels") from None


class DuplicateKey(ValueError):
    """A JSON object with a key twice (RFC 8259: names SHOULD be unique; readers differ on which
    value counts, so a system of record refuses it)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return value


def _no_constant(name: str) -> None:
    """NaN, Infinity and -Infinity: Python's reader takes them, JSON (RFC 8259) has none."""
    raise ValueError(f"{name} is not a JSON number")


# json.loads as it reads text, refusing duplicate keys (DuplicateKey) and NaN or Infinity
# (ValueError): ~2 µs more for an Encounter.
STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _is_json_media(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


async def json_body(request: Request) -> Any:
    """The request's body as the platform's JSON APIs take it (a dependency: ``JsonObject``, or
    ``json_body_after`` on a route whose body FastAPI parses into a model, which then also gets
    the media-type and duplicate-key checks; FastAPI parses such a body before dependencies run,
    so malformed JSON there stays its 422): 415 for a ``Content-Type`` other than JSON
    (``application/json`` or ``application/…+json``, UTF-8), an empty one or none (as FastAPI's
    strict default: a browser can send a body without one and no CORS preflight), 400 for
    bytes that are no UTF-8 JSON, a key twice in one object (which value counts depends on the
    reader), NaN or Infinity, or nesting deeper than ``CCM_MAX_JSON_DEPTH``. The body is read
    once per request: FastAPI's own parse of it (a model's) reuses the bytes.
    """
    media, *params = request.headers.get("content-type", "").split(";")
    media = media.strip().lower()
    if not _is_json_media(media):
        raise UnsupportedMediaType(
            (f"content type {media!r} is not supported" if media else "the request names no "
             "media type (Content-Type)") + ": send the body as application/json")
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and \
                value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"charset={value.strip()} is not supported: JSON is "
                                       "UTF-8")
    raw = await request.body()
    try:
        value = STRICT_JSON.decode(raw.decode("utf-8-sig"))  # a byte order mark is ignored
    except DuplicateKey as exc:
        raise MalformedRequest(f"the body has the key {exc.args[0]!r} more than once in one "
                               "object: which one counts would depend on the reader") from None
    except (ValueError, RecursionError) as exc:
        detail = ("nested too deeply" if isinstance(exc, RecursionError) else
                  "it is not UTF-8" if isinstance(exc, UnicodeDecodeError) else exc.args[0])
        raise MalformedRequest(f"the body is not valid JSON: {detail}") from None
    try:
        json_depth(value, runtime_of(request).settings.max_json_depth)
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from None
    return value


async def json_object(request: Request) -> dict[str, Any]:
    """``json_body``, which must be a JSON object (422 otherwise)."""
    value = await json_body(request)
    if type(value) is not dict:
        raise InvalidInput("the body must be a JSON object")
    return value


def json_body_after(caller: Callable[..., Any]) -> list[Any]:
    """The dependencies of a route whose body FastAPI parses into a model: ``caller`` (the
    service's tenant dependency) first, so 401 and 403 come before anything about the body (the
    route's own dependency on it reuses the result), then ``json_body`` (415 for a media type
    other than JSON, 400 for a key twice in one object, whose last value FastAPI kept, NaN or
    Infinity, or nesting too deep). Routes without a body take none of it: they need no
    Content-Type."""
    return [Depends(caller), Depends(json_body)]


JsonObject = Annotated[dict[str, Any], Depends(json_object)]

