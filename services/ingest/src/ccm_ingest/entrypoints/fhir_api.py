"""The FHIR R4 REST endpoint at /fhir: create, update, delete, read, history, search, Bundles,
$validate and the CapabilityStatement. Every error answers an OperationOutcome."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qs, parse_qsl, urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ccm_ingest.adapters.fhir_validation import load_models
from ccm_ingest.adapters.repository import SqlResourceRepository, VersionRow
from ccm_ingest.domain.config import IngestConfig
from ccm_ingest.domain.model import (
    SUPPORTED_TYPES,
    FhirRejected,
    Issue,
    isoformat,
    rejected,
)
from ccm_ingest.domain.rules import unresolved_local_references
from ccm_ingest.entrypoints.bases import FhirBases
from ccm_ingest.entrypoints.edge import FHIR_JSON_MEDIA, R4_VERSIONS, charset, fhir_version
from ccm_ingest.entrypoints.outcomes import (
    fhir_json,
    lenient,
    operation_outcome,
    outcome_response,
    read_response,
    returned,
    write_response,
)
from ccm_ingest.service_layer import bundles
from ccm_ingest.service_layer import resources as handlers
from ccm_ingest.service_layer.group_commit import GroupedWrites
from ccm_ingest.service_layer.practice import practice_settings
from ccm_ingest.service_layer.resources import Caller, Outcome, Write
from ccm_ingest.settings import IngestSettings
from ccm_shared.db import UnitOfWork, giving_way
from ccm_shared.http import STRICT_JSON, DuplicateKey, TenantDep, json_depth, named_patient
from ccm_shared.ids import random_uuid
from ccm_shared.observability import current_correlation_id
from ccm_shared.paging import page_links as paging_links
from ccm_shared.service import ServiceRuntime
from ccm_shared.tenancy import Tenant
from ccm_shared.text import is_text


class PracticeCache:
    """A practice's time zone and ingest configuration, re-read after ``ttl`` seconds.

    ``get_or_load`` reads an expired or missing entry once however many requests want it at
    that moment (each used to read it: 32 concurrent POSTs, 32 reads of the same row)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[tuple[str, str], tuple[float, Any]] = {}
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self._epochs: dict[tuple[str, str], int] = {}  # bumped by forget: older loads are stale

    async def get_or_load(self, kind: str, key: str,
                          load: Callable[[], Awaitable[Any]]) -> Any:
        """The cached value, or ``load()``'s (cached unless None). Callers that arrive while
        another loads wait for its result, or its error; if that load is cancelled (its client
        went away) they load themselves."""
        while True:
            value = self.get(kind, key)
            if value is not None:
                return value
            pending = self._loading.get((kind, key))
            if pending is None:
                break
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this caller was cancelled, not (only) the load
        done = asyncio.get_running_loop().create_future()
        self._loading[(kind, key)] = done
        epoch = self._epochs.get((kind, key), 0)
        try:
            value = await load()
        except asyncio.CancelledError:
            done.cancel()
            raise
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: nobody may be waiting
            raise
        else:
            if value is not None and self._epochs.get((kind, key), 0) == epoch:
                self.put(kind, key, value)  # not when forgotten meanwhile: it may be the old one
            done.set_result(value)
            return value
        finally:
            if self._loading.get((kind, key)) is done:
                del self._loading[(kind, key)]

    def get(self, kind: str, key: str) -> Any:
        hit = self._entries.get((kind, key))
        if hit is None or time.monotonic() - hit[0] > self.ttl:
            return None
        return hit[1]

    def put(self, kind: str, key: str, value: Any) -> None:
        self._entries[(kind, key)] = (time.monotonic(), value)

    def forget(self, tenant: str) -> None:
        """Drop the practice's entry; a read already under way is not used for later requests."""
        key = ("practice", tenant)
        self._entries.pop(key, None)
        self._loading.pop(key, None)
        self._epochs[key] = self._epochs.get(key, 0) + 1


async def caller_for(runtime: ServiceRuntime, tenant: Tenant, uow: UnitOfWork | None = None,
                     *, local_bases: tuple[str, ...] = ()) -> Caller:
    """The caller, with its practice's settings (cached; read in ``uow`` or a session of its
    own when not); ``local_bases``: the /fhir bases the request came to."""
    cache: PracticeCache = runtime.state["practice_cache"]

    async def load() -> tuple[ZoneInfo, IngestConfig, int] | None:
        async with runtime.db.unit_of_work() if uow is None else nullcontext(uow) as reading:
            return await practice_settings(reading, tenant.practice_id)

    practice = await cache.get_or_load("practice", tenant.practice_id, load)
    if practice is None:
        raise rejected(404, "not-found", "the token's practice no longer exists")
    now: datetime = runtime.clock()
    skew = runtime.service_settings().max_clock_skew_seconds  # type: ignore[attr-defined]
    return Caller(tenant.practice_id, tenant.token_id, tenant.label or tenant.token_id,
                  practice[0], practice[1], now, timedelta(seconds=skew), local_bases,
                  practice[2])

# $validate's modes (FHIR: create, update, delete, profile); None: create.
VALIDATE_MODES = (None, "create", "update", "profile")
# Runs of a transaction Bundle that a deadlock with a concurrent one rolls back, before the
# client is answered 503 (Retry-After) instead.
TRANSACTION_ATTEMPTS = 3


def _check_mode(mode: str | None, where: str) -> None:
    if mode not in VALIDATE_MODES:
        raise rejected(400, "not-supported", f"$validate mode {mode!r} is not supported; "
                       "supported: create, update, profile", where)


