"""Per-practice review rules: when reviews fall due, when reminders go out, when to escalate.

Rules are data; the schedule (``schedule.py``) is a pure function of them. Every field has a
default so a practice that never configured anything still gets a complete, safe workflow.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

PRACTITIONER_REF = re.compile(r"^(Practitioner|PractitionerRole)/[A-Za-z0-9\-\.]{1,64}$")


class InvalidRules(Exception):
    """Rules that cannot drive a schedule; the message says which field and why."""


@dataclass(frozen=True)
class ReviewRules:
    """How one practice runs care-plan reviews (defaults documented in the service README)."""

    review_interval_months: int = 12
    reminder_days_before_due: tuple[int, ...] = (30, 14, 7)
    overdue_reminder_every_days: int = 7
    escalate_after_days_overdue: int = 30
    escalate_after_reminders: int = 8
    escalation_repeat_days: int = 30
    early_review_within_days: int = 30
    clinical_supervisor: str | None = None
    early_review_on_plan_revision: bool = True
    early_review_on_new_chronic_condition: bool = True

    @property
    def due_window_days(self) -> int:
        """A review counts as "due" this many days before its due date."""
        return max(self.reminder_days_before_due, default=0)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["reminder_days_before_due"] = list(self.reminder_days_before_due)
        return data


DEFAULT_RULES = ReviewRules()

_LIMITS: dict[str, tuple[int, int]] = {
    "review_interval_months": (1, 24),
    "overdue_reminder_every_days": (1, 90),
    "escalate_after_days_overdue": (0, 365),
    "escalate_after_reminders": (0, 100),
    "escalation_repeat_days": (0, 365),
    "early_review_within_days": (0, 365),
}


_SWITCHES = ("early_review_on_plan_revision", "early_review_on_new_chronic_condition")


def _integer(value: object) -> bool:
    """A JSON integer: not a string of digits, not a float, not a boolean (``True == 1``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def validate_rules(rules: ReviewRules) -> ReviewRules:
    """Return ``rules`` unchanged or raise InvalidRules naming every problem."""
    problems: list[str] = []
    for name, (low, high) in _LIMITS.items():
        value = getattr(rules, name)
        if not _integer(value) or not low <= value <= high:
            problems.append(f"{name} must be an integer from {low} to {high}")
    offsets = rules.reminder_days_before_due
    if not isinstance(offsets, list | tuple):
        problems.append("reminder_days_before_due must be a list of days")
    elif len(offsets) > 10:
        problems.append("reminder_days_before_due takes at most 10 offsets")
    elif any(not _integer(d) or not 1 <= d <= 180 for d in offsets):
        problems.append("reminder_days_before_due offsets must be integers from 1 to 180")
    elif len(set(offsets)) != len(offsets):
        problems.append("reminder_days_before_due offsets must be distinct")
    for name in _SWITCHES:
        if not isinstance(getattr(rules, name), bool):
            problems.append(f"{name} must be true or false")
    if rules.clinical_supervisor is not None and not PRACTITIONER_REF.match(
        rules.clinical_supervisor
    ):
        problems.append(
            "clinical_supervisor must be a Practitioner/{id} or PractitionerRole/{id} reference"
        )
    if problems:
        raise InvalidRules("; ".join(problems))
    return rules


def rules_from_dict(data: dict) -> ReviewRules:
    """Stored or submitted rules → ReviewRules; missing fields take their defaults."""
    known = {k: v for k, v in data.items() if k in ReviewRules.__dataclass_fields__}
    offsets = known.get("reminder_days_before_due")
    if isinstance(offsets, list):
        known["reminder_days_before_due"] = tuple(offsets)
    rules = validate_rules(ReviewRules(**known))  # before sorting: "30" and 7 do not compare
    return replace(rules, reminder_days_before_due=tuple(
        sorted(rules.reminder_days_before_due, reverse=True)))


