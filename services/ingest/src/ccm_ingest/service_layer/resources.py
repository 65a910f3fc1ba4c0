"""Handlers of the FHIR write and read interactions. They never commit: the caller's unit of
work does, so a stored version and its events are one transaction."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

from ccm_ingest.adapters.fhir_validation import validate_resource
from ccm_ingest.adapters.repository import CurrentRow, SqlResourceRepository, VersionRow
from ccm_ingest.domain.config import IngestConfig
from ccm_ingest.domain.mapping import (
    MappingContext,
    instant,
    local_path,
    map_version,
    reference,
)
from ccm_ingest.domain.model import (
    RESOURCE_ID,
    FhirRejected,
    Issue,
    MappedEvent,
    Mapping,
    Relocating,
    SourceVersion,
    content_hash,
    isoformat,
    rejected,
)
from ccm_ingest.service_layer.practice import effective_config
from ccm_shared import fhir_dates
from ccm_shared.db import UnitOfWork
from ccm_shared.events import EventDraft
from ccm_shared.ids import random_uuid
from ccm_shared.text import ascii_digits

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
    # How far ahead of ``now`` a meta.lastUpdated may be (CCM_INGEST_MAX_CLOCK_SKEW_SECONDS).
    clock_skew: timedelta = timedelta(minutes=5)
    # This server's /fhir bases: an absolute reference under one of them is local, any other
    # absolute reference is another server's resource (no CCM patient, no patient search).
    local_bases: tuple[str, ...] = ()
    # The revision of ``config`` (the practice's stored config's; 0: never changed).
    config_revision: int = 0


_HELD_CONFIG = "ccm_ingest.config"  # the unit of work's session.info key (current_caller)


async def current_caller(uow: UnitOfWork, caller: Caller) -> Caller:
    """``caller`` with its practice's config as it is in this unit of work, held so until it
    ends (``SqlResourceRepository.hold_config``: a change of the config waits for this write,
    and one under way makes it wait). A caller built from a cached config that a change has
    replaced since gets the stored one: every version is mapped with the config in force when
    it commits, and what a change maps again is all that was written before it. Taken before
    the write locks any row (a change locks rows after its hold); once per unit of work."""
    held = uow.session.info.get(_HELD_CONFIG)
    if held is None or held[0] != caller.tenant:
        repo = SqlResourceRepository(uow.session, caller.tenant)
        revision = await repo.hold_config()
        config = caller.config
        if revision != caller.config_revision:
            found = await repo.practice()
            config = caller.config if found is None else effective_config(caller.tenant,
                                                                          found[1])
        held = uow.session.info[_HELD_CONFIG] = (caller.tenant, revision, config)
    if held[1] == caller.config_revision and held[2] is caller.config:
        return caller
    return replace(caller, config=held[2], config_revision=held[1])


@dataclass
class Outcome:
    """The result of one interaction, enough for the HTTP response or a Bundle entry."""

    status: int
    resource_type: str
    id: str
    version: VersionRow | None = None  # what the response represents (None: deleted/absent)
    issues: list[Issue] = field(default_factory=list)
    outcome_body: bool = False  # the response body should be the OperationOutcome
    # A search's (total, page of current versions, its parameters), for a GET entry of a Bundle.
    found: tuple[int, list[VersionRow], list[tuple[str, str]]] | None = None
    # A resource's history (versions at or after _since, their page newest first, whether
    # the applied version before the page is a deletion, its parameters), for a GET entry.
    history: tuple[int, list[VersionRow], bool | None, list[tuple[str, str]]] | None = None
    # A write's: the Patient id the resource it wrote (or found, or deleted) is about, as
    # stored (a deletion: the deleted version's), None when about none (the audit trail).
    patient: str | None = None

    @property
    def location(self) -> str | None:
        if self.version is None:
            return None
        return f"{self.resource_type}/{self.id}/_history/{self.version.version_id}"


def parse_etag(value: str) -> str:
    """The version of an ``If-Match`` ETag (``W/"3"``, ``"3"`` or ``3``); 400 for anything
    else, which can match no version."""
    sent = value.strip()
    version = sent.removeprefix("W/").strip('"')
    if not ascii_digits(version):
        raise rejected(400, "value", f"If-Match {sent!r} is not a version ETag "
                       '(W/"<versionId>", as the ETag header gives it)', "If-Match")
    return version


# If-None-Match: ``*``, or entity tags (``W/"3"``, ``"3"``; a bare ``3`` as If-Match takes it),
# separated by commas (RFC 9110 §13.1.2).
_ENTITY_TAG = r'\s*(?:(?:W/)?"([^"]*)"|([0-9]+))\s*'
_ENTITY_TAGS = re.compile(rf"{_ENTITY_TAG}(?:,{_ENTITY_TAG})*")
# A FHIR instant (what a Bundle entry's request.ifModifiedSince is): to the second, with a zone.
_INSTANT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                      r"(Z|[+-][0-9]{2}:[0-9]{2})")


@dataclass(frozen=True)
class ReadConditions:
    """A conditional read's preconditions (FHIR http.html#cread, RFC 9110 §13.2.2): the
    versions ``If-None-Match`` names (``*``: any; None: not sent), else ``If-Modified-Since``.
    ``whole_seconds``: ``since`` is an HTTP date, compared with the version's time as its
    ``Last-Modified`` header gives it, to the second (a Bundle's ``lastModified`` is exact)."""

    etags: frozenset[str] | None = None
    since: datetime | None = None
    whole_seconds: bool = True

    def not_modified(self, version: VersionRow) -> bool:
        """Whether the client's copy is ``version`` (304): If-None-Match decides when sent,
        and If-Modified-Since is then not looked at."""
        if self.etags is not None:
            return "*" in self.etags or str(version.version_id) in self.etags
        if self.since is None:
            return False
        modified = version.last_updated.astimezone(UTC)
        if self.whole_seconds:
            modified = modified.replace(microsecond=0)
        return modified <= self.since


def if_none_match(value: Any, where: str = "If-None-Match") -> frozenset[str]:
    """The versions an ``If-None-Match`` names (weak comparison: ``W/"3"`` and ``"3"`` are
    version 3), or ``{"*"}``; 400 for what is no list of entity tags. A tag that is no version
    (``"abc"``) matches none."""
    sent = value.strip() if isinstance(value, str) else ""
    if sent == "*":
        return frozenset({"*"})
    if not sent or _ENTITY_TAGS.fullmatch(sent) is None:
        raise rejected(400, "value", f"If-None-Match {value!r} is not * or a list of ETags "
                       '(W/"<versionId>", as the ETag header gives it)', where)
    return frozenset(tag[1] if tag[1] is not None else tag[2]
                     for tag in re.finditer(_ENTITY_TAG, sent))


def http_date(value: str, where: str = "If-Modified-Since") -> datetime:
    """An HTTP date (RFC 9110 §5.6.7: ``Sun, 06 Nov 1994 08:49:37 GMT``, or the obsolete RFC 850
    and asctime forms, which are GMT) as an aware UTC time; 400 for anything else."""
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        raise rejected(400, "value", f"If-Modified-Since {value!r} is not an HTTP date "
                       "(e.g. Sun, 06 Nov 1994 08:49:37 GMT, as the Last-Modified header gives "
                       "it)", where) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def header_read_conditions(if_none_matches: list[str],
                           if_modified_since: list[str]) -> ReadConditions | None:
    """A REST read's preconditions from its headers (None: it has none). If-None-Match sent
    in several headers is one list (RFC 9110 §5.3); If-Modified-Since sent twice is a 400
    (which one counts would be a guess)."""
    if len(if_modified_since) > 1:
        raise rejected(400, "value", "If-Modified-Since is given more than once",
                       "If-Modified-Since")
    if not if_none_matches and not if_modified_since:
        return None
    return ReadConditions(
        if_none_match(",".join(if_none_matches)) if if_none_matches else None,
        http_date(if_modified_since[0]) if if_modified_since else None)


def entry_read_conditions(if_none_matches: Any, if_modified_since: Any,
                          where: str) -> ReadConditions | None:
    """A Bundle GET entry's preconditions (``request.ifNoneMatch``, ``request.ifModifiedSince``:
    a FHIR instant, compared exactly with the entry's ``lastModified``); 400 at ``where``'s
    element for what is none."""
    if if_none_matches is None and if_modified_since is None:
        return None
    since = None
    if if_modified_since is not None:
        if not isinstance(if_modified_since, str) or not _INSTANT.fullmatch(if_modified_since):
            raise rejected(400, "value", f"ifModifiedSince {if_modified_since!r} is not a FHIR "
                           "instant (YYYY-MM-DDThh:mm:ss[.fff]Z or ±hh:mm, as an entry's "
                           "response.lastModified gives it)", f"{where}.request.ifModifiedSince")
        try:
            since = datetime.fromisoformat(if_modified_since).astimezone(UTC)
        except (ValueError, OverflowError):
            raise rejected(400, "value", f"ifModifiedSince {if_modified_since!r} is no instant "
                           "there is", f"{where}.request.ifModifiedSince") from None
    etags = None
    if if_none_matches is not None:
        etags = if_none_match(if_none_matches, f"{where}.request.ifNoneMatch")
    return ReadConditions(etags, since, whole_seconds=False)


def read_outcome(rtype: str, rid: str, version: VersionRow,
                 conditions: ReadConditions | None) -> Outcome:
    """A read (or vread) of ``version``: 200 with it, or 304 when ``conditions`` say the
    client's copy is current (the answer then carries the version's ETag, not the resource).
    Found first: another practice's id, or one never stored, stays a 404 whatever is asked."""
    if conditions is not None and conditions.not_modified(version):
        return Outcome(304, rtype, rid, version)
    return Outcome(200, rtype, rid, version)


def _meta_last_updated(resource: dict[str, Any], caller: Caller) -> datetime:
    """The version's time: its meta.lastUpdated, else now. One further ahead of the server's
    clock than ``caller.clock_skew`` is refused: every later version would be older than it,
    kept in history and never applied, so one wrong clock would freeze the resource."""
    meta = resource.get("meta") or {}
    text = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not text:
        return caller.now.astimezone(UTC)
    where = f"{resource.get('resourceType')}.meta.lastUpdated"
    try:
        when = instant(text, caller.timezone).astimezone(UTC)
    except (ValueError, TypeError, OverflowError):  # a leap second, out of range, not a string
        raise rejected(422, "value", f"meta.lastUpdated {text!r} is not an instant this server "
                       "can store (YYYY-MM-DDThh:mm:ss[.fff]+zz:zz, years 1-9999)",
                       where) from None
    if when > caller.now + caller.clock_skew:
        raise rejected(422, "business-rule", f"meta.lastUpdated {text} is in the future (server "
                       f"time {isoformat(caller.now)}, {caller.clock_skew.total_seconds():.0f} s "
                       "of clock difference allowed): check the sending system's clock",
                       where)
    return when


def _sent_last_updated(resource: dict[str, Any]) -> bool:
    meta = resource.get("meta")
    return isinstance(meta, dict) and bool(meta.get("lastUpdated"))


def check_last_updated(resource: dict[str, Any], caller: Caller) -> None:
    """``meta.lastUpdated`` refused now (422) rather than in a group-committed batch, which a
    refused write makes commit its other writes one by one."""
    _meta_last_updated(resource, caller)


def identifiers(resource: dict[str, Any]) -> list[tuple[str, str]]:
    """(system or "", value) of each identifier with a value: what identifier search matches."""
    found = []
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            found.append((ident.get("system") or "", str(ident["value"])))
    return found


PERFORMER_TYPES = ("PractitionerRole", "Practitioner")


def performer_ids(resource: dict[str, Any], local_bases: tuple[str, ...]) -> list[tuple[str, str]]:
    """(type, id) of the PractitionerRoles (their codes) and Practitioners (their
    qualifications) an Encounter's participants are: what classifies its time."""
    if resource.get("resourceType") != "Encounter":
        return []
    found = []
    for p in resource.get("participant") or []:
        ref = reference(p.get("individual") if isinstance(p, dict) else None, PERFORMER_TYPES,
                        local_bases)
        if ref:
            rtype, _, rid = ref.partition("/")
            found.append((rtype, rid))
    return found


def _events(caller: Caller, mapped: list[MappedEvent],
            correlation_id: str | None = None) -> list[EventDraft]:
    source = f"/ccm/ingest/connection/{caller.token_id}"
    return [EventDraft(source, e.type, caller.tenant, caller.now, e.subject, e.data,
                       correlation_id) for e in mapped]


@dataclass
class Write:
    """One resource version to store: type, id, content, and whether the id is brand new."""

    rtype: str
    rid: str
    resource: dict[str, Any]
    fresh: bool = False  # a server-assigned UUID: no row can exist yet
    where: str | None = None  # the Bundle entry (``Bundle.entry[3]``) that mapping errors name
    # The request's, when the write is stored with other requests' (default: the current one).
    correlation_id: str | None = None


async def store(uow: UnitOfWork, caller: Caller, rtype: str, rid: str,
                resource: dict[str, Any], *, fresh: bool = False,
                where: str | None = None) -> Outcome:
    """Store ``resource`` as the next version of ``rtype/rid`` (created if new) and map it;
    ``where``: the Bundle entry's resource the mapping's errors are located under."""
    return (await store_many(uow, caller, [Write(rtype, rid, resource, fresh, where)]))[0]


async def store_many(uow: UnitOfWork, caller: Caller, writes: list[Write]) -> list[Outcome]:
    """Store each write as the next version of its resource and map it, in order, with a few
    statements per table for the whole list (not per resource).

    Same content as the current version: nothing stored. Older ``meta.lastUpdated`` than the
    current state: stored in history, state and events unchanged, a warning says so. A resource
    written twice starts a new batch, so the second write sees the first.
    """
    caller = await current_caller(uow, caller)
    outcomes: list[Outcome] = []
    run: list[Write] = []
    keys: set[tuple[str, str]] = set()
    for w in writes:
        if (w.rtype, w.rid) in keys:
            outcomes += await _store_batch(uow, caller, run)
            run, keys = [], set()
        run.append(w)
        keys.add((w.rtype, w.rid))
    if run:
        outcomes += await _store_batch(uow, caller, run)
    return outcomes


@dataclass
class _Pending:
    """What a batch will write: versions, rows, identifiers, events."""

    versions: list[VersionRow] = field(default_factory=list)
    new_rows: list[dict[str, Any]] = field(default_factory=list)
    updated_rows: list[dict[str, Any]] = field(default_factory=list)
    stale_rows: list[dict[str, Any]] = field(default_factory=list)
    replaced: list[tuple[str, str]] = field(default_factory=list)
    identifiers: list[tuple[str, str, str, str]] = field(default_factory=list)
    events: list[EventDraft] = field(default_factory=list)


async def _store_batch(uow: UnitOfWork, caller: Caller, writes: list[Write]) -> list[Outcome]:
    """``store_many`` for writes of distinct resources."""
    repo = SqlResourceRepository(uow.session, caller.tenant)
    known = [(w.rtype, w.rid) for w in writes if not w.fresh]
    await repo.claim_rows(known, caller.now)
    currents = await repo.lock_rows(known)
    plans = []  # (write, current row, hash, lastUpdated (None: unchanged), stale)
    replays: list[tuple[str, str, str]] = []  # (type, id, hash) a version in history may answer
    answer_with = []  # stored versions that unchanged and stale writes answer with
    for w in writes:
        cur = currents.get((w.rtype, w.rid))
        stored_before = cur is not None and cur.version_id > 0  # perhaps deleted since
        exists = stored_before and not cur.deleted
        sha = content_hash(w.resource)
        if exists and sha == cur.sha256:
            plans.append((w, cur, sha, None, False))
            answer_with.append((w.rtype, w.rid, cur.version_id))
            continue
        with _under(w.where):
            last_updated = _meta_last_updated(w.resource, caller)
        sent = _sent_last_updated(w.resource)
        if stored_before and cur.deleted and not (
                sent and last_updated > cur.last_updated + caller.clock_skew):
            # A write to a deleted resource whose content is already in history is a replay of
            # what came before the deletion, unless the EHR dates it after the deletion by more
            # than its clock may run ahead of ours (a write made before the delete, from an EHR
            # whose clock runs ahead, could otherwise bring the resource back).
            replays.append((w.rtype, w.rid, sha))
        # Other content dated before a deletion by more than the clocks may differ was made
        # before it (a delayed message): kept in history, the resource stays deleted. (It
        # re-created the resource, and an Encounter's CCM time was logged again.)
        made_before_deletion = (stored_before and cur.deleted and sent
                                and last_updated + caller.clock_skew < cur.last_updated)
        if stored_before and last_updated <= cur.last_updated and (cur.deleted or not sent) \
                and not made_before_deletion:
            # No time sent, or a re-creation after a delete: this version is the newest by
            # definition, even after one whose time is (within the allowed clock difference)
            # ahead of ours; its events must sort after the deletion's reversals.
            last_updated = cur.last_updated + timedelta(milliseconds=1)
        stale = (exists and last_updated < cur.last_updated) or made_before_deletion
        if stale:
            answer_with.append((w.rtype, w.rid, cur.version_id))
            replays.append((w.rtype, w.rid, sha))
        plans.append((w, cur, sha, last_updated, stale))
    stored = await repo.versions_of(answer_with)
    # A stale version already in history (an EHR's retry) is not kept twice; and a replay of
    # what came before a deletion must not bring the resource (and its CCM time) back. Other
    # content re-creates it unless dated before the deletion by more than the clocks may
    # differ (above), and so does the same content dated after the deletion (an EHR undoing a
    # delete).
    kept = await repo.same_content_versions(replays)
    known = await stored_performers(repo, (w.resource for w, *_ in plans), caller.local_bases)
    pending = _Pending()
    outcomes = []
    for w, cur, sha, last_updated, stale in plans:
        if last_updated is None:
            outcomes.append(Outcome(
                200, w.rtype, w.rid, stored[(w.rtype, w.rid, cur.version_id)],
                [Issue("information", "informational",
                       "same content as the current version: no new version was stored")],
                patient=cur.patient))
            continue
        if (same := kept.get((w.rtype, w.rid, sha))) is not None:
            outcomes.append(_stale_outcome(w, cur, stored, last_updated, (
                f"the same content as version {same}, already kept in history: nothing was "
                "stored"), caller.clock_skew))
            continue
        with _under(w.where):
            outcomes.append(_plan_version(caller, w, cur, sha, last_updated, stale, known,
                                          stored, pending))
    await repo.update_rows(pending.updated_rows)
    await repo.update_rows(pending.stale_rows)
    await repo.drop_identifiers(pending.replaced)
    _, outbox_rows = await uow.outbox.stage_many([(e.type, e) for e in pending.events],
                                                 events=False)
    await repo.insert_batch(pending.versions, caller.connection, pending.new_rows,
                            pending.identifiers, outbox_rows)
    return outcomes


async def stored_performers(repo: SqlResourceRepository, resources: Iterable[dict[str, Any]],
                            local_bases: tuple[str, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """The PractitionerRoles and Practitioners the participants of ``resources`` (Encounters)
    are, as stored now: by type, by id."""
    wanted = {(t, i) for r in resources for t, i in performer_ids(r, local_bases)}
    return {kind: await repo.current_resources(kind, sorted(i for t, i in wanted if t == kind))
            for kind in PERFORMER_TYPES}


class placed(Relocating):  # noqa: N801 - a context manager, named as one
    """FhirRejected raised inside, each issue at ``expression``: search criteria refused, at
    the element that carries them (a Bundle entry's ``request.url`` or ``request.ifNoneExist``,
    a reference, the REST URL ``Type?criteria``), not at the parameter's name."""

    __slots__ = ("expression",)

    def __init__(self, expression: str) -> None:
        self.expression = expression

    def relocate(self, issues: list[Issue]) -> list[Issue]:
        return [Issue(i.severity, i.code, i.diagnostics, (self.expression,)) for i in issues]


class _under(Relocating):  # noqa: N801 - a context manager, named as one
    """FhirRejected raised inside, with its issues located under ``where`` (a Bundle entry's
    resource) when there is one."""

    __slots__ = ("where",)

    def __init__(self, where: str | None) -> None:
        self.where = where

    def relocate(self, issues: list[Issue]) -> list[Issue] | None:
        return None if self.where is None else [i.located(self.where) for i in issues]


def _stale_outcome(w: Write, cur: CurrentRow, stored: dict[tuple[str, str, int], VersionRow],
                   last_updated: datetime, kept: str, clock_skew: timedelta) -> Outcome:
    """200 and a warning, with the current version; for a deleted resource (a replay) no
    version at all, so no ETag or Location suggests the write took effect."""
    if cur.deleted:
        return Outcome(200, w.rtype, w.rid, None, outcome_body=True, patient=cur.patient,
                       issues=[Issue(
                           "warning", "conflict",
                           f"{w.rtype}/{w.rid} was deleted (version {cur.version_id}) and this "
                           f"is {kept}: it stays deleted and no event was emitted (to re-create "
                           "it, send it with a meta.lastUpdated after the deletion by more "
                           "than the allowed clock difference: after "
                           f"{isoformat(cur.last_updated + clock_skew)})",
                           ("meta.lastUpdated",))])
    return Outcome(200, w.rtype, w.rid, stored[(w.rtype, w.rid, cur.version_id)],
                   outcome_body=True, patient=cur.patient, issues=[Issue(
                       "warning", "conflict",
                       f"meta.lastUpdated {last_updated.isoformat()} is older than the current "
                       f"version {cur.version_id} ({cur.last_updated.isoformat()}): {kept}; the "
                       "current state is unchanged and no event was emitted",
                       ("meta.lastUpdated",))])


def _plan_version(caller: Caller, w: Write, cur: CurrentRow | None, sha: str,
                  last_updated: datetime, stale: bool,
                  known: dict[str, dict[str, dict[str, Any]]],
                  stored: dict[tuple[str, str, int], VersionRow], pending: _Pending) -> Outcome:
    """The next version of one resource, added to ``pending``; its outcome."""
    rtype, rid = w.rtype, w.rid
    exists = cur is not None and cur.version_id > 0 and not cur.deleted
    version_id = (cur.last_version if cur else 0) + 1
    body = {**w.resource, "id": rid,
            "meta": {**(w.resource.get("meta") or {}), "versionId": str(version_id),
                     "lastUpdated": isoformat(last_updated)}}
    version = VersionRow(rtype, rid, version_id, body, sha, last_updated, caller.now, False,
                         not stale, "POST" if w.fresh else "PUT")
    patient = patient_of(rtype, body, caller.local_bases)
    patient_id = patient.removeprefix("Patient/") if patient else None
    if stale:
        pending.versions.append(version)
        pending.stale_rows.append({"type": rtype, "id": rid, "last_version": version_id})
        kept = _stale_outcome(w, cur, stored, last_updated,
                              f"kept in history as version {version_id}", caller.clock_skew)
        kept.patient = patient_id  # the version kept is about its own patient
        return kept
    source = SourceVersion(rtype, rid, version_id, last_updated, sha, caller.now,
                           caller.connection)
    # The batch's known roles and practitioners as they are: mapping looks up only those the
    # Encounter's participants name (no second walk of them per resource).
    mapping = mapped(body, MappingContext(
        source=source, config=caller.config, timezone=caller.timezone,
        state=cur.ccm_state if cur and cur.version_id else {},
        roles=known["PractitionerRole"], practitioners=known["Practitioner"],
        local_bases=caller.local_bases, clock_skew=caller.clock_skew))
    pending.versions.append(version)
    (pending.new_rows if w.fresh else pending.updated_rows).append({
        "type": rtype, "id": rid, "version_id": version_id, "last_version": version_id,
        "last_updated": last_updated, "sha256": sha, "deleted": False,
        "patient": patient_id, "ccm_state": mapping.state})
    if cur is not None and cur.version_id:
        pending.replaced.append((rtype, rid))
    pending.identifiers += [(rtype, rid, s, v) for s, v in identifiers(body)]
    pending.events += _events(caller, mapping.events, w.correlation_id)
    if rtype in known:  # later Encounters of the batch see the new role or practitioner
        known[rtype][rid] = body
    return Outcome(200 if exists else 201, rtype, rid, version,
                   list(mapping.warnings), patient=patient_id)


def mapped(body: dict[str, Any], ctx: MappingContext) -> Mapping:
    """The version's CCM events and state; FhirRejected for what the mapping's rules refuse."""
    try:
        return map_version(body, ctx)
    except (ValueError, OverflowError) as exc:
        # A dateTime Python cannot hold (a leap second, one beyond year 9999 in the practice's
        # zone), or a number too large: valid FHIR, but no CCM fact can be made of it.
        rtype = ctx.source.resource_type
        raise rejected(422, "value", f"a date or number of this {rtype} cannot be turned into "
                       f"CCM facts ({exc})", rtype) from None


def check_as_create(caller: Caller, rtype: str, resource: dict[str, Any]) -> list[Issue]:
    """What storing a validated ``resource`` as a new resource refuses that validation alone
    does not (``$validate``): a ``meta.lastUpdated`` too far ahead, and the CCM mapping's rules
    (a CCM Encounter without a length or period, or for another server's patient; a CCM consent
    without its patient; …); else the warnings the write would answer with. Nothing stored is
    read, so it is mapped as a first version."""
    last_updated = _meta_last_updated(resource, caller)
    rid = resource.get("id") or "validate"
    source = SourceVersion(rtype, rid, 1, last_updated, DELETED_HASH, caller.now,
                           caller.connection)
    mapping = mapped({**resource, "id": rid}, MappingContext(
        source=source, config=caller.config, timezone=caller.timezone,
        local_bases=caller.local_bases, clock_skew=caller.clock_skew))
    return list(mapping.warnings)


async def claim_create(uow: UnitOfWork, caller: Caller, rtype: str, rid: str,
                       if_none_exist: str, *, ignore: Collection[str] = (),
                       asked: str = "If-None-Exist") -> Outcome | None:
    """The resource matching ``If-None-Exist`` (as an outcome), or None once the criteria are
    claimed for ``rid``: the database key lets one of concurrent identical creates win.
    Resources in ``ignore`` (deleted by the same transaction) match nothing. A conditional
    update that matches nothing creates through here too (``asked`` names it in a 412)."""
    repo = SqlResourceRepository(uow.session, caller.tenant)
    criteria = normalise_criteria(rtype, if_none_exist, caller.local_bases)

    async def the_match() -> Outcome | None:
        matches = await find(repo, rtype, criteria, ignore=ignore,
                             local_bases=caller.local_bases)
        if len(matches) > 1:
            raise rejected(412, "multiple-matches", f"{asked} {if_none_exist!r} matches "
                           f"{len(matches)} resources", "If-None-Exist")
        return Outcome(200, rtype, matches[0].id, matches[0],
                       patient=matches[0].patient) if matches else None

    if (found := await the_match()) is not None:
        return found
    key = criteria_key(criteria)
    owner = await repo.claim_criteria(rtype, key, rid)
    while owner != rid:
        # A concurrent create claimed them first (committed now: the claim waited for it), or
        # an earlier one whose resource no longer matches (its identifier changed, or it was
        # deleted): whatever matches now answers, else the criteria are ours, taken over from
        # that owner only. Another create taking them over at the same time wins once: the
        # others wait for it, find a new owner and look again (they all found no match, so
        # each would otherwise have created a resource).
        if (found := await the_match()) is not None:
            return found
        if await repo.reassign_criteria(rtype, key, rid, owner):
            return None
        owner = await repo.claim_criteria(rtype, key, rid)
    return None


async def create(uow: UnitOfWork, caller: Caller, resource: dict[str, Any], *,
                 if_none_exist: str | None = None, new_id: str | None = None,
                 where: str | None = None, criteria_at: str | None = None) -> Outcome:
    """FHIR create: a server-assigned id; with ``If-None-Exist`` at most one resource ever."""
    rtype = resource["resourceType"]
    rid = new_id or random_uuid()
    if if_none_exist:
        found = await claim_create(uow, caller, rtype, rid, if_none_exist)
        if found is not None:
            return kept_as_it_is(found, resource, if_none_exist)
        refuse_unmet(rtype, {**resource, "id": rid},
                     normalise_criteria(rtype, if_none_exist, caller.local_bases),
                     patient_of(rtype, resource, caller.local_bases),
                     asked="If-None-Exist", at=criteria_at or "If-None-Exist")
    return await store(uow, caller, rtype, rid, resource, fresh=True, where=where)


def kept_as_it_is(found: Outcome, sent: dict[str, Any], criteria: str) -> Outcome:
    """``found``, the match of a conditional create, with a warning when what was ``sent`` is
    other content than the match's: FHIR's conditional create never changes a match, so an
    EHR that re-sends a changed resource that way (an Encounter now entered-in-error) is told
    its change was not stored, and how to send one."""
    if found.version is not None and found.version.sha256 != content_hash(sent):
        rtype = found.resource_type
        found.issues.append(Issue(
            "warning", "duplicate", f"{rtype}/{found.id} matches {criteria!r} and is kept as "
            "it is: what was sent differs from it and was not stored (a conditional create "
            f"never changes its match; send a change as a conditional update, PUT "
            f"{rtype}?{criteria.partition('?')[2] or criteria}, or PUT {rtype}/{found.id})"))
    return found


async def update(uow: UnitOfWork, caller: Caller, rtype: str, rid: str,
                 resource: dict[str, Any], *, if_match: str | None = None,
                 where: str | None = None) -> Outcome:
    """FHIR update (or create with the client's id); ``If-Match`` guards the version."""
    check_update_id(rtype, rid, resource)
    if if_match is not None:
        wanted = parse_etag(if_match)
        repo = SqlResourceRepository(uow.session, caller.tenant)
        current = await repo.lock_current(rtype, rid)
        if current is None or not current.version_id or current.deleted \
                or wanted != str(current.version_id):
            raise if_match_failed(if_match, rtype, rid, current)
    return await store(uow, caller, rtype, rid, resource, where=where)


async def conditional_target(uow: UnitOfWork, caller: Caller, rtype: str, criteria: str,
                             resource: dict[str, Any], *, criteria_at: str,
                             ignore: Collection[str] = (),
                             id_at: str | None = None) -> tuple[str, bool]:
    """The id conditional update ``PUT rtype?criteria`` writes (FHIR http.html#cond-update),
    and whether it creates: the one match (a body's id other than the match's: 400), or, when
    nothing matches, the body's id (update as create) or a new one; several matches: 412.
    Creating, it claims the criteria as a conditional create does (``claim_create``), so of
    concurrent ones that match nothing one creates and the others update what it created.
    ``criteria_at``: the element the criteria's issues name (the REST URL, a Bundle entry's
    ``request.url``), ``id_at`` the body's id (``Type.id``); ``ignore``: ids that match
    nothing (a transaction deletes them)."""
    sent_id = resource.get("id")
    new_id = sent_id or random_uuid()
    with placed(criteria_at):
        found = await claim_create(uow, caller, rtype, new_id, criteria, ignore=ignore,
                                   asked=f"conditional update {rtype}?{criteria}")
    if found is not None and sent_id and sent_id != found.id:
        raise rejected(400, "invalid", f"conditional update {rtype}?{criteria} finds "
                       f"{rtype}/{found.id}, but the resource's id is {sent_id!r}",
                       id_at or f"{rtype}.id")
    return (found.id, False) if found is not None else (new_id, True)


async def conditional_update(uow: UnitOfWork, caller: Caller, rtype: str, criteria: str,
                             resource: dict[str, Any], *, criteria_at: str,
                             if_match: str | None = None, where: str | None = None) -> Outcome:
    """FHIR conditional update: ``update`` of the resource ``conditional_target`` settles
    (``If-Match`` guards its version, as for ``PUT Type/id``)."""
    if if_match is not None:
        parse_etag(if_match)  # a malformed one is refused before anything is claimed
    rid, creates = await conditional_target(uow, caller, rtype, criteria, resource,
                                            criteria_at=criteria_at)
    if creates:
        refuse_unmet(rtype, {**resource, "id": rid},
                     normalise_criteria(rtype, criteria, caller.local_bases),
                     patient_of(rtype, resource, caller.local_bases),
                     asked=f"conditional update {rtype}?{criteria}", at=criteria_at)
    return await update(uow, caller, rtype, rid, {**resource, "id": rid}, if_match=if_match,
                        where=where)


async def conditional_remove(uow: UnitOfWork, caller: Caller, rtype: str, criteria: str, *,
                             criteria_at: str, if_match: str | None = None) -> Outcome:
    """FHIR conditional delete, of a single match (``conditionalDelete: single``): the one
    match is deleted as ``remove`` deletes (``If-Match`` guards its version); several are a
    412; none is a 204 with an issue saying nothing matched (over REST a 200 with it as the
    OperationOutcome, unless ``Prefer: return=minimal``; in a Bundle the entry's outcome), or a
    412 with ``If-Match``, which no version then matches."""
    wanted = parse_etag(if_match) if if_match is not None else None
    repo = SqlResourceRepository(uow.session, caller.tenant)
    with placed(criteria_at):
        matches = await find_by_criteria(repo, rtype, criteria, local_bases=caller.local_bases)
    if len(matches) > 1:
        raise rejected(412, "multiple-matches", f"conditional delete {rtype}?{criteria} "
                       f"matches {len(matches)} resources; only a single match is deleted "
                       "here: make the criteria more selective", criteria_at)
    if not matches:
        if wanted is not None:
            raise rejected(412, "conflict", f"If-Match {if_match} does not match: nothing "
                           f"matches {rtype}?{criteria}", "If-Match")
        return Outcome(204, rtype, "", None, issues=[Issue(
            "information", "not-found", f"nothing matches {rtype}?{criteria}: nothing was "
            "deleted")])
    return await remove(uow, caller, rtype, matches[0].id, if_match=if_match)


def if_match_failed(if_match: str, rtype: str, rid: str, current: Any) -> FhirRejected:
    """The 412 of an ``If-Match`` that names no current version of ``rtype/rid`` (``current``:
    its row, None when unknown), saying what there is instead."""
    if current is None or not current.version_id:
        now = "no such resource is stored"
    elif current.deleted:
        now = (f"it is deleted (version {current.version_id} is its deletion): no version is "
               "current; an update without If-Match creates it again")
    else:
        now = f"its current version is W/\"{current.version_id}\""
    return rejected(412, "conflict", f"If-Match {if_match} does not match {rtype}/{rid}: {now}",
                    "If-Match")


def check_update_id(rtype: str, rid: str, resource: dict[str, Any]) -> None:
    """An update's body names the resource of its URL (400 otherwise)."""
    if resource.get("id") is None:
        raise rejected(400, "required", f"an update needs the resource's id in its body, equal "
                       f"to the URL id {rid!r}", f"{rtype}.id")
    if resource.get("id") != rid:
        raise rejected(400, "invalid", f"resource id {resource.get('id')!r} does not match the "
                       f"URL id {rid!r}", f"{rtype}.id")


async def remove(uow: UnitOfWork, caller: Caller, rtype: str, rid: str, *,
                 if_match: str | None = None) -> Outcome:
    """FHIR delete: a deletion version; the resource then answers 410. Idempotent.
    ``If-Match``: only while the current version is that one (412 otherwise)."""
    caller = await current_caller(uow, caller)
    repo = SqlResourceRepository(uow.session, caller.tenant)
    wanted = parse_etag(if_match) if if_match is not None else None
    current = await repo.lock_current(rtype, rid)
    live = current is not None and current.version_id > 0 and not current.deleted
    if wanted is not None and (not live or str(current.version_id) != wanted):
        raise if_match_failed(if_match or "", rtype, rid, current)
    if not live:
        return Outcome(204, rtype, rid)
    last = await repo.version(rtype, rid, current.version_id)
    version_id = current.last_version + 1
    # After the version it deletes, even when that one's time is (within the allowed clock
    # difference) ahead of ours: consumers order a resource's events by this time.
    deleted_at = max(caller.now, current.last_updated + timedelta(milliseconds=1))
    source = SourceVersion(rtype, rid, version_id, deleted_at, current.sha256, caller.now,
                           caller.connection)
    mapping = map_version(last.resource or {}, MappingContext(
        source=source, config=caller.config, timezone=caller.timezone, state=current.ccm_state,
        deleted=True, local_bases=caller.local_bases,
        stored_patient=f"Patient/{current.patient}" if current.patient else None))
    await repo.set_current(rtype, rid, version_id=version_id, last_version=version_id,
                           last_updated=deleted_at, sha256=DELETED_HASH, deleted=True,
                           ccm_state=mapping.state)
    await repo.drop_identifiers([(rtype, rid)])
    await repo.release_criteria(rtype, rid)
    _, outbox_rows = await uow.outbox.stage_many(
        [(e.type, e) for e in _events(caller, mapping.events)], events=False)
    deletion = VersionRow(rtype, rid, version_id, None, DELETED_HASH, deleted_at, caller.now,
                          True, True, "DELETE")
    await repo.insert_batch([deletion], caller.connection, [], [], outbox_rows)
    return Outcome(204, rtype, rid, patient=current.patient)


# ---- search ------------------------------------------------------------------------------------

SEARCH_PARAMS = {"_id", "identifier", "patient", "subject", "_lastUpdated", "_count",
                 "_offset"}
PAGING = {"_count", "_offset"}
# Parameters of how to answer, not what to find: the answer is JSON either way.
IGNORED = {"_format", "_pretty"}
MAX_OFFSET = 100_000


def normalise_criteria(rtype: str, query: str,
                       local_bases: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Search parameters of a conditional (``identifier=…``, ``Patient?identifier=…``), sorted;
    a patient named by this server's absolute URL (under ``local_bases``) or by its id alone is
    written ``Patient/id``, so criteria that mean the same have one key (``criteria_key``)."""
    if "?" in query:
        prefix, _, query = query.partition("?")
        if prefix and prefix != rtype:
            raise rejected(400, "invalid", f"criteria for {prefix} on a {rtype}", "If-None-Exist")
    params = sorted((k, _patient_named(v, local_bases) if k in ("patient", "subject") else v)
                    for k, v in parse_qsl(query, keep_blank_values=True) if k not in IGNORED)
    if not params:
        raise rejected(400, "invalid", "empty search criteria", "If-None-Exist")
    for name, value in params:
        if name not in SEARCH_PARAMS - PAGING:
            raise rejected(400, "not-supported", f"criteria parameter {name!r} is not supported; "
                           f"supported: {', '.join(sorted(SEARCH_PARAMS - PAGING))}", name)
        if not value.strip():  # ``identifier=`` matches nothing: a create would always happen
            raise rejected(400, "required", f"criteria parameter {name!r} has no value",
                           "If-None-Exist")
        if "\x00" in value:
            raise rejected(400, "value", f"criteria parameter {name!r} has a NUL character",
                           "If-None-Exist")
    return params


def _patient_named(value: str, local_bases: tuple[str, ...]) -> str:
    """A ``patient`` criterion as ``Patient/id`` when it names one of this server's patients
    (``id``, ``Patient/id``, or the absolute URL of one under ``local_bases``); else as sent."""
    local = local_path(value, local_bases)
    if local is None:
        return value
    kind, _, rid = local.rpartition("/")
    return f"Patient/{rid}" if kind in ("", "Patient") and rid else value


def _plus_hint(value: str) -> str:
    """What a space in a date searched for most likely is: the ``+`` of a zone, unencoded."""
    return ("; a '+' in a URL's query is a space: write a zone ahead of UTC as %2B (e.g. "
            "2026-11-29T03:00:00%2B01:00)" if " " in value else "")


def last_updated_criteria(value: str) -> list[tuple[str, datetime | tuple[datetime, datetime]]]:
    """``_lastUpdated=[prefix]date`` as comparisons of the instant (FHIR's date search: the
    prefix compares with the whole range the date's precision covers; a time without a zone
    is UTC)."""
    try:
        low, high, inside = fhir_dates.parse(value).interval()
    except ValueError:
        raise rejected(400, "value", f"_lastUpdated {value!r} is not a FHIR search date "
                       "(YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]][Z|±hh:mm]) "
                       f"with an optional prefix ({', '.join(fhir_dates.PREFIXES)})"
                       + _plus_hint(value), "_lastUpdated") from None
    low, high = low or _EARLIEST, high or _LATEST
    return [("ge", low), ("lt", high)] if inside else [("outside", (low, high))]


_EARLIEST, _LATEST = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)


def meets_criteria(rtype: str, resource: dict[str, Any], params: list[tuple[str, str]],
                   patient: str | None) -> bool:
    """Whether ``resource`` meets normalised criteria by what it carries, as the search would
    find it once stored: ``identifier`` (``system|value``, or a value in any system), ``_id``,
    and ``patient``/``subject`` (``patient``: the ``Patient/id`` the resource is about, as the
    caller resolved its patient element); criteria with any other parameter are not evaluated
    here (False)."""
    for name, value in params:
        if name == "_id":
            if resource.get("id") != value:
                return False
        elif name in ("patient", "subject"):
            if rtype not in PATIENT_ELEMENT or (name == "subject" and rtype == "Consent") \
                    or patient is None or patient != value:
                return False
        elif name == "identifier":
            system, bar, code = value.partition("|")
            if not any(v == (code if bar else value) and (not bar or s == system)
                       for s, v in identifiers(resource)):
                return False
        else:
            return False
    return True


# What a resource carries that criteria can name (``meets_criteria``); ``_lastUpdated`` is not
# the resource's to meet: the server sets its time.
CARRIED = ("_id", "identifier", "patient", "subject")


def refuse_unmet(rtype: str, resource: dict[str, Any], params: list[tuple[str, str]],
                 patient: str | None, *, asked: str, at: str) -> None:
    """400 when ``resource``, which conditional criteria (``asked``, at element ``at``)
    matched nothing and are about to create, does not meet them itself (``meets_criteria``):
    the next push of it would find nothing again and create another resource (an Encounter's
    CCM time counted once per push). FHIR R5 http.html#cond-update says a server should
    refuse it; HAPI does."""
    unmet = [f"{k}={v}" for k, v in params
             if k in CARRIED and not meets_criteria(rtype, resource, [(k, v)], patient)]
    if unmet:
        raise rejected(400, "invalid", f"{asked} matches nothing, and the {rtype} it would "
                       f"create does not meet {' and '.join(unmet)} itself: sent again, it "
                       "would match nothing again and create another one. Give criteria the "
                       "resource carries (its identifier's system and value, exactly)", at)


def patient_of(rtype: str, resource: dict[str, Any],
               local_bases: tuple[str, ...]) -> str | None:
    """The ``Patient/id`` ``resource`` is about (its patient element), None when about none."""
    element = PATIENT_ELEMENT.get(rtype)
    return reference(resource.get(element), ("Patient",), local_bases) if element else None


def criteria_key(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v}" for k, v in params)[:1000]


async def find(repo: SqlResourceRepository, rtype: str, params: list[tuple[str, str]],
               limit: int = 50, *, ignore: Collection[str] = (),
               local_bases: tuple[str, ...] = ()) -> list[VersionRow]:
    """What ``params`` match, less the ids in ``ignore`` (resources a transaction deletes);
    ``local_bases``: this server's bases, as the REST search has them (a patient named by its
    absolute URL here is this server's)."""
    found = (await search(repo, rtype, params, limit=limit, local_bases=local_bases))[1]
    return [m for m in found if m.id not in ignore] if ignore else found


def check_criteria(rtype: str, criteria: str) -> None:
    """Conditional criteria (``identifier=…`` or ``Patient?identifier=…``) as
    ``find_by_criteria`` takes them, without searching: 400 for what it would refuse."""
    search_query(rtype, normalise_criteria(rtype, criteria))


async def find_by_criteria(repo: SqlResourceRepository, rtype: str, criteria: str, *,
                           ignore: Collection[str] = (),
                           local_bases: tuple[str, ...] = ()) -> list[VersionRow]:
    """What conditional criteria (``identifier=…`` or ``Patient?identifier=…``) match: what
    the same REST search finds."""
    return await find(repo, rtype, normalise_criteria(rtype, criteria, local_bases),
                      ignore=ignore, local_bases=local_bases)


def _given_once(params: list[tuple[str, str]], names: Collection[str]) -> None:
    """400 for any of ``names`` given more than once (which one would count is a guess)."""
    for name in names:
        if sum(1 for given, _ in params if given == name) > 1:
            raise rejected(400, "value", f"{name} is given more than once", name)


def paging(params: list[tuple[str, str]], limit: int = 50) -> tuple[int, int]:
    """(``_offset``, ``_count``) of a search: where its page starts and how long it is."""
    offset = 0
    _given_once(params, PAGING)
    for name, value in params:
        if name == "_count":  # 0: the total only
            if not ascii_digits(value, 7) or not 0 <= int(value) <= 1000:
                raise rejected(400, "value", "_count must be 0..1000", "_count")
            limit = int(value)
        elif name == "_offset":
            if not ascii_digits(value, 7) or int(value) > MAX_OFFSET:
                raise rejected(400, "value", f"_offset must be 0..{MAX_OFFSET:,}", "_offset")
            offset = int(value)
    return offset, limit


async def search(repo: SqlResourceRepository, rtype: str, params: list[tuple[str, str]], *,
                 limit: int = 50,
                 local_bases: tuple[str, ...] = ()) -> tuple[int, list[VersionRow]]:
    """(total, the page of current versions: ``_offset``, ``_count``) of a search; newest
    first. A ``patient`` given as an absolute URL is this server's under ``local_bases``; any
    other server's patient is none of the stored ones."""
    return await repo.search(rtype, **search_query(rtype, params, limit=limit,
                                                   local_bases=local_bases))


# Ids one ``_id`` search takes (each is a database parameter; PostgreSQL takes 32,767 in all).
MAX_SEARCH_IDS = 1_000


def search_query(rtype: str, params: list[tuple[str, str]], *, limit: int = 50,
                 local_bases: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a search's parameters ask of the repository; 400 for what it refuses (``$validate``
    checks conditional criteria with it, without searching)."""
    for name, value in params:  # a Bundle's GET entry decodes %00 the HTTP edge never saw
        if "\x00" in name or "\x00" in value:
            raise rejected(400, "value", "a search parameter has a NUL character (%00)",
                           name.replace("\x00", "%00"))
    ids: list[str] | None = None
    patient = identifier = None
    updated: list[tuple[str, Any]] = []
    offset, limit = paging(params, limit)
    for name, value in params:
        # A parameter given twice must match both times (FHIR: AND).
        if name == "_id":
            given = value.split(",")
            if len(given) > MAX_SEARCH_IDS:
                raise rejected(400, "too-costly", f"_id takes at most {MAX_SEARCH_IDS:,} ids "
                               f"per search, not {len(given):,}", name)
            ids = given if ids is None else [i for i in ids if i in given]
        elif name in ("patient", "subject"):
            if rtype not in PATIENT_ELEMENT or (name == "subject" and rtype == "Consent"):
                raise rejected(400, "not-supported", f"{rtype} has no {name} search parameter",
                               name)
            if "," in value:
                raise rejected(400, "not-supported", f"{name} {value!r}: one patient per "
                               f"parameter (no comma lists; give {name} once per search)", name)
            local = local_path(value, local_bases)
            kind, _, rid = (local or value).rpartition("/")
            if kind and kind.rsplit("/", 1)[-1] != "Patient":
                raise rejected(400, "not-supported", f"{name} {value!r}: only Patient "
                               "references are searchable here (Patient/id or id)", name)
            if local is None or (patient is not None and rid != patient):
                ids = []  # another server's patient, or two patients: nothing matches
            patient = rid
        elif name == "identifier":
            system, bar, code = value.partition("|")
            if "," in value or (bar and not code) or identifier is not None:
                raise rejected(400, "not-supported", f"identifier {value!r}: one system|value or "
                               "value per search (no comma lists, no system-only search, no "
                               "second identifier parameter)", "identifier")
            identifier = (system, code) if bar else (None, value)
        elif name == "_lastUpdated":
            updated += last_updated_criteria(value)
        elif name not in PAGING and name not in IGNORED:
            raise rejected(400, "not-supported", f"search parameter {name!r} is not supported; "
                           f"supported: {', '.join(sorted(search_params(rtype)))} (Prefer: "
                           "handling=lenient ignores the others)", name)
    return {"ids": ids, "patient": patient, "identifier": identifier, "updated": updated,
            "limit": limit, "offset": offset}


HISTORY_PARAMS = {"_since", *PAGING}


def search_params(rtype: str) -> set[str]:
    """The search parameters of ``rtype`` (``patient`` and ``subject`` only where a type names
    its patient; Consent's is ``patient``)."""
    if rtype not in PATIENT_ELEMENT:
        return SEARCH_PARAMS - {"patient", "subject"}
    return SEARCH_PARAMS - {"subject"} if rtype == "Consent" else SEARCH_PARAMS


def known_params(params: list[tuple[str, str]], supported: Collection[str]
                 ) -> list[tuple[str, str]]:
    """``params`` without those of a name ``supported`` (or ``IGNORED``) does not list: what a
    lenient search (``Prefer: handling=lenient``) answers and links."""
    return [(k, v) for k, v in params if k in supported or k in IGNORED]


def history_params(params: list[tuple[str, str]]) -> tuple[datetime | None, int, int]:
    """(``_since``, ``_offset``, ``_count``) of a ``_history`` read: versions last updated at or
    after ``_since`` (any FHIR search date; its first instant), a page of ``_count`` (default
    50) from ``_offset``; 400 for anything else, and for ``_since`` given twice (which one
    would count is a guess)."""
    since = None
    _given_once(params, ("_since",))
    for name, value in params:
        if name == "_since":
            try:
                since = fhir_dates.date_range(value).start.astimezone(UTC)
            except (ValueError, OverflowError):
                raise rejected(400, "value", f"_since {value!r} is not a FHIR instant or date "
                               "(YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]]"
                               "[Z|±hh:mm])" + _plus_hint(value), "_since") from None
        elif name not in PAGING and name not in IGNORED:
            raise rejected(400, "not-supported", f"_history parameter {name!r} is not supported; "
                           f"supported: {', '.join(sorted(HISTORY_PARAMS))} (Prefer: "
                           "handling=lenient ignores the others)", name)
    offset, count = paging(params)
    return since, offset, count


def validated(resource: Any, rtype: str | None = None) -> dict[str, Any]:
    """The body as a valid resource of ``rtype`` or FhirRejected (400/422)."""
    checked = validate_resource(resource, expected_type=rtype)
    rid = checked.get("id")
    if rid is not None and (not isinstance(rid, str) or not RESOURCE_ID.match(rid)
                            or rid in (".", "..")):
        raise rejected(422, "value", "id must be 1-64 letters, digits, '-' or '.' (and not '.' "
                       "or '..', which no URL can address)", f"{checked['resourceType']}.id")
    return checked


async def history_or_error(repo: SqlResourceRepository, rtype: str, rid: str,
                           params: list[tuple[str, str]], where: str | None = None
                           ) -> tuple[int, list[VersionRow], bool | None]:
    """A page of ``rtype/rid``'s history as ``params`` ask (``history_params``: 400 for what
    they refuse): the versions at or after ``_since``, the page newest first, and whether the
    applied version before the page is a deletion; 404 for a resource never stored here."""
    since, offset, count = history_params(params)
    stored, total, versions, before_deleted = await repo.history(
        rtype, rid, since=since, limit=count, offset=offset)
    if not stored:
        raise rejected(404, "not-found", f"{rtype}/{rid} is not known", where or f"{rtype}/{rid}")
    return total, versions, before_deleted


async def version_or_error(repo: SqlResourceRepository, rtype: str, rid: str, vid: str,
                           where: str | None = None) -> VersionRow:
    """Version ``vid`` of ``rtype/rid`` (a vread), or 404 (not stored here, or no version
    number) / 410 (a deletion); ``where``: the element the issue names."""
    version = await repo.version(rtype, rid, int(vid)) if ascii_digits(vid, 9) else None
    if version is None:
        raise rejected(404, "not-found", f"{rtype}/{rid}/_history/{vid} is not known", where)
    if version.deleted:
        raise rejected(410, "deleted", f"version {vid} of {rtype}/{rid} is a deletion", where)
    return version


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
