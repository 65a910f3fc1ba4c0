"""Building blocks shared by the event handlers, the API and the scheduler."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_careplan.adapters.orm import (
    distributions,
    patients,
    practice_rules,
    practitioners,
    review_steps,
    trackers,
)
from ccm_careplan.domain.rules import DEFAULT_RULES, ReviewRules, rules_from_dict
from ccm_careplan.domain.schedule import idempotency_key, next_review_due
from ccm_careplan.domain.tracker import Directory, local_day, recipients, resolve_provider
from ccm_shared.db import UnitOfWork, dialect_insert, xact_lock
from ccm_shared.events import CloudEvent
from ccm_shared.tables import practices

SOURCE = "/ccm/careplan"
_TRACKER_NS = uuid.UUID("6f1c7f0e-6a51-4d0e-9a0c-2f7f3c1b8a11")


def tracker_id(practice: str, care_plan: str) -> str:
    """Deterministic, so a replayed or duplicated creation lands on the same tracker."""
    return str(uuid.uuid5(_TRACKER_NS, f"{practice}|{care_plan}"))


def event_id(key: str) -> str:
    """Deterministic CloudEvent id per idempotency key: consumers' inboxes dedupe it too."""
    return str(uuid.uuid5(_TRACKER_NS, key))


def insert_for(session: AsyncSession):  # noqa: ANN201
    return dialect_insert(session.bind.dialect.name)


def rules_lock(practice: str) -> str:
    """The advisory lock (``xact_lock``) a rules change holds exclusively from its start, and
    an event creating a plan shared: the practice's first rules have no row to lock."""
    return f"careplan-rules:{practice}"


async def load_rules(session: AsyncSession, practice: str, *, share: bool = False) -> ReviewRules:
    """The practice's rules; ``share``: hold them until the transaction ends (``rules_lock``,
    shared), so a rules change waits for it, or it for a change in progress (and then reads
    the new rules), the practice's first rules too."""
    if share:
        await xact_lock(session, rules_lock(practice), shared=True)
    stmt = select(practice_rules.c.rules).where(practice_rules.c.practice == practice)
    row = (await session.execute(stmt.with_for_update(read=True) if share else stmt)).first()
    return DEFAULT_RULES if row is None else rules_from_dict(row.rules)


