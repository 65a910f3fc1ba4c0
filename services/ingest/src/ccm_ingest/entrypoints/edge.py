"""OperationOutcome for every error under /fhir, including those raised before our routes run
(authentication, unknown routes, request validation, the platform's body-size limit)."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ccm_ingest.domain.model import FhirRejected, Issue
from ccm_ingest.entrypoints.outcomes import (
    FHIR_JSON,
    app_error_response,
    operation_outcome,
    outcome_response,
    rejected_response,
)

HTTP_ISSUE_CODES = {404: "not-found", 405: "not-supported", 413: "too-costly", 415: "not-supported"}


def _is_fhir(request: Request) -> bool:
    return request.url.path == "/fhir" or request.url.path.startswith("/fhir/")


def install(app: FastAPI) -> None:
    app.state.fhir_error_handler = app_error_response
    platform_validation = app.exception_handlers[RequestValidationError]
    platform_http = app.exception_handlers[StarletteHTTPException]

    @app.exception_handler(FhirRejected)
    async def _rejected(request: Request, exc: FhirRejected):  # noqa: ANN202
        return rejected_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):  # noqa: ANN202
        if not _is_fhir(request):
            return await platform_validation(request, exc)
        issues = [Issue("error", "invalid", e.get("msg", "invalid"),
                        (".".join(str(p) for p in e.get("loc", ())),)) for e in exc.errors()]
        return outcome_response(400, issues)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # noqa: ANN202
        if not _is_fhir(request):
            return await platform_http(request, exc)
        code = HTTP_ISSUE_CODES.get(exc.status_code, "processing")
        return outcome_response(exc.status_code, [Issue("error", code, str(exc.detail))])

    # The platform middleware answers an oversized Content-Length with problem+json before any
    # route or handler runs; rewrite that one response for /fhir (ccm_shared has no hook).
    build = app.build_middleware_stack

    def build_with_outcomes():  # noqa: ANN202
        return OutcomeFor413(build())

    app.build_middleware_stack = build_with_outcomes  # type: ignore[method-assign]


class OutcomeFor413:
    """ASGI wrapper: a problem+json 413 on a /fhir path becomes an OperationOutcome."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send):  # noqa: ANN001
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/fhir" or path.startswith("/fhir/")):
            return await self.app(scope, receive, send)
        held: dict = {}

        async def rewrite(message):  # noqa: ANN001, ANN202
            if message["type"] == "http.response.start" and message["status"] == 413 and any(
                k == b"content-type" and v.startswith(b"application/problem+json")
                for k, v in message.get("headers", [])
            ):
                held["start"] = message
                return
            if "start" in held and message["type"] == "http.response.body":
                detail = json.loads(message.get("body") or b"{}").get("detail", "too large")
                body = json.dumps(operation_outcome(
                    [Issue("error", "too-costly", detail)])).encode()
                start = held.pop("start")
                headers = [(k, v) for k, v in start["headers"]
                           if k not in (b"content-type", b"content-length")]
                headers += [(b"content-type", FHIR_JSON.encode()),
                            (b"content-length", str(len(body)).encode())]
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, rewrite)
