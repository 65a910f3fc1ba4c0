"""The review scheduler: one pass sends every reminder, overdue notice and escalation owed today.

Safe with any number of replicas: each tracker is processed under a row lock taken with SKIP
LOCKED (replicas share the work instead of queueing), and every step is claimed by inserting its
idempotency key, the primary key of ``review_steps``, in the same transaction as its outbox event.
A step is sent at most once whatever runs concurrently, and a restarted scheduler picks up
exactly the steps no pass has recorded yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

import structlog
from sqlalchemy import bindparam, select, update

from ccm_careplan.adapters.orm import patients, review_steps, trackers
from ccm_careplan.domain.rules import ReviewRules
from ccm_careplan.domain.schedule import (
    ESCALATED,
    REMINDER,
    TO_RESPONSIBLE_PROVIDER,
    steps_owed,
    within,
)
from ccm_careplan.domain.tracker import Directory, resolve_provider
from ccm_careplan.service_layer.common import (
    StepClaim,
    claim_steps,
    general_practitioners,
    load_rules,
    practice_today,
    practitioner_directory,
    review_event,
)
from ccm_shared.db import Database, UnitOfWork
from ccm_shared.service import sleep_unless_stopped

log = structlog.get_logger(__name__)


@dataclass
class PassResult:
    trackers: int = 0
    sent: int = 0
    superseded: int = 0
    caught_up: int = 0  # owed steps older than CATCH_UP_DAYS left without a row (schedule.py)
    held: int = 0  # owed reminders and notices left unrecorded: no responsible provider yet
    failed: list[str] = field(default_factory=list)  # practices whose pass failed (retried next)


@dataclass
class _Batch:
    """What a batch of plans needs, loaded with one query each instead of one per plan."""

    rules: ReviewRules
    today: date
    now: datetime
    directory: dict[str, Directory]
    gps: dict[str, list[str]]
    recorded: dict[tuple[str, date], list]


async def _process_batch(
    uow: UnitOfWork, rows: list[dict], batch: _Batch, result: PassResult
) -> None:
    owed: list[tuple[dict, StepClaim, int]] = []
    providers: dict[str, str | None] = {}
    for row in rows:
        due = row["next_review_due"]
        recorded = batch.recorded.get((row["id"], due), [])
        provider = providers[row["id"]] = resolve_provider(
            row["author"], batch.gps.get(row["patient"], []), batch.directory)
        for d in steps_owed(due, batch.rules, batch.today,
                            {(r.kind, r.step): r.scheduled_on for r in recorded}):
            if provider is None and d.step.kind in TO_RESPONSIBLE_PROVIDER:
                # Nobody to send it to: not recorded, so it stays owed and a later pass sends
                # it once the plan has an author or the patient a general practitioner (the
                # tracker shows why it waits). Escalations still go to the supervisor.
                result.held += 1
                continue
            owed.append((row, StepClaim(row["practice"], row["id"], d.step.kind, due,
                                        d.step.step, d.step.on, d.send), d.stands_for))
    claimed = await claim_steps(uow, [c for _, c, _ in owed], batch.now)  # a replica may have won
    sent: dict[str, list[tuple[str, int]]] = {}
    events = []
    for row, claim, stands_for in owed:
        if claim.key not in claimed:
            continue
        if stands_for > 1:
            # Years of owed steps at once: almost always a plan dated by mistake (created on
            # 0001-01-01), worth a look at the EHR's resource.
            result.caught_up += stands_for - 1
            log.warning("care plan owed steps from years back; one record stands for them",
                        tracker=row["id"],
                        care_plan=row["care_plan"], cycle_due=claim.due.isoformat(),
                        kind=claim.kind, stands_for=stands_for)
        if not claim.send:
            result.superseded += 1
            continue
        events.append(review_event(row=row, kind=claim.kind, due=claim.due, step=claim.step,
                                   day=batch.today, key=claim.key, now=batch.now,
                                   provider=providers[row["id"]],
                                   supervisor=batch.rules.clinical_supervisor))
        sent.setdefault(row["id"], []).append((claim.kind, claim.step))
        result.sent += 1
    await uow.outbox.add_many([(e.type, e) for e in events])  # one statement for the batch
    counts = []
    for row in rows:
        if row["id"] not in sent:
            continue
        steps = sent[row["id"]] + [
            (r.kind, r.step) for r in batch.recorded.get((row["id"], row["next_review_due"]), [])
            if r.sent]
        reminders = sum(1 for kind, _ in steps if kind == REMINDER)
        level = max((step for kind, step in steps if kind == ESCALATED), default=0)
        if (reminders, level) != (row["reminders_sent"], row["escalation_level"]):
            counts.append({"tracker": row["id"], "reminders": reminders, "level": level,
                           "now": batch.now})
    if counts:
        await uow.session.execute(_COUNTS, counts)


# A tracker's reminder count and escalation level after a batch (built once, run for many).
_COUNTS = update(trackers).where(trackers.c.id == bindparam("tracker")).values(
    reminders_sent=bindparam("reminders"), escalation_level=bindparam("level"),
    updated_at=bindparam("now"))


async def _practice_pass(
    db: Database, practice: str, now: datetime, batch_size: int, result: PassResult
) -> None:
    async with db.unit_of_work() as uow:
        rules = await load_rules(uow.session, practice)
        today = await practice_today(uow.session, practice, now)
        directory = await practitioner_directory(uow.session, practice)
    horizon = within(today, rules.due_window_days)
    unusable = (
        select(patients.c.patient).where(
            patients.c.practice == practice,
            (patients.c.active.is_(False)) | patients.c.deceased | patients.c.deleted)
    )
    after = ""
    while True:
        async with db.unit_of_work() as uow:
            rows = [dict(r._mapping) for r in (await uow.session.execute(
                select(trackers).where(
                    trackers.c.practice == practice, trackers.c.status == "active",
                    trackers.c.next_review_due <= horizon, trackers.c.id > after,
                    trackers.c.patient.not_in(unusable))
                .order_by(trackers.c.id).limit(batch_size)
                .with_for_update(skip_locked=True))).all()]
            if not rows:
                return
            # The rules again, now that the batch's plans are held: a rules change holds every
            # plan of the practice while it recomputes them, so these are the rules their due
            # dates and escalations were last set by. (Read only at the start of the pass, a
            # change committed meanwhile had later batches send by the replaced rules: an
            # escalation named the supervisor it had just replaced, and was never announced
            # again.) The horizon above may be the old rules': a plan it leaves out is the next
            # pass's.
            rules = await load_rules(uow.session, practice)
            recorded: dict[tuple[str, date], list] = {}
            for step in (await uow.session.execute(select(
                    review_steps.c.tracker_id, review_steps.c.cycle_due, review_steps.c.kind,
                    review_steps.c.step, review_steps.c.scheduled_on, review_steps.c.sent).where(
                    review_steps.c.tracker_id.in_([r["id"] for r in rows])))).all():
                recorded.setdefault((step.tracker_id, step.cycle_due), []).append(step)
            gps = await general_practitioners(uow.session, practice, {r["patient"] for r in rows})
            batch = _Batch(rules, today, now, directory, gps, recorded)
            await _process_batch(uow, rows, batch, result)
            await uow.commit()
        result.trackers += len(rows)
        after = rows[-1]["id"]


async def run_scheduler_pass(
    db: Database, now: datetime, *, batch_size: int = 200, practices: Sequence[str] | None = None
) -> PassResult:
    """Send everything owed at ``now`` (injectable, so tests travel in time), for every practice
    or only the given ones. Call it directly."""
    result = PassResult()
    if practices is None:
        async with db.unit_of_work() as uow:
            practices = (await uow.session.execute(
                select(trackers.c.practice).where(trackers.c.status == "active").distinct()
            )).scalars().all()
    for practice in sorted(practices):
        try:
            await _practice_pass(db, practice, now, batch_size, result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one practice's failure must not stop the others
            result.failed.append(practice)
            log.warning("scheduler pass failed for a practice; the others go on",
                        practice=practice, error=type(exc).__name__)
    if result.sent or result.superseded or result.failed or result.held:
        log.info("scheduler pass", trackers=result.trackers, sent=result.sent,
                 superseded=result.superseded, caught_up=result.caught_up, held=result.held,
                 failed_practices=len(result.failed))
    return result


async def run_scheduler(
    db: Database, clock, stopping: asyncio.Event, *, interval: float, batch_size: int,  # noqa: ANN001
    on_sent=None,  # noqa: ANN001
) -> None:
    """Run passes every ``interval`` seconds until ``stopping``; a failed pass is retried."""
    while not stopping.is_set():
        try:
            result = await run_scheduler_pass(db, clock(), batch_size=batch_size)
            if result.sent and on_sent is not None:
                on_sent()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep scheduling; the next pass catches up
            log.warning("scheduler pass failed; retrying", error=type(exc).__name__)
        await sleep_unless_stopped(stopping, interval)