# $validate's input parameters (OperationDefinition Resource-validate) and the element of a
# Parameters.parameter that carries each one's value; each is given at most once.
_VALIDATE_PARAMETERS = {"resource": "resource", "mode": "valueCode", "profile": "valueUri"}
_PARAMETERS_ELEMENTS = frozenset({"resourceType", "id", "meta", "language", "parameter"})
_PARAMETER_ELEMENTS = frozenset({"name", "id", "extension"})  # besides the value


def validate_input(body: Any, rtype: str, mode: str | None,
                   profile: str | None) -> tuple[Any, str | None]:
    """What $validate checks and its mode, from the body: the resource itself, or FHIR's
    ``Parameters`` form (parameters ``resource``, ``mode``, ``profile``). A mode or profile
    given in the query and the body must agree; a profile must be the type's base R4
    StructureDefinition, the only one validated against here (FHIR: a server that cannot
    validate against the profile it is given SHALL return an error)."""
    if type(body) is not dict or body.get("resourceType") != "Parameters":
        _check_profile(profile, rtype, "profile")
        return body, mode
    if unknown := sorted(set(body) - _PARAMETERS_ELEMENTS):
        raise rejected(400, "structure", f"Parameters has no element {unknown[0]!r}: $validate "
                       "takes Parameters.parameter (resource, mode, profile)",
                       f"Parameters.{unknown[0]}")
    sent = body.get("parameter")
    if type(sent) is not list:
        raise rejected(400, "required" if sent is None else "structure", "Parameters.parameter "
                       "must be an array of parameters: resource (the resource to validate), "
                       "mode and profile", "Parameters.parameter")
    given: dict[str, tuple[Any, str]] = {}  # name: (value, where)
    for i, parameter in enumerate(sent):
        at = f"Parameters.parameter[{i}]"
        if type(parameter) is not dict:
            raise rejected(400, "structure", f"{at} must be a JSON object", at)
        name = parameter.get("name")
        element = _VALIDATE_PARAMETERS.get(name) if type(name) is str else None
        if element is None:
            raise rejected(400, "required" if name is None else "not-supported", "$validate "
                           "takes the parameters resource, mode and profile" + (
                               f", not {name!r}" if name is not None else f": {at} has no name"),
                           f"{at}.name")
        if name in given:
            raise rejected(400, "structure", f"the parameter {name!r} is given twice ("
                           f"{given[name][1]} and {at}): which one counts would be a guess", at)
        if other := sorted(set(parameter) - _PARAMETER_ELEMENTS - {element}):
            raise rejected(400, "structure", f"the parameter {name!r} takes {element}, not "
                           f"{other[0]}", f"{at}.{other[0]}")
        value = parameter.get(element)
        if element == "resource" and type(value) is not dict:
            raise rejected(400, "required" if value is None else "structure", "the parameter "
                           "'resource' carries the resource to validate (a JSON object) in "
                           "its element resource", f"{at}.resource")
        if element != "resource" and (type(value) is not str or not value.strip()):
            raise rejected(400, "required" if value is None else "value", f"the parameter "
                           f"{name!r} needs a {element} (a non-empty string)", f"{at}.{element}")
        given[name] = (value, f"{at}.{element}")
    if "mode" in given:
        sent_mode, where = given["mode"]
        if mode is not None and mode != sent_mode:
            raise rejected(400, "invalid", f"mode is given in the query ({mode!r}) and as a "
                           f"parameter ({sent_mode!r}): give it once", where)
        _check_mode(sent_mode, where)
        mode = sent_mode
    if "profile" in given:
        sent_profile, where = given["profile"]
        if profile is not None and profile != sent_profile:
            raise rejected(400, "invalid", f"profile is given in the query ({profile!r}) and as "
                           f"a parameter ({sent_profile!r}): give it once", where)
        _check_profile(sent_profile, rtype, where)
    else:
        _check_profile(profile, rtype, "profile")
    if "resource" not in given:
        raise rejected(400, "required", "the Parameters have no parameter 'resource': the "
                       "resource to validate", "Parameters.parameter")
    resource, where = given["resource"]
    if resource.get("resourceType") != rtype:
        raise rejected(400, "invalid", f"the parameter 'resource' is a "
                       f"{_type_named(resource.get('resourceType'))}: this URL validates "
                       f"{rtype}", f"{where}.resourceType")
    return resource, mode


def _type_named(kind: Any) -> str:
    return (repr(kind) if type(kind) is str else "resource without a resourceType"
            if kind is None else "resource whose resourceType is no string")


def _check_profile(profile: str | None, rtype: str, where: str) -> None:
    """400 for a profile other than ``rtype``'s base R4 StructureDefinition."""
    if profile is None:
        return
    url, _, version = profile.partition("|")
    if url != f"{BASE_PROFILE}{rtype}" or version not in ("", *_R4_RELEASES):
        raise rejected(400, "not-supported", f"profile {profile!r}: resources are validated "
                       f"against base FHIR R4 only ({BASE_PROFILE}{rtype}), not against other "
                       "profiles", where)


BASE_PROFILE = "http://hl7.org/fhir/StructureDefinition/"
_R4_RELEASES = ("4.0.0", "4.0.1")


def processable(bundle: dict[str, Any]) -> str:
    """The type of a Bundle ``POST /fhir`` processes (transaction or batch), else 422."""
    kind = bundle.get("type")
    if kind not in ("transaction", "batch"):
        raise rejected(422, "value", ("Bundle.type is missing" if kind is None else
                                      f"Bundle.type {kind!r}") + ": only transaction and "
                       "batch Bundles can be processed", "Bundle.type")
    return kind


