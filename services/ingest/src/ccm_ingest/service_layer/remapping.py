"""A practice's stored resources mapped again when its ingest config changes.

A resource's CCM events were mapped with the config in force when its version arrived, and the
same content sent again is no new version: without this, a practice that adds a coordinator's
role code to ``clinical_staff_roles`` (or a CCM-time code, a chronic category…) changed nothing
for what was already stored, and billing kept the coordinator's time blocked as
``staff-role-unknown`` until the EHR changed the resource.

In the unit of work that saves the config, each current (not deleted) resource of the types
whose mapping reads a changed key (``config.MAPPED_BY``) is mapped twice, from its current
version and CCM state: with the config before and the config after. Where the two agree, the
change does not concern it and nothing happens. Where they differ, the events of the new
mapping that the old one did not make are staged in the outbox (per-patient sequence numbers as
any write's) and the resource's CCM state becomes the new one. The events' ``source`` is the
version they were mapped from, with ``mappingRevision`` (the config's new revision): consumers
take them as newer than that version's earlier events, and older than any later version's.

The version itself is not changed (no new version, ETag or ``meta.lastUpdated``: the EHR's
record is as it sent it). A resource the new config's rules refuse (an Encounter that becomes
CCM time but has no duration, a consent that becomes a CCM consent without its patient) is left
as it was mapped, and named in the answer: its next version is refused the same way until it
is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from ccm_ingest.adapters.repository import CurrentRow, LiveResource, SqlResourceRepository
from ccm_ingest.domain.config import IngestConfig, remapped_types
from ccm_ingest.domain.mapping import MappingContext
from ccm_ingest.domain.model import FhirRejected, Mapping, SourceVersion
from ccm_ingest.service_layer import resources as handlers
from ccm_shared.db import UnitOfWork
from ccm_shared.events import EventDraft

log = structlog.get_logger(__name__)

SOURCE = "/ccm/ingest/ingest-config"
PAGE = 500  # resources read per statement
STAGE_AT = 5_000  # events staged in the outbox once this many are pending (memory)
REFUSED_LISTED = 50  # resources the new config refuses, named in the answer (all are counted)


@dataclass
class Remapped:
    """What changing the config did to the stored resources."""

    revision: int
    types: tuple[str, ...]
    resources: int = 0  # mapped again
    changed: int = 0  # whose mapping changed
    events: int = 0  # staged
    refused: list[dict[str, Any]] = field(default_factory=list)  # by the new config's rules
    refused_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "types": list(self.types),
                "resources": self.resources, "changed": self.changed, "events": self.events,
                "refused": {"count": self.refused_count, "resources": self.refused}}


@dataclass(frozen=True)
class Practice:
    """The practice whose resources are mapped again, and how its writes are mapped."""

    id: str
    timezone: ZoneInfo
    now: datetime
    clock_skew: timedelta
    local_bases: tuple[str, ...]


async def remap(uow: UnitOfWork, practice: Practice, before: IngestConfig,
                after: IngestConfig, revision: int) -> Remapped:
    """Map the practice's affected resources again with ``after`` (see the module), under the
    config's exclusive hold the caller took (``SqlResourceRepository.hold_config``: no write of
    the practice runs meanwhile, so its rows are read without locks); never commits."""
    done = Remapped(revision, remapped_types(before, after))
    repo = SqlResourceRepository(uow.session, practice.id)
    pending: list[EventDraft] = []
    for rtype in done.types:
        after_id = ""
        while page := await repo.live_resources(rtype, after_id, PAGE):
            after_id = page[-1].current.id
            known = await handlers.stored_performers(
                repo, (live.resource for live in page), practice.local_bases)
            updates = []
            for live in page:
                done.resources += 1
                changed = _remapped(practice, live, before, after, revision, known, done)
                if changed is None:
                    continue
                events, state = changed
                done.changed += 1
                pending += events
                if state != live.current.ccm_state:
                    updates.append({"type": rtype, "id": live.current.id, "ccm_state": state})
            await repo.update_rows(updates)
            if len(pending) >= STAGE_AT:
                done.events += await _stage(uow, repo, pending)
    done.events += await _stage(uow, repo, pending)
    if done.types:
        log.info("ingest config change mapped the stored resources again",
                 practice=practice.id, revision=revision, types=",".join(done.types),
                 resources=done.resources, changed=done.changed, events=done.events,
                 refused=done.refused_count)
    return done


def _remapped(practice: Practice, live: LiveResource, before: IngestConfig,
              after: IngestConfig, revision: int, known: dict[str, dict[str, dict[str, Any]]],
              done: Remapped) -> tuple[list[EventDraft], dict[str, Any]] | None:
    """(the events to emit, the new CCM state) of one resource whose mapping the change
    alters; None when it does not (or the new config's rules refuse it: ``done.refused``)."""
    current, body = live.current, live.resource
    source = SourceVersion(current.type, current.id, current.version_id, current.last_updated,
                           current.sha256, live.received_at, live.connection,
                           mapping_revision=revision)
    try:
        new = _mapping(body, source, after, practice, current, known)
    except FhirRejected as exc:
        done.refused_count += 1
        if len(done.refused) < REFUSED_LISTED:
            issue = exc.issues[0] if exc.issues else None
            done.refused.append({"resource": f"{current.type}/{current.id}",
                              "versionId": str(current.version_id),
                              "diagnostics": issue.diagnostics if issue else None,
                              "expression": list(issue.expression) if issue else []})
        return None
    try:
        old: Mapping | None = _mapping(body, source, before, practice, current, known)
    except FhirRejected:
        old = None  # refused by the rules before (stored under older ones): all of it is new
    events = [e for e in new.events if old is None or e not in old.events]
    if not events and old is not None and old.state == new.state:
        return None
    # (their correlation id: the request's, set by the outbox when they are staged)
    return ([EventDraft(SOURCE, e.type, practice.id, practice.now, e.subject, e.data)
             for e in events], new.state)


def _mapping(body: dict[str, Any], source: SourceVersion, config: IngestConfig,
             practice: Practice, current: CurrentRow,
             known: dict[str, dict[str, dict[str, Any]]]) -> Mapping:
    """The version's mapping with ``config``, from the CCM state it left (what earlier versions
    meant is in it), its patient as stored (whatever base its references were written
    against), and the roles and practitioners stored now."""
    return handlers.mapped(body, MappingContext(
        source=source, config=config, timezone=practice.timezone, state=current.ccm_state,
        roles=known["PractitionerRole"], practitioners=known["Practitioner"],
        local_bases=practice.local_bases, clock_skew=practice.clock_skew,
        stored_patient=f"Patient/{current.patient}" if current.patient else None))


async def _stage(uow: UnitOfWork, repo: SqlResourceRepository,
                 pending: list[EventDraft]) -> int:
    """Stage ``pending`` in the outbox (and empty it); how many."""
    if not pending:
        return 0
    _, rows = await uow.outbox.stage_many([(e.type, e) for e in pending], events=False)
    await repo.insert_batch([], None, [], [], rows)
    staged = len(pending)
    pending.clear()
    return staged
