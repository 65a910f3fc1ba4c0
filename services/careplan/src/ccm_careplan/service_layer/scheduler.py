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
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import structlog
from sqlalchemy import func, select, update

from ccm_careplan.adapters.orm import patients, review_steps, trackers
from ccm_careplan.domain.rules import ReviewRules
from ccm_careplan.domain.schedule import ESCALATED, REMINDER, steps_owed
from ccm_careplan.service_layer.common import (
    emit_review_event,
    load_rules,
    practice_today,
    record_step,
    responsible_provider,
)
from ccm_shared.db import Database, UnitOfWork

log = structlog.get_logger(__name__)


@dataclass
class PassResult:
    trackers: int = 0
    sent: int = 0
    superseded: int = 0


async def _process(
    uow: UnitOfWork, row: dict, rules: ReviewRules, today: date, now: datetime, result: PassResult
) -> None:
    due = row["next_review_due"]
    recorded = {
        (r.kind, r.step): r.scheduled_on
        for r in (await uow.session.execute(
            select(review_steps.c.kind, review_steps.c.step, review_steps.c.scheduled_on).where(
                review_steps.c.tracker_id == row["id"], review_steps.c.cycle_due == due))).all()
    }
    decisions = steps_owed(due, rules, today, recorded)
    if not decisions:
        return
    provider = await responsible_provider(uow.session, row["practice"], row)
    for decision in decisions:
        s = decision.step
        key = await record_step(uow, practice=row["practice"], tracker=row["id"], kind=s.kind,
                                due=due, step=s.step, scheduled_on=s.on, send=decision.send,
                                now=now)
        if key is None:
            continue  # another replica got there first
        if decision.send:
            await emit_review_event(uow, row=row, kind=s.kind, due=due, step=s.step, day=today,
                                    key=key, now=now, provider=provider,
                                    supervisor=rules.clinical_supervisor)
            result.sent += 1
        else:
            result.superseded += 1
    counts = (await uow.session.execute(
        select(review_steps.c.kind, func.count(), func.max(review_steps.c.step)).where(
            review_steps.c.tracker_id == row["id"], review_steps.c.cycle_due == due,
            review_steps.c.sent.is_(True), review_steps.c.kind.in_((REMINDER, ESCALATED)))
        .group_by(review_steps.c.kind))).all()
    by_kind = {kind: (n, top) for kind, n, top in counts}
    await uow.session.execute(update(trackers).where(trackers.c.id == row["id"]).values(
        reminders_sent=by_kind.get(REMINDER, (0, 0))[0],
        escalation_level=by_kind.get(ESCALATED, (0, 0))[1], updated_at=now))


async def _practice_pass(
    db: Database, practice: str, now: datetime, batch_size: int, result: PassResult
) -> None:
    async with db.unit_of_work() as uow:
        rules = await load_rules(uow.session, practice)
        today = await practice_today(uow.session, practice, now)
    horizon = today + timedelta(days=rules.due_window_days)
    unusable = (
        select(patients.c.patient).where(
            patients.c.practice == practice,
            (patients.c.active.is_(False)) | patients.c.deceased | patients.c.deleted)
    )
    after = ""
    while True:
        async with db.unit_of_work() as uow:
            rows = (await uow.session.execute(
                select(trackers).where(
                    trackers.c.practice == practice, trackers.c.status == "active",
                    trackers.c.next_review_due <= horizon, trackers.c.id > after,
                    trackers.c.patient.not_in(unusable))
                .order_by(trackers.c.id).limit(batch_size)
                .with_for_update(skip_locked=True))).all()
            if not rows:
                return
            for r in rows:
                await _process(uow, dict(r._mapping), rules, today, now, result)
            await uow.commit()
        result.trackers += len(rows)
        after = rows[-1].id


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
        await _practice_pass(db, practice, now, batch_size, result)
    if result.sent or result.superseded:
        log.info("scheduler pass", trackers=result.trackers, sent=result.sent,
                 superseded=result.superseded)
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
        try:
            await asyncio.wait_for(stopping.wait(), timeout=interval)
        except TimeoutError:
            pass
