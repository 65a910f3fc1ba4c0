"""The review clock and the reminder/escalation schedule, as pure functions of dates and rules.

A review cycle is identified by its due date. Everything the scheduler may send for a cycle is a
``Step`` with a deterministic (kind, step, date); the idempotency key of its event is built from
them, so any number of scheduler replicas — or a restarted one — agree on what is owed.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import MAXYEAR, MINYEAR, date

from ccm_careplan.domain.rules import ReviewRules

DUE, REMINDER, OVERDUE, ESCALATED = "due", "reminder", "overdue", "escalated"
COMPLETED, RESOLVED = "completed", "resolved"
SCHEDULED_KINDS = (DUE, REMINDER, OVERDUE, ESCALATED)
_LAST_DAY = date.max.toordinal()  # 9999-12-31: date arithmetic past it raises


@dataclass(frozen=True, order=True)
class Step:
    """One thing owed for a cycle: ``kind`` number ``step`` becomes due ``on`` that date."""

    on: date
    kind: str
    step: int


def add_months(day: date, months: int) -> date | None:
    """Calendar months later; the 31st becomes the month's last day (Jan 31 + 1 = Feb 28/29).
    None when that month is off the calendar (past December 9999)."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    if not MINYEAR <= year <= MAXYEAR:
        return None
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def days_after(day: date, days: int) -> date | None:
    """``day`` plus ``days``, or None past the calendar's last day (9999-12-31): a day that
    never comes, so nothing scheduled for it is ever owed."""
    ordinal = day.toordinal() + days
    return date.fromordinal(ordinal) if ordinal <= _LAST_DAY else None


def days_before(day: date, days: int) -> date:
    """``day`` minus ``days``, on the calendar's first day (0001-01-01) at the earliest: a
    reminder due before the calendar began is owed from its first day, long past."""
    return date.fromordinal(max(day.toordinal() - days, 1))


def next_review_due(
    *, anchor: date, early_trigger: date | None, rules: ReviewRules
) -> date:
    """Due date of the next review: ``anchor`` (last review, else plan creation) plus the
    interval, brought forward to ``early_trigger`` + N days after a clinical change."""
    # A due date past the calendar's last day (a plan dated in 9999, which ingest accepts: the
    # overflow dead-lettered its creation event, never tracked) is that day. The plan stays
    # tracked, as current, sorted after every real due date, and the date says plainly that its
    # interval runs off the calendar; "no review due" (None) would show an active plan as not
    # scheduled (review_state "inactive").
    due = add_months(anchor, rules.review_interval_months) or date.max
    if early_trigger is not None and early_trigger > anchor:
        due = min(due, days_after(early_trigger, rules.early_review_within_days) or date.max)
    return due


def reminder_dates(due: date, rules: ReviewRules, until: date) -> list[date]:
    """Dates of reminders 1, 2, …: before due at each offset, then every M days while overdue
    (none past the calendar's last day)."""
    dates = [days_before(due, d) for d in sorted(rules.reminder_days_before_due, reverse=True)]
    every = rules.overdue_reminder_every_days
    j = 1
    while (day := days_after(due, j * every)) is not None and day <= until:
        dates.append(day)
        j += 1
    return dates


def first_escalation(due: date, rules: ReviewRules) -> date | None:
    """Escalate once overdue more than X days, or after the K-th reminder — never before due;
    None when that day would be past the calendar's last (it never comes)."""
    overdue = days_after(due, 1)
    by_days = days_after(due, rules.escalate_after_days_overdue + 1)
    k = rules.escalate_after_reminders
    if k <= 0 or overdue is None:
        return by_days
    before = len(rules.reminder_days_before_due)
    if k <= before:
        kth = reminder_dates(due, rules, due)[k - 1]
    else:
        kth = days_after(due, (k - before) * rules.overdue_reminder_every_days)
    earliest = min((d for d in (by_days, kth) if d is not None), default=None)
    return None if earliest is None else max(overdue, earliest)


def planned_steps(due: date, rules: ReviewRules, until: date) -> list[Step]:
    """Every step of the cycle due on or before ``until``, in date order."""
    # The due notice goes out on the due date itself, never on a reminder's day: notification
    # turns both into a message to the provider, who should not get two at once.
    steps = [Step(due, DUE, 0)]
    steps += [Step(d, REMINDER, i) for i, d in enumerate(reminder_dates(due, rules, until), 1)]
    if (overdue := days_after(due, 1)) is not None:
        steps.append(Step(overdue, OVERDUE, 0))
    escalation = first_escalation(due, rules)
    level = 1
    while escalation is not None and escalation <= until:
        steps.append(Step(escalation, ESCALATED, level))
        if rules.escalation_repeat_days <= 0:
            break
        level += 1
        escalation = days_after(escalation, rules.escalation_repeat_days)
    return sorted(s for s in steps if s.on <= until)


@dataclass(frozen=True)
class Decision:
    step: Step
    send: bool  # False: recorded as superseded by a later step of the same kind


def steps_owed(
    due: date, rules: ReviewRules, today: date, recorded: dict[tuple[str, int], date]
) -> list[Decision]:
    """What a scheduler pass must record for this cycle today.

    ``recorded`` maps (kind, step) already recorded for the cycle to its scheduled date. Of the
    unrecorded steps of one kind that are due, only the latest is sent, and only when it is later
    than anything of that kind already recorded; the others are recorded as superseded. A
    scheduler that was down a week therefore sends one current reminder, not a burst of stale
    ones, and no step is ever left unaccounted for.
    """
    decisions: list[Decision] = []
    planned = planned_steps(due, rules, today)
    for kind in SCHEDULED_KINDS:
        pending = [s for s in planned if s.kind == kind and (s.kind, s.step) not in recorded]
        if not pending:
            continue
        latest_recorded = max(
            (on for (k, _), on in recorded.items() if k == kind), default=None
        )
        newest = max(pending)
        for s in pending:
            send = s is newest and (latest_recorded is None or s.on > latest_recorded)
            decisions.append(Decision(s, send))
    return sorted(decisions, key=lambda d: d.step)


def review_state(
    *, next_due: date | None, today: date, rules: ReviewRules, escalation_level: int,
    scheduled: bool,
) -> str:
    """What a coordinator sees: current, due, overdue, escalated (or inactive)."""
    if not scheduled or next_due is None:
        return "inactive"
    if escalation_level > 0:
        return "escalated"
    if today > next_due:
        return "overdue"
    if (next_due - today).days <= rules.due_window_days:
        return "due"
    return "current"


def idempotency_key(tenant: str, tracker: str, kind: str, due: date, step: int) -> str:
    return f"{tenant}:{tracker}:{kind}:{due.isoformat()}:{step}"
