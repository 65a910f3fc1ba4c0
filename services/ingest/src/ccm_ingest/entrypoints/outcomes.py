"""FHIR responses: OperationOutcome bodies, resource bodies and their headers."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ccm_ingest.domain.model import FhirRejected, Issue
from ccm_ingest.service_layer.resources import Outcome
from ccm_shared.errors import AppError
from ccm_shared.http import FHIR_JSON
from ccm_shared.jsontext import compact


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": i.severity, "code": i.code, "diagnostics": i.diagnostics,
             **({"expression": list(i.expression)} if i.expression else {})}
            for i in issues
        ] or [{"severity": "information", "code": "informational", "diagnostics": "ok"}],
    }


def fhir_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(compact(body), status, headers=headers, media_type=FHIR_JSON)


def outcome_response(status: int, issues: list[Issue],
                     headers: dict[str, str] | None = None) -> Response:
    return fhir_json(operation_outcome(issues), status, headers)


def rejected_response(exc: FhirRejected) -> Response:
    return outcome_response(exc.status, exc.issues)


def app_error_response(exc: AppError) -> Response:
    """The platform's errors (auth, limits, not found) on /fhir, as OperationOutcome."""
    headers = {"WWW-Authenticate": 'Bearer realm="ccm"'} if exc.status == 401 else None
    issue = Issue("error", exc.code, exc.detail, tuple(exc.expression))
    return outcome_response(exc.status, [issue], headers)


def version_headers(outcome: Outcome, base: str) -> dict[str, str]:
    v = outcome.version
    if v is None:
        return {}
    return {
        "ETag": f'W/"{v.version_id}"',
        # RFC 9110 §8.8.2.1: never later than the response's Date (a meta.lastUpdated the
        # EHR sent may be ahead of our clock, within the allowed difference)
        "Last-Modified": http_date(min(v.last_updated, datetime.now(UTC))),
        "Location": f"{base}/{outcome.location}",
    }


def read_response(outcome: Outcome, base: str) -> Response:
    """A read's or vread's answer: the version with its headers, or, when the client's copy is
    current (304), no body and the version's ETag and Last-Modified (RFC 9110 §15.4.5: what
    a 200 would have said of the version, nothing of a representation not sent)."""
    headers = version_headers(outcome, base)
    if outcome.status == 304:
        return Response(status_code=304, headers={name: headers[name]
                                                  for name in ("ETag", "Last-Modified")})
    return fhir_json(outcome.version.resource if outcome.version else None, outcome.status,
                     headers)


def prefer(request: Request, default: str = "representation", name: str = "return") -> str:
    """The ``name`` preference (``return``, ``handling``; RFC 7240: preferences separated by
    commas, in one or several Prefer headers; each may carry ``;`` parameters), ``default``
    when none is given."""
    if "prefer" not in request.headers:  # most requests: no Prefer at all
        return default
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            key, _, value = preference.split(";", 1)[0].partition("=")
            if key.strip().lower() == name:
                return value.strip().strip('"')
    return default


def lenient(request: Request) -> bool:
    """``Prefer: handling=lenient``: search parameters this server does not know or support
    are ignored (and left out of the ``self`` link) instead of refused (FHIR's default,
    ``strict``, refuses them)."""
    return prefer(request, "strict", "handling").lower() == "lenient"


def returned(request: Request, may_read: bool, default: str = "representation") -> str:
    """What a write answers with (``Prefer: return=``): never a stored resource to a token
    without ``fhir:read`` (a conditional create that finds a match answers with the match, and
    a stale write with the current version: a write-only token would read them), which gets
    an OperationOutcome instead."""
    wanted = prefer(request, default)
    return "OperationOutcome" if wanted == "representation" and not may_read else wanted


def write_response(request: Request, outcome: Outcome, base: str, *,
                   may_read: bool) -> Response:
    """Status, ETag/Location/Last-Modified, and the body ``Prefer: return=`` asks for
    (``returned``)."""
    headers = version_headers(outcome, base)
    wanted = returned(request, may_read)
    if outcome.status == 204:
        if outcome.issues and wanted != "minimal":
            # A 204 has no body: what it has to say (a conditional delete that matched
            # nothing) is a 200 OperationOutcome, as FHIR allows a delete to answer.
            return outcome_response(200, outcome.issues)
        return Response(status_code=204)
    if wanted == "OperationOutcome" or outcome.outcome_body:
        return outcome_response(outcome.status, outcome.issues, headers)
    if wanted == "minimal" or outcome.version is None:
        return Response(status_code=outcome.status, headers=headers)
    return fhir_json(outcome.version.resource, outcome.status, headers)


def http_date(value: datetime) -> str:
    """An HTTP date (RFC 9110 IMF-fixdate) of an aware time; remembered, as the writes stored
    together share their time. Equal datetimes of one zone can be different instants (the two
    readings of a repeated hour), so the zone and fold are part of the key."""
    return _http_date(value, value.tzinfo, value.fold)


@lru_cache(maxsize=64)
def _http_date(value: datetime, _zone: object, _fold: int) -> str:
    return format_datetime(value.astimezone(UTC), usegmt=True)