async def practice_zone(session: AsyncSession, practice: str) -> ZoneInfo:
    tz = (await session.execute(select(practices.c.timezone).where(practices.c.id == practice))
          ).scalar()
    try:
        return ZoneInfo(tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


async def practice_today(session: AsyncSession, practice: str, now: datetime) -> date:
    """Review dates are calendar days in the practice's own time zone."""
    return local_day(now, await practice_zone(session, practice))


def compute_due(row: dict, rules: ReviewRules) -> date:
    anchor = row["last_review"] or row["created"] or row["first_seen"]
    return next_review_due(anchor=anchor, early_trigger=row["early_trigger_date"], rules=rules)


async def general_practitioners(
    session: AsyncSession, practice: str, patient_refs: set[str]
) -> dict[str, list[str]]:
    if not patient_refs:
        return {}
    rows = (await session.execute(select(patients.c.patient, patients.c.general_practitioners)
                                  .where(patients.c.practice == practice,
                                         patients.c.patient.in_(patient_refs)))).all()
    return {r.patient: list(r.general_practitioners) for r in rows}


async def practitioner_directory(
    session: AsyncSession, practice: str, refs: set[str] | None = None
) -> dict[str, Directory]:
    """Known practitioners and roles of the practice (all, or ``refs`` and their people)."""
    def query(wanted: set[str] | None):  # noqa: ANN202
        stmt = select(practitioners).where(practitioners.c.practice == practice)
        return stmt if wanted is None else stmt.where(practitioners.c.reference.in_(wanted))

    directory = {p.reference: Directory(p.practitioner, p.active and not p.deleted)
                 for p in (await session.execute(query(refs))).all()}
    if refs is not None:
        people = {d.practitioner for d in directory.values() if d.practitioner} - set(directory)
        if people:
            directory |= await practitioner_directory(session, practice, people)
    return directory


async def responsible_provider(session: AsyncSession, practice: str, row: dict) -> str | None:
    gps = (await general_practitioners(session, practice, {row["patient"]})).get(
        row["patient"], [])
    refs = {r for r in [row["author"], *gps] if r}
    directory = await practitioner_directory(session, practice, refs) if refs else {}
    return resolve_provider(row["author"], gps, directory)


@dataclass(frozen=True)
class StepClaim:
    practice: str
    tracker: str
    kind: str
    due: date
    step: int
    scheduled_on: date
    send: bool

    @property
    def key(self) -> str:
        return idempotency_key(self.practice, self.tracker, self.kind, self.due, self.step)


async def claim_steps(uow: UnitOfWork, claims: list[StepClaim], now: datetime) -> set[str]:
    """Record steps by their idempotency keys; return the keys this caller claimed.

    The key is the primary key: of two replicas claiming the same step, exactly one inserts it.
    One statement per ``CLAIMS_PER_STATEMENT`` steps: a practice's first pass can owe thousands
    (a backlog of overdue plans), and one statement may bind at most 32,767 parameters on
    PostgreSQL (10 per step).
    """
    ins = insert_for(uow.session)
    claimed: set[str] = set()
    for start in range(0, len(claims), CLAIMS_PER_STATEMENT):
        result = await uow.session.execute(
            ins(review_steps).values([
                {"idempotency_key": c.key, "practice": c.practice, "tracker_id": c.tracker,
                 "kind": c.kind, "cycle_due": c.due, "step": c.step,
                 "scheduled_on": c.scheduled_on, "sent": c.send,
                 "event_id": event_id(c.key) if c.send else None, "recorded_at": now}
                for c in claims[start:start + CLAIMS_PER_STATEMENT]
            ]).on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(review_steps.c.idempotency_key)
        )
        claimed.update(result.scalars().all())
    return claimed


CLAIMS_PER_STATEMENT = 1000


def review_event(
    *, row: dict, kind: str, due: date, step: int, day: date, key: str, now: datetime,
    provider: str | None, supervisor: str | None,
) -> CloudEvent:
    """The event of a review step sent for the tracker ``row``."""
    return CloudEvent(
        id=event_id(key),
        source=SOURCE,
        type=f"careplan.review.{kind}.v1",
        time=now,
        tenant=row["practice"],
        subject=row["patient"],
        data={
            "tracker": row["id"],
            "carePlan": row["care_plan"],
            "patient": row["patient"],
            "dueDate": due.isoformat(),
            "daysOverdue": max(0, (day - due).days),
            "responsibleProvider": provider,
            "supervisor": supervisor,
            "step": step,
            "idempotencyKey": key,
        },
    )


async def distribute_version(uow: UnitOfWork, row: dict, now: datetime) -> bool:
    """Send the current version to its care team once; False when already sent or nobody to."""
    version = row["current_version"]
    to = recipients(row["author"], list(row["care_team"] or []))
    if not version or not to:
        return False
    already = (await uow.session.execute(select(func.count()).select_from(distributions).where(
        distributions.c.tracker_id == row["id"], distributions.c.version_id == version))).scalar()
    if already:
        return False
    ins = insert_for(uow.session)
    for ref in to:
        await uow.session.execute(ins(distributions).values(
            tracker_id=row["id"], version_id=version, recipient=ref, practice=row["practice"],
            distributed_at=now, acknowledged_at=None,
        ).on_conflict_do_nothing())
    key = f"{row['practice']}:{row['id']}:distributed:{version}"
    event = CloudEvent(
        id=event_id(key), source=SOURCE, type="careplan.plan.distributed.v1", time=now,
        tenant=row["practice"], subject=row["patient"],
        data={"tracker": row["id"], "carePlan": row["care_plan"], "patient": row["patient"],
              "versionId": version, "recipients": to, "idempotencyKey": key},
    )
    await uow.outbox.add(event.type, event)
    return True


async def lock_tracker(session: AsyncSession, practice: str, tracker: str) -> dict | None:
    row = (await session.execute(
        select(trackers).where(trackers.c.id == tracker, trackers.c.practice == practice)
        .with_for_update()
    )).first()
    return dict(row._mapping) if row is not None else None
