"""Handlers of the FHIR write and read interactions. They never commit: the caller's unit of
work does, so a stored version and its events are one transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

from ccm_ingest.adapters.fhir_validation import validate_resource
from ccm_ingest.adapters.repository import CurrentRow, SqlResourceRepository, VersionRow
from ccm_ingest.domain.config import IngestConfig
from ccm_ingest.domain.mapping import MappingContext, instant, map_version, reference
from ccm_ingest.domain.model import (
    RESOURCE_ID,
    Issue,
    SourceVersion,
    content_hash,
    rejected,
)
from ccm_shared.db import UnitOfWork
from ccm_shared.events import CloudEvent

PATIENT_ELEMENT = {"Encounter": "subject", "CarePlan": "subject", "Condition": "subject",
                   "Consent": "patient"}
DELETED_HASH = "0" * 64


@dataclass(frozen=True)
class Caller:
    """Who writes: the practice, the EHR connection (token), the practice's settings, the time."""

    tenant: str
    token_id: str
    connection: str | None
    timezone: ZoneInfo
    config: IngestConfig
    now: datetime


@dataclass
class Outcome:
    """The result of one interaction, enough for the HTTP response or a Bundle entry."""

    status: int
    resource_type: str
    id: str
    version: VersionRow | None = None  # what the response represents (None: deleted/absent)
    issues: list[Issue] = field(default_factory=list)
    outcome_body: bool = False  # the response body should be the OperationOutcome

    @property
    def location(self) -> str | None:
        if self.version is None:
            return None
        return f"{self.resource_type}/{self.id}/_history/{self.version.version_id}"


def parse_etag(value: str) -> str:
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _meta_last_updated(resource: dict[str, Any], caller: Caller) -> datetime:
    meta = resource.get("meta") or {}
    text = meta.get("lastUpdated") if isinstance(meta, dict) else None
    return (instant(text, caller.timezone) if text else caller.now).astimezone(UTC)


