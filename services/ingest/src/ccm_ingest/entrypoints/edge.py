"""OperationOutcome for every error under /fhir, including those raised before our routes run
(authentication, unknown routes, request validation, the platform's body-size limit)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ccm_ingest.domain.model import FhirRejected, Issue
from ccm_ingest.entrypoints.outcomes import (
    app_error_response,
    outcome_response,
    rejected_response,
)
from ccm_shared.http import fhir_issue_code, is_fhir_path, wrap_fhir_errors


def install(app: FastAPI) -> None:
    app.state.fhir_error_handler = app_error_response
    platform_validation = app.exception_handlers[RequestValidationError]
    platform_http = app.exception_handlers[StarletteHTTPException]

    @app.exception_handler(FhirRejected)
    async def _rejected(request: Request, exc: FhirRejected):  # noqa: ANN202
        return rejected_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):  # noqa: ANN202
        if not is_fhir_path(request.url.path):
            return await platform_validation(request, exc)
        issues = [Issue("error", "invalid", e.get("msg", "invalid"),
                        (".".join(str(p) for p in e.get("loc", ())),)) for e in exc.errors()]
        return outcome_response(400, issues)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # noqa: ANN202
        if not is_fhir_path(request.url.path):
            return await platform_http(request, exc)
        code = fhir_issue_code(exc.status_code)
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 405:  # Starlette names only the first route's methods
            allowed = _allowed(request)
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not taken here; this URL takes {', '.join(allowed)}"
            if request.method == "POST" and "PUT" in allowed:
                detail += " (a create with an id of your own is a PUT to this URL)"
        return outcome_response(exc.status_code, [Issue("error", code, detail)], headers)

    # The platform middleware answers an oversized Content-Length (and what fails past every
    # handler) with problem+json before any route runs: the platform's FhirErrors rewrites
    # those for /fhir, and refuses a URL with a NUL; FhirEdge, outside it, what only ingest does.
    wrap_fhir_errors(app, outer=FhirEdge)


def _allowed(request: Request) -> list[str]:
    """The methods a /fhir URL takes (a 405's Allow header), by its shape: Starlette names only
    those of the first route that matched the path."""
    parts = request.url.path.strip("/").split("/")[1:]
    if not parts:
        return ["POST"]
    if len(parts) == 1:  # a type: search, create, conditional update and delete
        return ["GET", "HEAD"] if parts[0] == "metadata" else ["DELETE", "GET", "HEAD", "POST",
                                                               "PUT"]
    if len(parts) == 2:
        return ["POST"] if parts[1] in ("$validate", "_search") else ["DELETE", "GET", "HEAD",
                                                                      "PUT"]
    # _history, _history/{vid} (HEAD wherever GET: the platform's edge answers it)
    return ["POST"] if parts[-1] == "$validate" else ["GET", "HEAD"]


# What a request body may be labelled: FHIR JSON, plain JSON, and STU3's name for FHIR JSON
# (``application/json+fhir``), which Accept and _format take too: older EHR clients send it.
FHIR_JSON_MEDIA = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
# What a client may ask for: JSON (the only format served). ``_format`` values come URL-decoded,
# so ``application/fhir+json`` may arrive as ``application/fhir json``.
_JSON_MEDIA = FHIR_JSON_MEDIA | {"application/*", "*/*"}
_JSON_FORMATS = FHIR_JSON_MEDIA | {"json"}


def unacceptable(scope) -> Issue | None:  # noqa: ANN001
    """Why the response format a request asks for (``_format``, else ``Accept``) cannot be
    given (406), or None."""
    query = scope.get("query_string", b"")
    if b"_format" in query:
        formats = [v.strip().lower().replace(" ", "+") for k, v in
                   parse_qsl(query.decode("latin-1"), keep_blank_values=True)
                   if k == "_format" and v.strip()]
        if formats:  # it decides, whatever Accept says
            if any(f not in _JSON_FORMATS for f in formats):
                return Issue("error", "not-supported", f"_format {formats[0]!r}: only JSON is "
                             "served (json, application/fhir+json)", ("_format",))
            return None
    for key, value in scope.get("headers", ()):
        if key == b"accept":
            ranges = [r for r in value.decode("latin-1").split(",") if r.strip()]
            media = [_media_range(r) for r in ranges]
            if ranges and not any(m in _JSON_MEDIA or m.endswith("+json") for m in media):
                versions = [v for r in ranges if (v := fhir_version(r)) not in R4_VERSIONS]
                why = (f"only FHIR R4 is served (fhirVersion=4.0), not {versions[0]}"
                       if versions else "only JSON is served (application/fhir+json, "
                       "application/json)")
                return Issue("error", "not-supported",
                             f"Accept {value.decode('latin-1')!r}: {why}", ("Accept",))
    return None


def answered_as(scope) -> bytes | None:  # noqa: ANN001
    """The JSON media type to label the answer with when Accept refuses FHIR JSON (``q=0``)
    but takes plain JSON (``application/fhir+json;q=0, application/json``), None to answer as
    FHIR JSON, as always otherwise. (The answer is the same JSON either way; it was labelled
    with the type the client refused.)"""
    if b"_format" in scope.get("query_string", b""):
        return None  # _format decides (json is FHIR JSON), whatever Accept says
    for key, value in scope.get("headers", ()):
        if key == b"accept":
            ranges = [r for r in value.decode("latin-1").split(",") if r.strip()]
            refused = any(_params(r)[0] == "application/fhir+json" and not _media_range(r)
                          for r in ranges)
            taken = {_media_range(r) for r in ranges}
            if not refused or "application/fhir+json" in taken:
                return None
            for media in ("application/json", "application/json+fhir"):
                if media in taken or (media == "application/json"
                                      and taken & {"application/*", "*/*"}):
                    return media.encode() + b"; charset=utf-8"
    return None


# The FHIR version media-type parameter (http.html#version-parameter): R4 is 4.0 (or 4.0.1).
R4_VERSIONS = frozenset({None, "4.0", "4.0.0", "4.0.1"})


def _params(text: str) -> tuple[str, dict[str, str]]:
    """A media type (lower case) and its parameters (names in lower case)."""
    media, *params = (p.strip() for p in text.split(";"))
    named = {}
    for param in params:
        name, _, value = param.partition("=")
        named[name.strip().lower()] = value.strip().strip('"')
    return media.lower(), named


def fhir_version(text: str) -> str | None:
    """The ``fhirVersion`` parameter of a media type or range, None without one."""
    return _params(text)[1].get("fhirversion")


def charset(text: str) -> str | None:
    """The ``charset`` parameter of a media type (lower case), None without one."""
    found = _params(text)[1].get("charset")
    return found.lower() if found is not None else None


def _media_range(text: str) -> str:
    """A media range of Accept without its parameters, "" when it is not acceptable: its q is 0,
    or it asks for a FHIR version other than R4."""
    media, params = _params(text)
    try:
        if float(params.get("q", "1")) <= 0:
            return ""
    except ValueError:
        pass
    return media if params.get("fhirversion") in R4_VERSIONS else ""


class FhirEdge:
    """ASGI wrapper of /fhir paths: 406 OperationOutcome when the request wants a format other
    than JSON; a trailing slash is the URL without it."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send):  # noqa: ANN001
        path = scope.get("path", "")
        if scope["type"] != "http" or not is_fhir_path(path):
            return await self.app(scope, receive, send)
        if (issue := unacceptable(scope)) is not None:
            return await outcome_response(406, [issue])(scope, receive, send)
        raw = scope.get("raw_path") or path.encode()
        if raw.endswith(b"/"):
            # A base configured as ``…/fhir/`` (or a URL built on one) names the same thing:
            # served as it is, not redirected (Starlette answered 307 with no body, which a
            # client that does not follow redirects of a POST takes as a failure). Only a
            # slash as sent: an encoded one (``%2F``) is part of an id, never stripped.
            slashes = len(raw) - len(raw.rstrip(b"/"))
            scope = {**scope, "path": path[:-slashes], "raw_path": raw[:-slashes]}
        if (media := answered_as(scope)) is not None:
            async def relabelled(message):  # noqa: ANN001, ANN202
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [
                        (k, media if k == b"content-type" and v.startswith(b"application/fhir+json")
                         else v) for k, v in message.get("headers", [])]}
                await send(message)

            return await self.app(scope, receive, relabelled)
        await self.app(scope, receive, send)