# What a write answers for content FHIR R4 or this server's rules refuse (documented: FastAPI
# knows only its own request validation, which /fhir answers 400).
_INVALID_RESOURCE: dict[int | str, dict[str, Any]] = {422: {
    "description": "The resource breaks FHIR R4 or a rule of this server: an OperationOutcome "
                   "whose issues name the elements", "content": {"application/json": {}}}}


# What a conditional write (PUT, DELETE Type?criteria) and a conditional read answer besides
# the platform's errors.
_SEVERAL_MATCH: dict[int | str, dict[str, Any]] = {412: {
    "description": "Several resources match the criteria (only a single match is written), or "
                   "If-Match names no current version: an OperationOutcome",
    "content": {"application/json": {}}}}
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {304: {
    "description": "Not Modified: If-None-Match names this version, or it was not modified "
                   "since If-Modified-Since; no body, its ETag and Last-Modified"}}


def _require_fhir(tenant: Tenant) -> None:
    """403 for a token with neither of the FHIR API's scopes (one of another service's)."""
    if not {"fhir:read", "fhir:write"} & set(tenant.scopes):
        tenant.require_scope("fhir:write")


def _check_type(rtype: str, *, type_level: bool = False) -> None:
    """404 for a type not served here; ``type_level``: the URL is ``/fhir/{rtype}`` itself,
    where ``metadata`` is only read (its own route): any other method there is a 405 with
    Allow (a URL under it, ``/fhir/metadata/x``, names nothing: 404)."""
    if type_level and rtype == "metadata":
        raise StarletteHTTPException(405)
    if rtype not in SUPPORTED_TYPES:
        raise rejected(404, "not-supported", f"resource type {rtype!r} is not supported; "
                       f"supported: {', '.join(SUPPORTED_TYPES)}"
                       + (" (a transaction or batch Bundle is POSTed to the base, /fhir)"
                          if rtype == "Bundle" else ""), "resourceType")


def standalone(body: Any, rtype: str) -> dict[str, Any]:
    """A resource sent alone (not in a Bundle), valid and storable: 422 also for a reference
    to a Bundle's fullUrl (``urn:uuid:``), which nothing here resolves."""
    resource = handlers.validated(body, rtype)
    if unresolved := unresolved_local_references(resource, rtype, alone=True):
        raise FhirRejected(422, unresolved)
    return resource