def _identifiers(resource: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            found.append((ident.get("system") or "", str(ident["value"])[:500]))
    return found


async def _roles(repo: SqlResourceRepository, resource: dict[str, Any]) -> dict[str, dict]:
    if resource.get("resourceType") != "Encounter":
        return {}
    ids = []
    for p in resource.get("participant") or []:
        ref = reference(p.get("individual") if isinstance(p, dict) else None,
                        ("PractitionerRole",))
        if ref:
            ids.append(ref.removeprefix("PractitionerRole/"))
    return await repo.current_resources("PractitionerRole", ids)


async def _emit(uow: UnitOfWork, caller: Caller, events) -> None:  # noqa: ANN001
    for e in events:
        await uow.outbox.add(e.type, CloudEvent(
            source=f"/ccm/ingest/connection/{caller.token_id}", type=e.type,
            tenant=caller.tenant, subject=e.subject, time=caller.now, data=e.data,
        ))


async def store(uow: UnitOfWork, caller: Caller, rtype: str, rid: str,
                resource: dict[str, Any]) -> Outcome:
    """Store ``resource`` as the next version of ``rtype/rid`` (created if new) and map it.

    Same content as the current version: nothing stored. Older ``meta.lastUpdated`` than the
    current state: stored in history, state and events unchanged, a warning says so.
    """
    repo = SqlResourceRepository(uow.session, caller.tenant)
    await repo.claim_new(rtype, rid, caller.now)
    current = await repo.lock_current(rtype, rid)
    assert current is not None
    exists = current.version_id > 0 and not current.deleted
    sha = content_hash(resource)
    if exists and sha == current.sha256:
        stored = await repo.version(rtype, rid, current.version_id)
        return Outcome(200, rtype, rid, stored, [Issue(
            "information", "informational",
            "same content as the current version: no new version was stored")])
    last_updated = _meta_last_updated(resource, caller)
    version_id = current.last_version + 1
    body = {**resource, "id": rid,
            "meta": {**(resource.get("meta") or {}), "versionId": str(version_id),
                     "lastUpdated": last_updated.isoformat()}}
    stale = exists and last_updated < current.last_updated
    await repo.add_version(rtype, rid, version_id, body, sha256=sha, last_updated=last_updated,
                           received_at=caller.now, connection=caller.connection,
                           applied=not stale)
    version = VersionRow(rtype, rid, version_id, body, sha, last_updated, caller.now, False,
                         not stale)
    if stale:
        await repo.set_current(rtype, rid, last_version=version_id)
        state = await repo.version(rtype, rid, current.version_id)
        return Outcome(200, rtype, rid, state, outcome_body=True, issues=[Issue(
            "warning", "conflict",
            f"meta.lastUpdated {last_updated.isoformat()} is older than the current version "
            f"{current.version_id} ({current.last_updated.isoformat()}): kept in history as "
            f"version {version_id}, the current state is unchanged and no event was emitted",
            ("meta.lastUpdated",))])
    source = SourceVersion(rtype, rid, version_id, last_updated, sha, caller.now,
                           caller.connection)
    mapping = map_version(body, MappingContext(
        source=source, config=caller.config, timezone=caller.timezone,
        state=current.ccm_state if current.version_id else {},
        roles=await _roles(repo, body)))
    patient_element = PATIENT_ELEMENT.get(rtype)
    patient = reference(body.get(patient_element), ("Patient",)) if patient_element else None
    await repo.set_current(rtype, rid, version_id=version_id, last_version=version_id,
                           last_updated=last_updated, sha256=sha, deleted=False,
                           patient=patient.removeprefix("Patient/") if patient else None,
                           ccm_state=mapping.state)
    if current.version_id or _identifiers(body):  # a brand-new resource has none to replace
        await repo.replace_identifiers(rtype, rid, _identifiers(body))
    await _emit(uow, caller, mapping.events)
    issues = [Issue("warning", "business-rule", w) for w in mapping.warnings]
    return Outcome(200 if exists else 201, rtype, rid, version, issues)


async def create(uow: UnitOfWork, caller: Caller, resource: dict[str, Any], *,
                 if_none_exist: str | None = None, new_id: str | None = None) -> Outcome:
    """FHIR create: a server-assigned id; with ``If-None-Exist`` at most one resource ever."""
    rtype = resource["resourceType"]
    rid = new_id or str(uuid.uuid4())
    if if_none_exist:
        repo = SqlResourceRepository(uow.session, caller.tenant)
        criteria = normalise_criteria(rtype, if_none_exist)
        matches = await find(repo, rtype, criteria)
        if len(matches) > 1:
            raise rejected(412, "multiple-matches", f"If-None-Exist {if_none_exist!r} matches "
                           f"{len(matches)} resources", "If-None-Exist")
        if matches:
            return Outcome(200, rtype, matches[0].id, matches[0])
        owner = await repo.claim_criteria(rtype, criteria_key(criteria), rid)
        if owner != rid:
            found = await repo.current_version(rtype, owner)
            if found is not None and not found[0].deleted:
                return Outcome(200, rtype, owner, found[1])
            await repo.reassign_criteria(rtype, criteria_key(criteria), rid)
    return await store(uow, caller, rtype, rid, resource)


async def update(uow: UnitOfWork, caller: Caller, rtype: str, rid: str,
                 resource: dict[str, Any], *, if_match: str | None = None) -> Outcome:
    """FHIR update (or create with the client's id); ``If-Match`` guards the version."""
    if resource.get("id") != rid:
        raise rejected(400, "invalid", f"resource id {resource.get('id')!r} does not match the "
                       f"URL id {rid!r}", f"{rtype}.id")
    if if_match is not None:
        repo = SqlResourceRepository(uow.session, caller.tenant)
        current = await repo.lock_current(rtype, rid)
        have = str(current.version_id) if current and current.version_id else None
        if have is None or current.deleted or parse_etag(if_match) != have:
            raise rejected(412, "conflict", f"If-Match {if_match} does not match the current "
                           f"version ({'none' if have is None else have})", "If-Match")
    return await store(uow, caller, rtype, rid, resource)


async def remove(uow: UnitOfWork, caller: Caller, rtype: str, rid: str) -> Outcome:
    """FHIR delete: a deletion version; the resource then answers 410. Idempotent."""
    repo = SqlResourceRepository(uow.session, caller.tenant)
    current = await repo.lock_current(rtype, rid)
    if current is None or current.version_id == 0 or current.deleted:
        return Outcome(204, rtype, rid)
    last = await repo.version(rtype, rid, current.version_id)
    version_id = current.last_version + 1
    await repo.add_version(rtype, rid, version_id, None, sha256=DELETED_HASH,
                           last_updated=caller.now, received_at=caller.now,
                           connection=caller.connection, applied=True)
    source = SourceVersion(rtype, rid, version_id, caller.now, current.sha256, caller.now,
                           caller.connection)
    mapping = map_version(last.resource or {}, MappingContext(
        source=source, config=caller.config, timezone=caller.timezone, state=current.ccm_state,
        deleted=True))
    await repo.set_current(rtype, rid, version_id=version_id, last_version=version_id,
                           last_updated=caller.now, sha256=DELETED_HASH, deleted=True,
                           ccm_state=mapping.state)
    await repo.replace_identifiers(rtype, rid, [])
    await repo.release_criteria(rtype, rid)
    await _emit(uow, caller, mapping.events)
    return Outcome(204, rtype, rid)


# ---- search ------------------------------------------------------------------------------------

SEARCH_PARAMS = {"_id", "identifier", "patient", "subject", "_lastUpdated", "_count"}


def normalise_criteria(rtype: str, query: str) -> list[tuple[str, str]]:
    """Search parameters of a conditional (``identifier=…``, ``Patient?identifier=…``)."""
    if "?" in query:
        prefix, _, query = query.partition("?")
        if prefix and prefix != rtype:
            raise rejected(400, "invalid", f"criteria for {prefix} on a {rtype}", "If-None-Exist")
    params = sorted(parse_qsl(query, keep_blank_values=True))
    if not params:
        raise rejected(400, "invalid", "empty search criteria", "If-None-Exist")
    for name, _ in params:
        if name not in SEARCH_PARAMS - {"_count"}:
            raise rejected(400, "not-supported", f"search parameter {name!r} is not supported; "
                           f"supported: {', '.join(sorted(SEARCH_PARAMS))}", name)
    return params


def criteria_key(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v}" for k, v in params)[:1000]


async def find(repo: SqlResourceRepository, rtype: str, params: list[tuple[str, str]],
               limit: int = 50) -> list[VersionRow]:
    return (await search(repo, rtype, params, limit=limit))[1]


async def search(repo: SqlResourceRepository, rtype: str, params: list[tuple[str, str]], *,
                 limit: int = 50) -> tuple[int, list[VersionRow]]:
    ids = patient = identifier = None
    updated: list[tuple[str, datetime]] = []
    for name, value in params:
        if name == "_id":
            ids = value.split(",")
        elif name in ("patient", "subject"):
            if rtype not in PATIENT_ELEMENT:
                raise rejected(400, "not-supported", f"{rtype} has no {name} search parameter",
                               name)
            patient = value.rsplit("/", 1)[-1]
        elif name == "identifier":
            system, bar, code = value.partition("|")
            identifier = (system, code) if bar else (None, value)
        elif name == "_lastUpdated":
            op, when = (value[:2], value[2:]) if value[:2] in ("eq", "gt", "ge", "lt", "le") \
                else ("eq", value)
            try:
                updated.append((op, instant(when, ZoneInfo("UTC"))))
            except ValueError:
                raise rejected(400, "value", f"_lastUpdated {value!r} is not a FHIR dateTime "
                               "with an optional prefix (eq, gt, ge, lt, le)", "_lastUpdated") \
                    from None
        elif name == "_count":
            if not value.isdigit() or not 0 < int(value) <= 1000:
                raise rejected(400, "value", "_count must be 1..1000", "_count")
            limit = int(value)
        else:
            raise rejected(400, "not-supported", f"search parameter {name!r} is not supported; "
                           f"supported: {', '.join(sorted(SEARCH_PARAMS))}", name)
    return await repo.search(rtype, ids=ids, patient=patient, identifier=identifier,
                             updated=updated, limit=limit)


def validated(resource: Any, rtype: str | None = None) -> dict[str, Any]:
    """The body as a valid resource of ``rtype`` or FhirRejected (400/422)."""
    checked = validate_resource(resource, expected_type=rtype)
    rid = checked.get("id")
    if rid is not None and (not isinstance(rid, str) or not RESOURCE_ID.match(rid)):
        raise rejected(422, "value", "id must be 1-64 letters, digits, '-' or '.'",
                       f"{checked['resourceType']}.id")
    return checked


def current_or_error(found: tuple[CurrentRow, VersionRow] | None, rtype: str,
                     rid: str) -> VersionRow:
    """The current version, or 404 (never existed here) / 410 (deleted)."""
    if found is None:
        raise rejected(404, "not-found", f"{rtype}/{rid} is not known", f"{rtype}/{rid}")
    current, version = found
    if current.deleted:
        raise rejected(410, "deleted", f"{rtype}/{rid} was deleted (version "
                       f"{current.version_id})", f"{rtype}/{rid}")
    return version
