"""What users change: reviews and sign-offs, acknowledgements, the practice's rules."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import select, update

from ccm_careplan.adapters.orm import distributions, practice_rules, trackers
from ccm_careplan.domain.rules import ReviewRules, validate_rules
from ccm_careplan.domain.tracker import REVIEW_OUTCOMES
from ccm_careplan.service_layer.common import (
    compute_due,
    insert_for,
    load_rules,
    lock_tracker,
    practice_today,
)
from ccm_careplan.service_layer.tracking import complete_review
from ccm_shared.db import UnitOfWork


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
    while True:
        current = await rules_revision(uow, practice)
        if if_match is not None and if_match != current:
            raise RulesChanged(f"the rules are at revision {current}, not {if_match}")
        values = {"rules": rules.to_dict(), "revision": current + 1, "updated_at": now}
        # Only over the revision read: a concurrent write that committed since (this statement
        # waits for it) leaves nothing stored here, and the revision is read again (unguarded,
        # concurrent writers each stored revision current + 1 and all but one were lost).
        stored = await uow.session.execute(
            insert_for(uow.session)(practice_rules).values(practice=practice, **values)
            .on_conflict_do_update(index_elements=["practice"], set_=values,
                                   where=practice_rules.c.revision == current)
            .returning(practice_rules.c.revision))
        if stored.first() is not None:
            break
    rows = (await uow.session.execute(select(trackers).where(trackers.c.practice == practice)
                                      .with_for_update())).all()
    for r in rows:
        due = compute_due(dict(r._mapping), rules)
        if due != r.next_review_due:
            await uow.session.execute(update(trackers).where(trackers.c.id == r.id).values(
                next_review_due=due, reminders_sent=0, escalation_level=0, updated_at=now))
    return current + 1