async def read_json(request: Request, max_depth: int) -> Any:
    """The request body as JSON: 415 for other media types, 400 when unparseable or too deep."""
    content_type = request.headers.get("content-type")
    if content_type is not None:  # without one the body is read as FHIR JSON
        media = content_type.split(";")[0].strip()
        if media.lower() not in FHIR_JSON_MEDIA:
            # An empty one (``Content-Type: ;`` or no value) is no media type either: what
            # the client meant is unknown, so it is not guessed to be JSON.
            raise rejected(415, "not-supported", (f"content type {media!r} is not supported"
                           if media else "the Content-Type header names no media type")
                           + "; send application/fhir+json (or application/json, "
                           "application/json+fhir)")
        if (version := fhir_version(content_type)) not in R4_VERSIONS:
            raise rejected(415, "not-supported", f"fhirVersion={version} is not supported: "
                           "this server takes FHIR R4 (fhirVersion=4.0, or no fhirVersion)")
        if (sent_charset := charset(content_type)) not in (None, "utf-8", "utf8"):
            raise rejected(415, "not-supported", f"charset={sent_charset} is not "
                           "supported: FHIR JSON is UTF-8")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise rejected(415, "not-supported", f"Content-Encoding {encoding!r} is not supported: "
                       "send the body uncompressed")
    raw = await request.body()
    not_utf8(raw)
    try:
        # UTF-8, with or without a byte order mark (FHIR: servers should accept one).
        text = raw.decode("utf-8-sig")
        # Refusing duplicate keys and NaN or Infinity: ~2 µs more for an Encounter, ~4 µs per
        # resource of a Bundle (the platform's decoder, shared with its other JSON APIs).
        value = STRICT_JSON.decode(text)
    except DuplicateKey as exc:
        raise rejected(400, "structure", f"the body has the key {exc.args[0]!r} more than once "
                       "in one object: which one counts would depend on the reader") from None
    except (ValueError, RecursionError) as exc:
        detail = ("nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                  if isinstance(exc, UnicodeDecodeError) else exc.args[0])
        raise rejected(400, "structure", f"the body is not valid JSON: {detail}") from None
    try:
        json_depth(value, max_depth)
    except ValueError as exc:
        raise rejected(400, "too-costly", str(exc)) from None
    if _ESCAPED_NUL_OR_SURROGATE.search(text) and (found := _not_text(value)) is not None:
        where, what = found
        raise rejected(400, "structure", f"{where} has {what}: FHIR strings are Unicode text "
                       "without it (nor can a database store it)", where)
    return value


def not_utf8(raw: bytes) -> None:
    """415 for a body in another Unicode encoding (UTF-16 or UTF-32, with or without a byte
    order mark), whatever its Content-Type says: FHIR JSON is UTF-8, and a charset other than
    UTF-8 is refused already. Bytes that are no text in any of them are left to the reader
    (400: not JSON)."""
    encoding = json.detect_encoding(raw)  # from the BOM or the NUL bytes of the first four
    if encoding in ("utf-8", "utf-8-sig"):
        return
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return
    raise rejected(415, "not-supported", f"the body is encoded as {encoding.upper()}: FHIR "
                   "JSON is UTF-8 (send the body as UTF-8, charset=utf-8 or no charset)")


# What JSON may escape and no FHIR string holds (PostgreSQL text cannot store a NUL, and a lone
# surrogate is no character: encoding it failed in error messages, the XHTML parser and the
# database, 500s). Unescaped, neither gets past the reader (a control character, or bytes
# that are not UTF-8). The search costs ~1 µs per 20 KB; the walk runs only when it finds one.
_ESCAPED_NUL_OR_SURROGATE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def _shown(name: str) -> str:
    """A key (or resourceType) in an error's path, escaped where it is no text: echoed as it is,
    the answer could not be sent."""
    return name.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\u0000")


def _not_text(value: Any) -> tuple[str, str] | None:
    """(where, what) of the first key or string with a NUL or a lone surrogate, else None."""
    root = value.get("resourceType") if isinstance(value, dict) else None
    pending: list[tuple[str, Any]] = [(_shown(root) if isinstance(root, str) else "$", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if not is_text(item):
                return path, ("a NUL character (\\u0000)" if "\x00" in item
                              else "a lone surrogate (\\ud800-\\udfff without its pair)")
        elif isinstance(item, dict):
            for key, member in item.items():
                at = f"{path}.{_shown(key)}"
                pending += ((at, key), (at, member))
        elif isinstance(item, list):
            pending += ((f"{path}[{n}]", member) for n, member in enumerate(item))
    return None


def build_router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["fhir"])
    load_models()
    settings: IngestSettings = runtime.service_settings()  # type: ignore[assignment]
    max_depth = runtime.settings.max_json_depth

    fhir_bases = FhirBases(settings.fhir_base_url)
    base, local_bases = fhir_bases.base, fhir_bases.local

    def wake_relay() -> None:
        if runtime.relay is not None:
            runtime.relay.notify()

    group = GroupedWrites(runtime.db.unit_of_work, committed=wake_relay)

    async def grouped(request: Request, tenant: Tenant, write: Write) -> Response:
        """A plain create or update: stored with the concurrent others (``GroupedWrites``)."""
        tenant.require_scope("fhir:write")
        write.correlation_id = current_correlation_id()
        caller = await caller_for(runtime, tenant, local_bases=local_bases(request))
        handlers.check_last_updated(write.resource, caller)
        outcome = await group.store(caller, write)
        request.state.resource_patient = written_patient(outcome)
        return write_response(request, outcome, base(request),
                              may_read="fhir:read" in tenant.scopes)

    async def write(request: Request, tenant: Tenant, action,  # noqa: ANN001
                    *, conditional: bool = False) -> Response:
        tenant.require_scope("fhir:write")
        async with runtime.db.unit_of_work() as uow:
            caller = await handlers.current_caller(uow, await caller_for(
                runtime, tenant, uow, local_bases=local_bases(request)))
            outcome: Outcome = await action(uow, caller)
            await uow.commit()
        wake_relay()
        if conditional and outcome.id:
            # The audit trail names the resource a conditional write (``Type?criteria``)
            # updated, created or deleted, as it names the one of a ``Type/id`` URL.
            request.state.audited_entity = f"{outcome.resource_type}/{outcome.id}"
        # The patient whose record it wrote is in the call's entry of the audit trail.
        request.state.resource_patient = written_patient(outcome)
        return write_response(request, outcome, base(request),
                              may_read="fhir:read" in tenant.scopes)

    def criteria_of(request: Request, rtype: str) -> str:
        """The criteria of ``PUT``/``DELETE /fhir/{rtype}?criteria`` (its query, as sent),
        refused before anything is read (400: none, or what the search refuses)."""
        criteria = request.url.query
        if not criteria.strip():
            raise rejected(400, "required", f"{request.method} /fhir/{rtype} needs search "
                           f"criteria ({request.method} /fhir/{rtype}?identifier=system|value: "
                           "a conditional " + ("update" if request.method == "PUT" else "delete")
                           + f") or an id ({request.method} /fhir/{rtype}/{{id}})", f"{rtype}?")
        with handlers.placed(f"{rtype}?{criteria}"):
            handlers.check_criteria(rtype, criteria)
        return criteria

    @router.get("/metadata", summary="CapabilityStatement: what this endpoint supports")
    async def metadata(request: Request) -> Response:
        return fhir_json(capability_statement(base(request), runtime.clock()))

    @router.post("", summary="Process a transaction or batch Bundle",
                 responses=_INVALID_RESOURCE)
    async def process_bundle(request: Request, tenant: TenantDep) -> Response:
        _require_fhir(tenant)
        bundle = await read_json(request, max_depth)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise rejected(400, "invalid", "POST /fhir takes a Bundle", "resourceType")
        # GET entries need fhir:read, every other entry fhir:write: a transaction's all of
        # them (it is one), a batch's each its own (an entry the token may not do is refused
        # alone, with 403, as any other entry's problem is).
        kind = processable(bundle)
        if kind == "transaction":
            sent = bundle.get("entry") if isinstance(bundle.get("entry"), list) else []
            methods = {e["request"].get("method") if isinstance(e, dict)
                       and isinstance(e.get("request"), dict)
                       and isinstance(e["request"].get("method"), str) else None
                       for e in sent}
            if "GET" in methods:
                tenant.require_scope("fhir:read")
            if methods - {"GET"} or not methods:
                tenant.require_scope("fhir:write")
        entries = bundles.parse_entries(bundle, settings.max_bundle_entries,
                                        each_alone=kind == "batch")
        if kind == "batch":
            for e in entries:
                needed = "fhir:read" if e.method == "GET" else "fhir:write"
                if e.refused is None and needed not in tenant.scopes:
                    e.refused = rejected(403, "forbidden", f"this token lacks the {needed!r} "
                                         f"scope a {e.method} entry needs",
                                         f"Bundle.entry[{e.index}].request.method")
        if kind == "transaction":
            # A deadlock with a concurrent transaction (entries that lock rows or patients'
            # counters one at a time, in the Bundle's order) rolls it back whole: it is run
            # again from the body (a run rewrites the parsed entries); after the last run the
            # client is told to (503).
            async for attempt in giving_way(TRANSACTION_ATTEMPTS, what="transaction",
                                            practice=tenant.practice_id):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        entries = bundles.parse_entries(await read_json(request, max_depth),
                                                        settings.max_bundle_entries)
                    async with runtime.db.unit_of_work() as uow:
                        caller = await caller_for(runtime, tenant, uow,
                                                  local_bases=local_bases(request))
                        results = await bundles.transaction(uow, caller, entries)
                        await uow.commit()
        else:
            async with runtime.db.unit_of_work() as uow:
                caller = await caller_for(runtime, tenant, uow,
                                          local_bases=local_bases(request))
            results = await bundles.batch(runtime.db.unit_of_work, caller, entries,
                                          lambda u: u.commit())
        wake_relay()
        # The patients whose records its entries read or wrote are in their audit trails, as
        # a REST call's patient is: (patient, method, the entry's own status) of each entry
        # that ran (not refused) — a GET entry's patient as its URL names it, a write's the
        # one its resource is about (a write refused, 4xx, names none, as over REST).
        request.state.audited_patients = [
            (patient, e.method, outcome.status) for e, outcome in results
            if e.refused is None and (patient := entry_patient(e, outcome)) is not None]
        # Entries carry no resources unless asked for (a 1,000-entry Bundle's answer stays small).
        return fhir_json(response_bundle(f"{kind}-response", results, base(request),
                                         returned(request, "fhir:read" in tenant.scopes,
                                                  "minimal")))

    @router.post("/{rtype}/$validate", summary="Validate a resource (or Bundle) without storing")
    async def validate(rtype: str, request: Request, tenant: TenantDep,
                       mode: Annotated[str | None, Query(description=(
                           "create or update (the default): also what storing it would "
                           "refuse without reading stored data (a transaction's urn: "
                           "references, the CCM mapping's rules, meta.lastUpdated ahead of "
                           "the clock); profile: the resource's own content only"))] = None,
                       ) -> Response:
        return await validated(rtype, None, request, tenant, mode)

    @router.post("/{rtype}/{rid}/$validate", summary="Validate a resource as an update of this "
                 "id, without storing (mode update by default)")
    async def validate_instance(rtype: str, rid: str, request: Request, tenant: TenantDep,
                                mode: Annotated[str | None, Query(description=(
                                    "update (the default), create or profile, as for "
                                    "POST /{rtype}/$validate"))] = None) -> Response:
        return await validated(rtype, rid, request, tenant, mode)

    async def validated(rtype: str, rid: str | None, request: Request, tenant: Tenant,
                        mode: str | None) -> Response:
        """$validate of the body as ``rtype`` (at an instance's URL, ``rid``: an update of it
        unless a mode says otherwise, and the body's id must be ``rid``)."""
        # It stores nothing, but answers what the write would (the CCM mapping's rules).
        _require_fhir(tenant)
        _check_mode(mode, "mode")
        profiles = request.query_params.getlist("profile")
        if len(profiles) > 1:
            raise rejected(400, "structure", "profile is given more than once", "profile")
        body, mode = validate_input(await read_json(request, max_depth), rtype, mode,
                                    profiles[0] if profiles else None)
        if rid is not None:
            if rtype == "Bundle":
                raise rejected(404, "not-supported", "a Bundle is validated at "
                               "/fhir/Bundle/$validate, not at an id")
            mode = mode or "update"
            if isinstance(body, dict) and body.get("id") not in (None, rid):
                raise rejected(400, "invalid", f"the resource's id ({body.get('id')!r}) is not "
                               f"the id of the URL ({rid!r})", f"{rtype}.id")
        as_stored = mode != "profile"  # also what storing it would refuse
        if rtype == "Bundle":
            if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
                raise rejected(400, "invalid", "resourceType does not match the URL (Bundle)",
                               "resourceType")
            kind = processable(body) if as_stored else None
            entries = bundles.parse_entries(body, settings.max_bundle_entries)
            count = len(entries)
        else:
            _check_type(rtype)
            resource = standalone(body, rtype)  # what a create or update of it would check
            if mode == "update" and resource.get("id") is None:
                raise rejected(400, "required", "an update needs the resource's id in its body",
                               f"{rtype}.id")
            count = 1
        warnings: list[Issue] = []
        if as_stored:
            caller = await caller_for(runtime, tenant, local_bases=local_bases(request))
            warnings = (bundles.check_bundle(caller, kind, entries) if rtype == "Bundle"
                        else handlers.check_as_create(caller, rtype, resource))
        return outcome_response(200, [Issue("information", "informational",
                                            f"valid: {count} resource(s) checked"), *warnings])

    @router.post("/{rtype}/_search", summary="Search with the parameters in a form body "
                 "(application/x-www-form-urlencoded) and the URL, as GET /{rtype} does")
    async def search_by_post(rtype: str, request: Request, tenant: TenantDep) -> Response:
        tenant.require_scope("fhir:read")
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        raw = await request.body()
        if media != "application/x-www-form-urlencoded" and (raw or media):
            raise rejected(415, "not-supported", "a search by POST sends its parameters as "
                           "application/x-www-form-urlencoded (name=value&…), not "
                           f"{media or 'a body without a Content-Type'}", "Content-Type")
        try:
            form = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise rejected(400, "structure", "the form body is not UTF-8 (its percent-escapes "
                           "included)") from None
        # FHIR: the parameters of the URL and of the body are one search; the audit trail
        # reads the patient a search names from both (``audited_patient``).
        request.state.search_params = form
        return await searched(rtype, request, tenant,
                              [*request.query_params.multi_items(), *form])

    @router.post("/{rtype}", summary="Create (If-None-Exist: conditional create)",
                 responses={201: {"description": "Created"}, **_INVALID_RESOURCE})
    async def create(rtype: str, request: Request, tenant: TenantDep) -> Response:
        _check_type(rtype, type_level=True)
        if criteria := [k for k in request.query_params if k not in handlers.IGNORED]:
            # They were dropped: each push of it created one more resource.
            raise rejected(400, "invalid", f"POST {rtype} takes no search parameters "
                           f"({', '.join(criteria)}); a conditional create sends its criteria "
                           "in the If-None-Exist header", criteria[0])
        resource = standalone(await read_json(request, max_depth), rtype)
        if_none_exist = request.headers.get("if-none-exist")
        if if_none_exist is None:
            return await grouped(request, tenant, Write(rtype, random_uuid(), resource,
                                                        fresh=True))
        if not if_none_exist.strip():
            # Sent, but with no criteria: taken as a plain create it would make the very
            # duplicate the client asked to avoid.
            raise rejected(400, "required", "If-None-Exist is empty: give the criteria "
                           "(identifier=system|value), or leave the header out for a plain "
                           "create", "If-None-Exist")
        return await write(request, tenant, lambda uow, caller: handlers.create(
            uow, caller, resource, if_none_exist=if_none_exist))

    @router.put("/{rtype}/{rid}", summary="Update or create with this id (If-Match: version)",
                responses={201: {"description": "Created"}, **_INVALID_RESOURCE})
    async def update(rtype: str, rid: str, request: Request, tenant: TenantDep) -> Response:
        _check_type(rtype)
        resource = standalone(await read_json(request, max_depth), rtype)
        if_match = request.headers.get("if-match")
        if if_match is None:
            handlers.check_update_id(rtype, rid, resource)
            return await grouped(request, tenant, Write(rtype, rid, resource))
        return await write(request, tenant, lambda uow, caller: handlers.update(
            uow, caller, rtype, rid, resource, if_match=if_match))

    @router.delete("/{rtype}/{rid}", summary="Delete (a deletion version; reads then answer 410; "
                   "If-Match: version)",
                   responses={204: {"description": "Deleted (a deletion version is stored), or "
                                                   "already deleted"},
                              412: {"description": "If-Match names no current version: an "
                                                   "OperationOutcome",
                                    "content": {"application/json": {}}}})
    async def delete(rtype: str, rid: str, request: Request, tenant: TenantDep) -> Response:
        _check_type(rtype)
        return await write(request, tenant,
                           lambda uow, caller: handlers.remove(
                               uow, caller, rtype, rid, if_match=request.headers.get("if-match")))

    @router.put("/{rtype}", summary="Conditional update (PUT Type?criteria): the one match is "
                "updated, none is created (under the body's id, else a new one); several: 412",
                responses={201: {"description": "Created"}, **_SEVERAL_MATCH,
                           **_INVALID_RESOURCE})
    async def conditional_update(rtype: str, request: Request, tenant: TenantDep) -> Response:
        _check_type(rtype, type_level=True)
        criteria = criteria_of(request, rtype)
        resource = standalone(await read_json(request, max_depth), rtype)
        return await write(request, tenant, lambda uow, caller: handlers.conditional_update(
            uow, caller, rtype, criteria, resource, criteria_at=f"{rtype}?{criteria}",
            if_match=request.headers.get("if-match")), conditional=True)

    @router.delete("/{rtype}", summary="Conditional delete (DELETE Type?criteria) of a single "
                   "match; none: 200 with an OperationOutcome; several: 412 (If-Match: version)",
                   responses={200: {"description": "Nothing matches the criteria: an "
                                                   "OperationOutcome saying so, nothing deleted"},
                              204: {"description": "The one match was deleted (or nothing "
                                                   "matched, with Prefer: return=minimal)"},
                              **_SEVERAL_MATCH})
    async def conditional_delete(rtype: str, request: Request, tenant: TenantDep) -> Response:
        _check_type(rtype, type_level=True)
        criteria = criteria_of(request, rtype)
        return await write(request, tenant, lambda uow, caller: handlers.conditional_remove(
            uow, caller, rtype, criteria, criteria_at=f"{rtype}?{criteria}",
            if_match=request.headers.get("if-match")), conditional=True)

    @router.get("/{rtype}/{rid}", summary="Read the current version (If-None-Match, "
                "If-Modified-Since: 304 when the client's copy is current)",
                responses=_NOT_MODIFIED)
    async def read(rtype: str, rid: str, request: Request, tenant: TenantDep) -> Response:
        tenant.require_scope("fhir:read")
        _check_type(rtype)
        if rid.startswith(("_", "$")):  # no id starts so: an interaction not served here
            raise rejected(400, "not-supported", f"GET {rtype}/{rid} is not supported here "
                           "(only a resource's own _history; no type-level history or "
                           f"operations; a search is GET {rtype}?… or POST {rtype}/_search)",
                           f"{rtype}/{rid}")
        conditions = read_conditions(request)
        async with runtime.db.unit_of_work() as uow:
            repo = SqlResourceRepository(uow.session, tenant.practice_id)
            version = handlers.current_or_error(await repo.current_version(rtype, rid), rtype,
                                                rid)
        return read_response(handlers.read_outcome(rtype, rid, version, conditions),
                             base(request))

    @router.get("/{rtype}/{rid}/_history",
                summary="Stored versions, newest first (_since, _count, _offset)")
    async def history(rtype: str, rid: str, request: Request, tenant: TenantDep) -> Response:
        tenant.require_scope("fhir:read")
        _check_type(rtype)
        params = list(request.query_params.multi_items())
        if lenient(request):
            params = handlers.known_params(params, handlers.HISTORY_PARAMS)
        async with runtime.db.unit_of_work() as uow:
            total, versions, before_deleted = await handlers.history_or_error(
                SqlResourceRepository(uow.session, tenant.practice_id), rtype, rid, params)
        return fhir_json(history_bundle(base(request), rtype, rid, params, total, versions,
                                        before_deleted))

    @router.get("/{rtype}/{rid}/_history/{vid}", summary="One stored version (If-None-Match, "
                "If-Modified-Since: 304 when the client's copy is current)",
                responses=_NOT_MODIFIED)
    async def vread(rtype: str, rid: str, vid: str, request: Request,
                    tenant: TenantDep) -> Response:
        tenant.require_scope("fhir:read")
        _check_type(rtype)
        conditions = read_conditions(request)
        async with runtime.db.unit_of_work() as uow:
            version = await handlers.version_or_error(
                SqlResourceRepository(uow.session, tenant.practice_id), rtype, rid, vid, "vid")
        return read_response(handlers.read_outcome(rtype, rid, version, conditions),
                             base(request))

    @router.get("/{rtype}", summary="Search: _id, identifier, patient, _lastUpdated, _count")
    async def search(rtype: str, request: Request, tenant: TenantDep) -> Response:
        return await searched(rtype, request, tenant, list(request.query_params.multi_items()))

    async def searched(rtype: str, request: Request, tenant: Tenant,
                       params: list[tuple[str, str]]) -> Response:
        """A search's searchset Bundle; its links are GET URLs of the parameters used."""
        tenant.require_scope("fhir:read")
        _check_type(rtype)
        if lenient(request):
            params = handlers.known_params(params, handlers.search_params(rtype))
        async with runtime.db.unit_of_work() as uow:
            total, rows = await handlers.search(
                SqlResourceRepository(uow.session, tenant.practice_id), rtype, params,
                local_bases=local_bases(request))
        b = base(request)
        return fhir_json(searchset(b, rtype, total, rows, page_links(b, rtype, params, total)))

    return router


def entry_patient(entry: bundles.Entry, outcome: Outcome) -> str | None:
    """The patient whose record a Bundle entry that ran read (as its URL names one, as a REST
    read's does) or wrote (``written_patient``)."""
    if entry.method == "GET":
        return named_patient((entry.rtype, entry.rid), parse_qs(entry.query))
    return written_patient(outcome)


def written_patient(outcome: Outcome) -> str | None:
    """The patient whose record a write (that did not fail) wrote, for the audit trail: a
    Patient's own id, else the patient its resource is about as stored (a deletion: the
    deleted version's); None for a failed write, or a resource about no patient."""
    if outcome.status >= 400:
        return None
    if outcome.resource_type == "Patient":
        return outcome.id or None
    return outcome.patient


def read_conditions(request: Request) -> handlers.ReadConditions | None:
    """A read's preconditions (If-None-Match, If-Modified-Since), None without any."""
    headers = request.headers
    return handlers.header_read_conditions(headers.getlist("if-none-match"),
                                           headers.getlist("if-modified-since"))


def searchset(base: str, rtype: str, total: int, rows: list[VersionRow],
              links: list[dict[str, str]] | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total}
    if links:
        bundle["link"] = links
    if rows:  # FHIR JSON has no empty arrays (ele-1): no matches (or _count=0), no entry
        bundle["entry"] = [{"fullUrl": f"{base}/{rtype}/{r.id}", "resource": r.resource,
                            "search": {"mode": "match"}} for r in rows]
    return bundle


def history_bundle(base: str, rtype: str, rid: str, params: list[tuple[str, str]], total: int,
                   versions: list[VersionRow], before_deleted: bool | None) -> dict[str, Any]:
    """A resource's ``history`` Bundle: a page of its ``versions`` newest first (of ``total``
    at or after ``_since``), each with the request and the status it came with."""
    # A version created its resource when the applied version before it (before the
    # page: ``before_deleted``) is absent or a deletion; one kept but not applied changed
    # nothing. Newest first, so walked from the end.
    gone = True if before_deleted is None else before_deleted
    created = []
    for v in reversed(versions):
        created.append(v.applied and not v.deleted and gone)
        if v.applied:
            gone = v.deleted
    created.reverse()
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": total}
    if links := page_links(base, f"{rtype}/{rid}/_history", params, total):
        bundle["link"] = links
    entries = [{
        "fullUrl": f"{base}/{rtype}/{rid}",
        **({"resource": v.resource} if v.resource is not None else {}),
        "request": {"method": v.method or ("DELETE" if v.deleted else "PUT"),
                    "url": rtype if v.method == "POST" else f"{rtype}/{rid}"},
        "response": {"status": "204" if v.deleted else "201" if new else "200",
                     "etag": f'W/"{v.version_id}"',
                     "lastModified": v.last_updated.isoformat(),
                     **({} if v.applied else {"outcome": operation_outcome([Issue(
                         "warning", "conflict", "older than the current state when "
                         "received: kept in history, not applied")])})},
    } for v, new in zip(versions, created, strict=True)]
    if entries:  # FHIR JSON has no empty arrays (ele-1): no versions, no entry
        bundle["entry"] = entries
    return bundle


def page_links(base: str, path: str, params: list[tuple[str, str]],
               total: int) -> list[dict[str, str]]:
    """self, and first/previous/next where there are such pages (``_offset``/``_count``), of a
    search (``path``: the type) or a history (``Type/id/_history``), on the public base
    (``CCM_INGEST_FHIR_BASE_URL``, else the request's)."""
    offset, count = handlers.paging(params)
    criteria = [(k, v) for k, v in params if k not in handlers.PAGING]

    def page(start: int, length: int) -> str:
        return f"{base}/{path}?" + urlencode([*criteria, ("_offset", start), ("_count", length)])

    return [{"relation": "self", "url": f"{base}/{path}" + (f"?{urlencode(params)}"
                                                           if params else "")},
            *paging_links(page, offset=offset, count=count, total=total,
                          max_offset=handlers.MAX_OFFSET)]


def response_bundle(kind: str, results: list[tuple[bundles.Entry, Outcome]],
                    base: str, wanted: str = "minimal") -> dict[str, Any]:
    """The response Bundle. ``wanted`` is the request's ``Prefer: return=``: with
    ``representation`` each written entry carries its resource, with ``OperationOutcome`` each
    entry's response an outcome; otherwise only writes with something to say carry one."""
    entries = []
    for entry, outcome in results:
        response: dict[str, Any] = {"status": _status_line(outcome.status)}
        if outcome.version is not None:
            response["location"] = f"{outcome.location}"
            response["etag"] = f'W/"{outcome.version.version_id}"'
            response["lastModified"] = isoformat(outcome.version.last_updated)
        if outcome.issues or wanted == "OperationOutcome":
            response["outcome"] = operation_outcome(outcome.issues or [Issue(
                "information", "informational", f"{entry.method}: {_status_line(outcome.status)}")])
        item: dict[str, Any] = {"response": response}
        if outcome.id and outcome.version is not None:
            item["fullUrl"] = f"{base}/{outcome.resource_type}/{outcome.id}"
            # A read answers with what it read (unless the client's copy is current: 304);
            # a write when the client prefers it.
            if outcome.status != 304 and (entry.method == "GET" or (
                    wanted == "representation" and outcome.version.resource is not None)):
                item["resource"] = outcome.version.resource
        if outcome.found is not None:  # a search, with a searchset Bundle
            total, rows, params = outcome.found
            item["resource"] = searchset(base, outcome.resource_type, total, rows,
                                         page_links(base, outcome.resource_type, params, total))
        if outcome.history is not None:  # a resource's history, with a history Bundle
            total, versions, before_deleted, params = outcome.history
            item["resource"] = history_bundle(base, outcome.resource_type, outcome.id, params,
                                              total, versions, before_deleted)
        entries.append(item)
    # A Bundle of no entries is answered with none (FHIR JSON has no empty arrays: ele-1).
    return {"resourceType": "Bundle", "type": kind, **({"entry": entries} if entries else {})}


_REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified",
            400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 409: "Conflict", 410: "Gone", 412: "Precondition Failed",
            422: "Unprocessable Entity", 503: "Service Unavailable"}


def _status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, '')}".strip()


