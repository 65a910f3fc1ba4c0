"""The review clock and the reminder/escalation schedule, as pure functions of dates and rules.

A review cycle is identified by its due date. Everything the scheduler may send for a cycle is a
``Step`` with a deterministic (kind, step, date); the idempotency key of its event is built from
them, so any number of scheduler replicas — or a restarted one — agree on what is owed.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import date, timedelta

from ccm_careplan.domain.rules import ReviewRules

DUE, REMINDER, OVERDUE, ESCALATED = "due", "reminder", "overdue", "escalated"
COMPLETED, RESOLVED = "completed", "resolved"
SCHEDULED_KINDS = (DUE, REMINDER, OVERDUE, ESCALATED)


@dataclass(frozen=True, order=True)
class Step:
    """One thing owed for a cycle: ``kind`` number ``step`` becomes due ``on`` that date."""

    on: date
    kind: str
    step: int


def add_months(day: date, months: int) -> date:
    """Calendar months later; the 31st becomes the month's last day (Jan 31 + 1 = Feb 28/29)."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def next_review_due(
    *, anchor: date, early_trigger: date | None, rules: ReviewRules
) -> date:
    """Due date of the next review: ``anchor`` (last review, else plan creation) plus the
    interval, brought forward to ``early_trigger`` + N days after a clinical change."""
    due = add_months(anchor, rules.review_interval_months)
    if early_trigger is not None and early_trigger > anchor:
        due = min(due, early_trigger + timedelta(days=rules.early_review_within_days))
    return due


def reminder_dates(due: date, rules: ReviewRules, until: date) -> list[date]:
    """Dates of reminders 1, 2, …: before due at each offset, then every M days while overdue."""
    dates = [due - timedelta(days=d) for d in sorted(rules.reminder_days_before_due, reverse=True)]
    every = rules.overdue_reminder_every_days
    j = 1
    while due + timedelta(days=j * every) <= until:
        dates.append(due + timedelta(days=j * every))
        j += 1
    return dates


def first_escalation(due: date, rules: ReviewRules) -> date:
    """Escalate once overdue more than X days, or after the K-th reminder — never before due."""
    by_days = due + timedelta(days=rules.escalate_after_days_overdue + 1)
    k = rules.escalate_after_reminders
    if k <= 0:
        return by_days
    before = len(rules.reminder_days_before_due)
    if k <= before:
        kth = reminder_dates(due, rules, due)[k - 1]
    else:
        kth = due + timedelta(days=(k - before) * rules.overdue_reminder_every_days)
    return max(due + timedelta(days=1), min(by_days, kth))


def planned_steps(due: date, rules: ReviewRules, until: date) -> list[Step]:
    """Every step of the cycle due on or before ``until``, in date order."""
    # The due notice goes out on the due date itself, never on a reminder's day: notification
    # turns both into a message to the provider, who should not get two at once.
    steps = [Step(due, DUE, 0)]
    steps += [Step(d, REMINDER, i) for i, d in enumerate(reminder_dates(due, rules, until), 1)]
    steps.append(Step(due + timedelta(days=1), OVERDUE, 0))
    escalation = first_escalation(due, rules)
    level = 1
    while escalation <= until:
        steps.append(Step(escalation, ESCALATED, level))
        if rules.escalation_repeat_days <= 0:
            break
        level += 1
        escalation += timedelta(days=rules.escalation_repeat_days)
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
