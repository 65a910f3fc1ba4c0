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
# Steps addressed to the plan's responsible provider (escalations go to the supervisor).
TO_RESPONSIBLE_PROVIDER = frozenset({DUE, REMINDER, OVERDUE})
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


def within(day: date, days: int) -> date:
    """``days`` after ``day``, or the calendar's last day when that is past it: a window's end."""
    return days_after(day, days) or date.max


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
        due = min(due, within(early_trigger, rules.early_review_within_days))
    return due


# Reminders are numbered in date order: 1…n at the offsets before due (earliest first), then
# one every `overdue_reminder_every_days` while overdue. `_reminder_day` and
# `_reminders_on_or_before` are the one statement of that rule, and each other's inverse.


def _reminder_day(due: date, rules: ReviewRules, n: int) -> date | None:
    """The day of reminder number ``n`` (1 on); None when past the calendar's last day."""
    offsets = sorted(rules.reminder_days_before_due, reverse=True)
    if n <= len(offsets):
        return days_before(due, offsets[n - 1])
    return days_after(due, (n - len(offsets)) * rules.overdue_reminder_every_days)


def _reminders_on_or_before(due: date, rules: ReviewRules, day: date) -> int:
    """How many reminders fall on or before ``day``: they are numbered in date order, so these
    are reminders 1…n."""
    before = sum(1 for d in rules.reminder_days_before_due if days_before(due, d) <= day)
    return before + max(0, (day - due).days) // rules.overdue_reminder_every_days


def reminder_dates(due: date, rules: ReviewRules, until: date) -> list[date]:
    """Dates of reminders 1, 2, …: before due at each offset, then every M days while overdue,
    up to ``until`` (none past the calendar's last day)."""
    overdue = max(0, (until - due).days) // rules.overdue_reminder_every_days
    return [_reminder_day(due, rules, n)
            for n in range(1, len(rules.reminder_days_before_due) + overdue + 1)]


def first_escalation(due: date, rules: ReviewRules) -> date | None:
    """Escalate once overdue more than X days, or after the K-th reminder — never before due;
    None when that day would be past the calendar's last (it never comes)."""
    overdue = days_after(due, 1)
    by_days = days_after(due, rules.escalate_after_days_overdue + 1)
    k = rules.escalate_after_reminders
    if k <= 0 or overdue is None:
        return by_days
    kth = _reminder_day(due, rules, k)
    earliest = min((d for d in (by_days, kth) if d is not None), default=None)
    return None if earliest is None else max(overdue, earliest)


def _count_on_or_before(due: date, rules: ReviewRules, kind: str, day: date | None) -> int:
    """How many reminders or escalations (numbered 1…n in date order) fall on or before ``day``
    (None: the day before the calendar's first)."""
    if day is None:
        return 0
    if kind == REMINDER:
        return _reminders_on_or_before(due, rules, day)
    first = first_escalation(due, rules)
    if first is None or first > day:
        return 0
    if rules.escalation_repeat_days <= 0:
        return 1
    return (day - first).days // rules.escalation_repeat_days + 1


def _numbered(due: date, rules: ReviewRules, kind: str, first: int, last: int) -> list[Step]:
    """Reminders or escalations number ``first`` to ``last`` (all on the calendar)."""
    if kind == REMINDER:
        return [Step(_reminder_day(due, rules, n), REMINDER, n) for n in range(first, last + 1)]
    start, repeat = first_escalation(due, rules), rules.escalation_repeat_days
    return [Step(date.fromordinal(start.toordinal() + (n - 1) * repeat), ESCALATED, n)
            for n in range(first, last + 1)]


def _day_before(day: date) -> date | None:
    return None if day == date.min else date.fromordinal(day.toordinal() - 1)


def _notices(due: date) -> list[Step]:
    """The due and overdue notices: one of each per cycle."""
    overdue = days_after(due, 1)
    return [Step(due, DUE, 0)] + ([] if overdue is None else [Step(overdue, OVERDUE, 0)])


