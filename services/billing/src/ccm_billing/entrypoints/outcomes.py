"""Every error under /fhir an OperationOutcome (``application/fhir+json``), as ingest's: the
platform answers problem+json, which a FHIR client cannot read. Billing's own errors
(``AppError``) are written as outcomes directly; a request that does not validate (a search's
``_count=5000``) is a 400, FHIR's status for a search parameter refused, not the platform's
422; and the platform's own edge for /fhir (``ccm_shared.http.FhirErrors``): a URL with a NUL
is a 400 before anything reads it, whatever else the platform answers as problem+json there
(an unknown URL's 404, a 405, the body limit's 413, an unexpected error's 500) is sent as the
outcome of the same status, with the same headers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ccm_billing.adapters import fhir
from ccm_shared.errors import AppError
from ccm_shared.http import FHIR_JSON, is_fhir_path, wrap_fhir_errors


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
        if not is_fhir_path(request.url.path):
            return await platform_validation(request, exc)
        errors = exc.errors()
        # A query parameter is named as sent (``_count``); anything else by its place.
        places = [".".join(map(str, e["loc"][1:] if e["loc"][:1] == ("query",) else e["loc"]))
                  for e in errors]
        doc = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": f"{place}: {e['msg']}",
             "expression": [place]} for place, e in zip(places, errors, strict=True)]}
        return JSONResponse(doc, status_code=400, media_type=FHIR_JSON)

    wrap_fhir_errors(app)
