"""Every error under /fhir an OperationOutcome (``application/fhir+json``), as ingest's: the
platform answers problem+json, which a FHIR client cannot read. Billing's own errors
(``AppError``) are written as outcomes directly; a request that does not validate (a search's
``_count=5000``) is a 400, FHIR's status for a search parameter refused, not the platform's
422; a URL with a NUL is a 400 before anything reads it; whatever else the platform answers as
problem+json under /fhir (an unknown URL's 404, a 405, the body limit's 413, an unexpected
error's 500) is sent as the outcome of the same status, with the same headers."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ccm_billing.adapters import fhir
from ccm_shared.errors import AppError
from ccm_shared.http import PROBLEM_JSON

FHIR_JSON = "application/fhir+json"
# The OperationOutcome issue type of a problem's status (else "exception" for a 5xx, else
# "processing").
ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
               405: "not-supported", 406: "not-supported", 409: "conflict", 410: "deleted",
               413: "too-costly", 415: "not-supported", 422: "invalid", 429: "throttled",
               503: "transient"}


def is_fhir(path: str) -> bool:
    return path == "/fhir" or path.startswith("/fhir/")


def outcome(status: int, code: str, diagnostics: str, expression: list[str] | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(fhir.operation_outcome(code, diagnostics, expression),
                        status_code=status, media_type=FHIR_JSON, headers=headers)


def fhir_error(exc: AppError) -> JSONResponse:
    """An AppError under /fhir (the platform's ``fhir_error_handler``); a 401 with its
    challenge, as the platform's problem has it."""
    headers = {"WWW-Authenticate": 'Bearer realm="ccm"'} if exc.status == 401 else None
    return outcome(exc.status, exc.code, exc.detail, exc.expression, headers)


def install(app: FastAPI) -> None:
    """Called with the routes in place (``configure_app``), before the app first serves."""
    app.state.fhir_error_handler = fhir_error
    platform_validation = app.exception_handlers[RequestValidationError]

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):  # noqa: ANN202
        if not is_fhir(request.url.path):
            return await platform_validation(request, exc)
        errors = exc.errors()
        # A query parameter is named as sent (``_count``); anything else by its place.
        places = [".".join(map(str, e["loc"][1:] if e["loc"][:1] == ("query",) else e["loc"]))
                  for e in errors]
        doc = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": f"{place}: {e['msg']}",
             "expression": [place]} for place, e in zip(places, errors, strict=True)]}
        return JSONResponse(doc, status_code=400, media_type=FHIR_JSON)

    build = app.build_middleware_stack

    def build_with_outcomes():  # noqa: ANN202
        return FhirEdge(build())

    app.build_middleware_stack = build_with_outcomes  # type: ignore[method-assign]


class FhirEdge:
    """ASGI wrapper around the whole app (the platform's middleware included), for /fhir: a URL
    with a NUL is a 400 (PostgreSQL text cannot hold one: an id or search value with it was a
    422 of the database's refusal), as ingest's; a problem+json answer is rewritten as the
    OperationOutcome of its status, its headers kept (``Allow``, ``WWW-Authenticate``,
    ``Retry-After``)."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or not is_fhir(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            return await outcome(400, "value", "the URL has a NUL character (%00)")(
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
            start, problem = held.pop("start"), json.loads(held.pop("body") or b"{}")
            status = start["status"]
            code = ISSUE_CODES.get(status, "exception" if status >= 500 else "processing")
            body = json.dumps(fhir.operation_outcome(
                code, problem.get("detail") or problem.get("title") or str(status))).encode()
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k not in (b"content-type", b"content-length")]
            headers += [(b"content-type", FHIR_JSON.encode()),
                        (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
