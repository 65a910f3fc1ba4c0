"""What users change: reviews and sign-offs, acknowledgements, the practice's rules."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import select, update

from ccm_careplan.adapters.orm import distributions, practice_rules, review_steps, trackers
from ccm_careplan.domain.rules import DEFAULT_RULES, ReviewRules, rules_from_dict, validate_rules
from ccm_careplan.domain.schedule import ESCALATED, idempotency_key
from ccm_careplan.domain.tracker import REVIEW_OUTCOMES, resolve_provider
from ccm_careplan.service_layer.common import (
    compute_due,
    event_id,
    general_practitioners,
    insert_for,
    load_rules,
    lock_tracker,
    practice_today,
    practitioner_directory,
    review_event,
    rules_lock,
)
from ccm_careplan.service_layer.tracking import complete_review
from ccm_shared.db import UnitOfWork, xact_lock


class TrackerNotFound(Exception):
    pass


class ReviewRejected(Exception):
    """A review that cannot be recorded as given (the message says why)."""


class PlanClosed(Exception):
    """The plan is closed at the source; it is no longer reviewed."""


class RecipientNotFound(Exception):
    pass


class RulesChanged(Exception):
    """If-Match named a revision that is no longer current."""


@dataclass(frozen=True)
class RecordReview:
    practice: str
    tracker: str
    reviewer: str
    review_date: date | None
    outcome: str
    notes: str | None


async def record_review(uow: UnitOfWork, cmd: RecordReview, now: datetime) -> None:
    row = await lock_tracker(uow.session, cmd.practice, cmd.tracker)
    if row is None:
        raise TrackerNotFound(cmd.tracker)
    if row["status"] != "active":
        raise PlanClosed(f"the care plan is {row['status']}; only active plans are reviewed")
    if cmd.outcome not in REVIEW_OUTCOMES:
        raise ReviewRejected(f"outcome must be one of {', '.join(REVIEW_OUTCOMES)}")
    today = await practice_today(uow.session, cmd.practice, now)
    day = cmd.review_date or today
    if day > today:
        raise ReviewRejected(f"review date {day} is in the future (today is {today})")
    if row["last_review"] is not None and day < row["last_review"]:
        raise ReviewRejected(
            f"review date {day} is before the last recorded review ({row['last_review']})")
    # A plan cannot be reviewed before it existed: the earlier of its `created` (else
    # `period.start`, which may lie ahead) and the day of the first version we saw.
    began = min(d for d in (row["created"], row["first_seen"]) if d is not None)
    if day < began:
        raise ReviewRejected(f"review date {day} is before the care plan began ({began})")
    rules = await load_rules(uow.session, cmd.practice)
    await complete_review(uow, row, rules=rules, review_date=day, reviewer=cmd.reviewer,
                          outcome=cmd.outcome, notes=cmd.notes, source="api", version_id=
                          row["current_version"], now=now)


async def acknowledge(
    uow: UnitOfWork, *, practice: str, tracker: str, recipient: str, version: str | None,
    now: datetime,
) -> None:
    """A care-team member confirms receipt of a plan version (the current one by default)."""
    row = await lock_tracker(uow.session, practice, tracker)
    if row is None:
        raise TrackerNotFound(tracker)
    version = version or row["current_version"]
    where = (distributions.c.tracker_id == tracker, distributions.c.version_id == version,
             distributions.c.recipient == recipient)
    found = (await uow.session.execute(select(distributions.c.acknowledged_at).where(*where))
             ).first()
    if found is None:
        raise RecipientNotFound(f"{recipient} did not receive version {version} of this plan")
    if found.acknowledged_at is None:
        await uow.session.execute(update(distributions).where(*where).values(acknowledged_at=now))


async def rules_revision(uow: UnitOfWork, practice: str) -> int:
    return (await uow.session.execute(select(practice_rules.c.revision).where(
        practice_rules.c.practice == practice))).scalar() or 0


async def replace_rules(
    uow: UnitOfWork, practice: str, rules: ReviewRules, *, if_match: int | None, now: datetime
) -> int:
    """Store the practice's rules and move every plan's due date to match. Returns the revision."""
    validate_rules(rules)
    # First, before any row: an event creating a plan holds it shared (a practice's first
    # rules have no row yet to wait on: that plan kept the defaults' due date).
    await xact_lock(uow.session, rules_lock(practice))
    while True:
        # The rules this change replaces, read under the row's lock (a concurrent change is
        # waited for here): whether the supervisor changed is decided against them. (Read before
        # that wait, they were the rules the concurrent change replaced: a supervisor both set
        # was announced twice, one set back over the other's not at all.)
        stored_row = (await uow.session.execute(
            select(practice_rules.c.rules, practice_rules.c.revision)
            .where(practice_rules.c.practice == practice).with_for_update())).first()
        current = 0 if stored_row is None else stored_row.revision
        before = DEFAULT_RULES if stored_row is None else rules_from_dict(stored_row.rules)
        if if_match is not None and if_match != current:
            raise RulesChanged(f"the rules are at revision {current}, not {if_match}")
        values = {"rules": rules.to_dict(), "revision": current + 1, "updated_at": now}
        # Only over the revision read. With the row locked that is the row's revision; with no
        # row yet, a concurrent first write may insert it first: then nothing is stored here
        # and this round runs again, under its lock (unguarded, concurrent writers each stored
        # revision current + 1 and all but one were lost).
        stored = await uow.session.execute(
            insert_for(uow.session)(practice_rules).values(practice=practice, **values)
            .on_conflict_do_update(index_elements=["practice"], set_=values,
                                   where=practice_rules.c.revision == current)
            .returning(practice_rules.c.revision))
        if stored.first() is not None:
            break
    rows = (await uow.session.execute(select(trackers).where(trackers.c.practice == practice)
                                      .order_by(trackers.c.id).with_for_update())).all()
    escalated = []
    for r in rows:
        due = compute_due(dict(r._mapping), rules)
        if due != r.next_review_due:
            await uow.session.execute(update(trackers).where(trackers.c.id == r.id).values(
                next_review_due=due, reminders_sent=0, escalation_level=0, updated_at=now))
        elif r.status == "active" and r.escalation_level > 0:
            escalated.append(dict(r._mapping))
    supervisor = rules.clinical_supervisor
    if supervisor is not None and supervisor != before.clinical_supervisor and escalated:
        await reannounce_escalations(uow, practice, escalated, supervisor, revision=current + 1,
                                     now=now)
    return current + 1


async def reannounce_escalations(
    uow: UnitOfWork, practice: str, rows: list[dict], supervisor: str, *, revision: int,
    now: datetime,
) -> None:
    """The latest escalation of each escalated plan, announced again naming the supervisor the
    rules now have: one that found nobody to go to (notification holds it, unsent) goes to them
    now. The step keeps its idempotency key, so notification records it once and an escalation
    already delivered is not sent again; the event id is new (``revision``), or notification's
    inbox would drop it as the event already applied."""
    cycles = {r["id"]: r["next_review_due"] for r in rows}
    latest: dict[str, int] = {}
    for tracker, cycle, step in (await uow.session.execute(
            select(review_steps.c.tracker_id, review_steps.c.cycle_due, review_steps.c.step)
            .where(review_steps.c.practice == practice, review_steps.c.kind == ESCALATED,
                   review_steps.c.sent.is_(True),
                   review_steps.c.tracker_id.in_(list(cycles))))).all():
        if cycle == cycles[tracker]:  # the current cycle's escalations only
            latest[tracker] = max(step, latest.get(tracker, 0))
    today = await practice_today(uow.session, practice, now)
    gps = await general_practitioners(uow.session, practice, {r["patient"] for r in rows})
    directory = await practitioner_directory(uow.session, practice)
    events = []
    for row in rows:
        if row["id"] not in latest:
            continue
        due, step = row["next_review_due"], latest[row["id"]]
        key = idempotency_key(practice, row["id"], ESCALATED, due, step)
        event = review_event(row=row, kind=ESCALATED, due=due, step=step, day=today, key=key,
                             now=now, provider=resolve_provider(
                                 row["author"], gps.get(row["patient"], []), directory),
                             supervisor=supervisor)
        events.append(event.model_copy(update={"id": event_id(f"{key}:rules:{revision}")}))
    await uow.outbox.add_many([(e.type, e) for e in events])