def planned_steps(
    due: date, rules: ReviewRules, until: date, since: date = date.min
) -> list[Step]:
    """Every step of the cycle due on or before ``until`` (and on or after ``since``), in date
    order."""
    # The due notice goes out on the due date itself, never on a reminder's day: notification
    # turns both into a message to the provider, who should not get two at once.
    steps = _notices(due)
    # Reminders and escalations are computed from their numbers for the days asked for only:
    # a cycle due in year 2 (a plan created on 0001-01-01) has 130,000 of them by now.
    for kind in (REMINDER, ESCALATED):
        steps += _numbered(due, rules, kind,
                           _count_on_or_before(due, rules, kind, _day_before(since)) + 1,
                           _count_on_or_before(due, rules, kind, until))
    return sorted(s for s in steps if since <= s.on <= until)


# How far back a pass records each owed step on its own: two years (with a leap day). A plan
# overdue for less than that, or a scheduler down for less than that, records exactly what it
# always did. Only a plan whose dates lie years in the past owes older steps (a CarePlan created
# on 0001-01-01, which FHIR allows and an EHR can send by mistake, owed 130,000, all written in
# one pass of the scheduler every practice shares): the newest of them is recorded as superseded
# and stands for all of them. A pass thus records at most two years of steps per plan (about
# 135 under the default rules, under 1,500 with daily reminders and escalations), and what the
# plan shows (overdue, its escalation level, the latest step to each person, sent) is what it
# would be without the bound. Fixed rather than one review interval: a monthly-review practice
# whose scheduler was down for five weeks still gets each missed step recorded on its own.
CATCH_UP_DAYS = 731


@dataclass(frozen=True)
class Decision:
    step: Step
    send: bool  # False: recorded as superseded by a later step of the same kind
    stands_for: int = 1  # steps the record accounts for: itself and the owed ones before it


def steps_owed(
    due: date, rules: ReviewRules, today: date, recorded: dict[tuple[str, int], date]
) -> list[Decision]:
    """What a scheduler pass must record for this cycle today.

    ``recorded`` maps (kind, step) already recorded for the cycle to its scheduled date. A step
    is owed when its number is above every recorded one of its kind: steps are numbered in date
    order and each pass records all that are due, so what is recorded is always steps 1…n (less
    those a catch-up record stands for). Of the owed steps addressed to one person, only the
    latest is sent (the responsible provider's reminders and due/overdue notices together, the
    supervisor's escalations apart), and only when it is later than anything addressed to them
    already recorded; the others are recorded as superseded. A scheduler that was down a week,
    or a plan pushed when its review is long overdue, therefore sends the provider one current
    message, not a burst of stale ones, and no step is ever left unaccounted for. Owed steps
    due before the last ``CATCH_UP_DAYS``, other than the latest, are recorded as one: the
    newest of them, superseded, with ``stands_for`` saying how many steps it accounts for.
    """
    since = days_before(today, CATCH_UP_DAYS)
    recent = planned_steps(due, rules, today, since)
    decisions: list[Decision] = []
    pending: list[Step] = []
    for kind in SCHEDULED_KINDS:
        done = max((n for k, n in recorded if k == kind), default=-1)
        owed = [s for s in recent if s.kind == kind and s.step > done]
        if kind in (DUE, OVERDUE):  # one of each per cycle: nothing to bound
            owed += [s for s in _notices(due) if s.kind == kind and s.on < since
                     and s.step > done]
        else:  # owed: numbers floor+1 on; those up to last_old fell due before the window
            floor = max(done, 0)
            last_old = _count_on_or_before(due, rules, kind, _day_before(since))
            if last_old > floor and not owed:  # the latest owed step is old: sent as ever
                owed, last_old = _numbered(due, rules, kind, last_old, last_old), last_old - 1
            if last_old > floor:
                (step,) = _numbered(due, rules, kind, last_old, last_old)
                decisions.append(Decision(step, False, last_old - floor))
        pending += owed
    for audience in (TO_RESPONSIBLE_PROVIDER, frozenset({ESCALATED})):
        mine = [s for s in pending if s.kind in audience]
        if not mine:
            continue
        latest_recorded = max(
            (on for (k, _), on in recorded.items() if k in audience), default=None
        )
        # The newest; on one day a due or overdue notice says more than a reminder.
        newest = max(mine, key=lambda s: (s.on, s.kind != REMINDER))
        for s in mine:
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