def capability_statement(base: str, now: datetime) -> dict[str, Any]:
    """What this server really does (nothing more): R4, JSON, these types and interactions."""
    search = [
        {"name": "_id", "type": "token"},
        {"name": "identifier", "type": "token"},
        {"name": "_lastUpdated", "type": "date"},
    ]
    patient_search = [{"name": "patient", "type": "reference"},
                      {"name": "subject", "type": "reference"}]
    # R4 defines `subject` for Encounter, CarePlan and Condition, not for Consent.
    patient_params = {t: patient_search[:1] if t == "Consent" else patient_search
                      for t in handlers.PATIENT_ELEMENT}
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now.date().isoformat(),
        "kind": "instance",
        "software": {"name": "ccm-platform ingest", "version": "0.1.0"},
        "implementation": {"description": "CCM ingest FHIR R4 push endpoint", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {"description": "Bearer token per practice (Authorization: Bearer …)"},
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "resource": [{
                "type": t,
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                # PUT/DELETE Type?criteria, on the REST URL and in Bundles alike.
                "conditionalUpdate": True,
                "conditionalDelete": "single",
                # If-None-Match and If-Modified-Since (a Bundle's ifNoneMatch, ifModifiedSince)
                "conditionalRead": "full-support",
                "documentation": "Conditional update (PUT Type?criteria) and delete (DELETE "
                                 "Type?criteria, a single match: several are a 412) on the "
                                 "REST URL and in transaction and batch Bundles. Read and "
                                 "vread answer 304 Not Modified to If-None-Match or "
                                 "If-Modified-Since. Search by GET or by POST Type/_search (a "
                                 "form body); Prefer: handling=lenient ignores unsupported "
                                 "search parameters.",
                "interaction": [{"code": c} for c in ("read", "vread", "update", "delete",
                                                      "history-instance", "create",
                                                      "search-type")],
                "searchParam": search + patient_params.get(t, []),
            } for t in SUPPORTED_TYPES],
            "operation": [{"name": "validate",
                           "definition": "http://hl7.org/fhir/OperationDefinition/"
                                         "Resource-validate",
                           "documentation": "The resource as the body, or a Parameters "
                                            "resource (resource, mode, profile). mode create "
                                            "(default) or update: also the rules storing "
                                            "applies without reading stored data (CCM "
                                            "mapping, meta.lastUpdated, a transaction's "
                                            "references); profile: the content only; delete: "
                                            "not supported. At Type/id/$validate: an update "
                                            "of that id by default. profile: only the type's "
                                            "base R4 StructureDefinition"}],
        }],
    }


