"""Facts the billing engine decides on, and the decision it returns. Pure dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from functools import cached_property
from typing import Literal
from zoneinfo import ZoneInfo

from ccm_shared.text import ascii_digits

Role = Literal["staff", "practitioner", "non-clinical", "unknown"]

# Decision vocabulary (rules document §7): stable identifiers, add new ones, never rename.
TIME_THRESHOLD_NOT_MET = "time-threshold-not-met"
CONSENT_MISSING = "consent-missing"
CONSENT_NOT_ACTIVE = "consent-not-active"
INSUFFICIENT_CHRONIC_CONDITIONS = "insufficient-chronic-conditions"
CARE_PLAN_MISSING = "care-plan-missing"
STAFF_ROLE_UNKNOWN = "staff-role-unknown"
DUPLICATE_BILLER = "duplicate-biller"
INITIATING_VISIT_MISSING = "initiating-visit-missing"
EXCLUDED_COMBINATION = "excluded-combination"
CONSENT_AFTER_SERVICE = "consent-after-service"
CARE_PLAN_REVIEW_OVERDUE = "care-plan-review-overdue"
TIME_LENGTH_PERIOD_MISMATCH = "time-length-period-mismatch"
BACKDATED_ENTRY = "backdated-entry"

# Why an entry was not counted (explanations; also stable).
NOT_FINISHED = "not-finished"
BEFORE_CONSENT = "before-consent"
NON_CLINICAL_PERFORMER = "non-clinical-performer"
UNKNOWN_PERFORMER_ROLE = "unknown-performer-role"
OTHER_MONTH = "other-month"
LOGGED_AFTER_CLOSE = "logged-after-close"
CONSENT_VOIDED = "consent-voided"
# Practitioner-role time that is not the billing practitioner's own (rules §1/§2: 99491/99437
# are the billing practitioner's personal time; only their time and clinical staff's counts).
OTHER_PRACTITIONER = "other-practitioner"
# The month names no billing practitioner and more than one practitioner logged time: whose
# time would bill cannot be told, so none of it counts. Also the month's warning.
BILLING_PRACTITIONER_UNKNOWN = "billing-practitioner-unknown"
# Warning (rules §7: add new ones, never rename): time by another practitioner was not counted.
OTHER_PRACTITIONER_TIME = "other-practitioner-time"
# Warning: the consent the month bills under was received after the month ended (documented
# late, dated back: rules §3.1 wants it documented before the services). It does not block:
# the EHR says when it was obtained, and the reviewer sees it was documented late.
CONSENT_DOCUMENTED_LATE = "consent-documented-late"
# Time on or after the day the consent expired (its renewal interval, PracticeOptions) is not
# counted, as time before it is not; the same identifier is the month's warning.
CONSENT_EXPIRED = "consent-expired"
# Warning: the month is eligible only by conditions ingest judged chronic without a chronic
# code list (ingest's ``chronic_codes`` empty: every active condition of the chronic
# categories counts, an ankle sprain too).
CHRONIC_CONDITIONS_UNVERIFIED = "chronic-conditions-unverified"


@dataclass(frozen=True, order=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        """``yyyy-mm``; raises ValueError otherwise."""
        digits = text[:4] + text[5:]
        if len(text) != 7 or text[4] != "-" or not ascii_digits(digits):
            raise ValueError(f"month must be yyyy-mm, got {text!r}")
        month = cls(int(text[:4]), int(text[5:]))
        # 9999-12 has no next month in Python's dates (its last day is computed from it).
        if not 1 <= month.month <= 12 or not 1900 <= month.year <= 9998:
            raise ValueError(f"month must be yyyy-mm from 1900-01 to 9998-12, got {text!r}")
        return month

    def __str__(self) -> str:
        return self.text

    @cached_property
    def text(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @cached_property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    @cached_property
    def last_day(self) -> date:
        if self.month == 12:  # (December 9999 has no next month's first day)
            return date(self.year, 12, 31)
        return date.fromordinal(self.next().first_day.toordinal() - 1)

    def next(self) -> Month:
        return Month(self.year + 1, 1) if self.month == 12 else Month(self.year, self.month + 1)

    def contains(self, day: date) -> bool:
        return day.year == self.year and day.month == self.month

    @classmethod
    def of(cls, day: date) -> Month:
        return cls(day.year, day.month)


def add_months(day: date, months: int) -> date:
    """The same day ``months`` later (or earlier), clamped to that month's last day (Jan 31 + 1
    → Feb 28 or 29): the consent renewal, review and initiating-visit look-back clocks. Past the
    calendar's ends it is the end: a renewal due after 9999-12-31 is due then, a look-back from
    year 1 reaches 0001-01-01 (the dates come from EHRs; ``year 10000 is out of range`` failed
    the patient's decision, and with it a consumer's event or a month's close)."""
    index = day.year * 12 + day.month - 1 + months
    if index < 12:  # before year 1
        return date.min
    if index >= 10_000 * 12:
        return date.max
    target = Month(index // 12, index % 12 + 1)
    return target.last_day if day.day > target.last_day.day else target.first_day.replace(
        day=day.day)


@dataclass(frozen=True)
class TimeEntry:
    """One CCM activity (a finished Encounter version), its performer already classified."""

    entry_id: str
    seconds: int
    start: datetime  # timezone-aware
    role: Role
    status: str = "finished"  # finished, or why it was reversed (entered-in-error, cancelled …)
    complex: bool = False
    practitioner: str | None = None
    late: bool = False  # logged after the period was closed
    warnings: tuple[str, ...] = ()
    # Every reference naming its performer: the Practitioner and PractitionerRole it names,
    # the role's Practitioner and that Practitioner's roles (as a visit's ``practitioners``).
    performers: frozenset[str] = frozenset()

    @property
    def performer(self) -> str | None:
        """Who performed it, one identity: its Practitioner (the first by reference when two
        are named), else the reference naming it; None when nothing names it."""
        people = sorted(p for p in self.performers if p.startswith("Practitioner/"))
        return people[0] if people else min(self.performers, default=None)


@dataclass(frozen=True)
class Consent:
    consent_id: str
    status: str  # active | inactive | rejected | entered-in-error | proposed | draft
    obtained_at: datetime | None
    provision: str = "permit"
    effective_until: date | None = None  # revoked: last day of the month of revocation
    practitioner: str | None = None  # the billing practitioner it names ("Practitioner/…")
    # provision.period: the first and last day it is valid (practice days; None: open)
    valid_from: date | None = None
    valid_until: date | None = None
    # When billing first received a version of it that granted it (None: not known, kept
    # before billing_0025): after the month's end it was documented late.
    received_at: datetime | None = None

    def expires_on(self, renewal_months: int | None, tz: ZoneInfo) -> date | None:
        """The first day it no longer covers under a renewal interval (None: never): that many
        months after the day it was obtained (a consent without a date never expires)."""
        if not renewal_months or self.obtained_at is None:
            return None
        return add_months(self.obtained_at.astimezone(tz).date(), renewal_months)


@dataclass(frozen=True)
class Condition:
    """A chronic condition of the patient, with the days it began and ended (practice days),
    so that each month counts the conditions the patient had in it (rules §3.2)."""

    condition_id: str
    # Began: its onset, else when it was recorded, else when billing first received it;
    # None: not known (it counts for every month up to its end).
    since: date | None = None
    # Ended: its abatement, else the day its resolution was received (never retroactively);
    # None: not ended.
    until: date | None = None
    # Judged chronic by the practice's chronic code list (False: every code counted).
    code_checked: bool = False

    def counts_in(self, month: Month) -> bool:
        """Began on or before the month's end, and had not ended before the month began."""
        return ((self.since is None or self.since <= month.last_day)
                and (self.until is None or self.until >= month.first_day))


@dataclass(frozen=True)
class Visit:
    """A qualifying visit (E/M, AWV, IPPE, TCM: a finished Encounter with a visit code)."""

    visit_id: str  # the Encounter's id
    day: date  # in the practice's time zone
    practitioners: frozenset[str] = frozenset()  # "Practitioner/…" who performed it
    status: str = "finished"  # finished, or why it was reversed (entered-in-error, cancelled …)


@dataclass(frozen=True)
class CarePlan:
    care_plan_id: str
    status: str
    intent: str = "plan"
    created: date | None = None
    last_review: date | None = None
    completed_on: date | None = None  # completed: the plan counts through that month


@dataclass(frozen=True)
class PatientMonth:
    """Everything known about one patient for one month of one practice."""

    patient: str
    month: Month
    timezone: str
    entries: tuple[TimeEntry, ...] = ()
    consents: tuple[Consent, ...] = ()
    care_plans: tuple[CarePlan, ...] = ()
    # Chronic conditions known by their number only (each counts for the month, checked
    # against a code list); the projections give ``conditions``, which count by their dates.
    chronic_conditions: int = 0
    conditions: tuple[Condition, ...] = ()
    complexity_documented: bool = False
    duplicate_biller: bool = False
    visits: tuple[Visit, ...] = ()
    initiating_visit_tracked: bool = False  # False: no visit data source, the check is skipped
    initiation_billed_before: bool = False  # G0506 billed before, outside what the facts show
    billing_practitioner: str | None = None


@dataclass(frozen=True)
class PracticeOptions:
    """Per-practice choices the rules leave configurable."""

    initiating_visit_missing: Literal["warning", "blocker"] = "warning"
    date_of_service: Literal["threshold-met", "month-end"] = "month-end"
    # Months after it was obtained that a consent expires (None: never; ccm-billing-rules.md §1:
    # "Renewal interval: configurable (default: none)").
    consent_renewal_months: int | None = None


@dataclass(frozen=True)
class Option:
    """One compliant combination of codes for the month and what Medicare pays for it."""

    name: str  # e.g. "staff", "complex", "practitioner"
    codes: dict[str, int]
    medicare_amount: Decimal
    threshold_met_at: datetime | None = None


@dataclass(frozen=True)
class NotCounted:
    entry_id: str
    seconds: int
    reason: str


@dataclass(frozen=True)
class NextThreshold:
    """The nearest threshold that would raise the month's best amount."""

    code: str
    minutes: int  # full minutes still needed (rounded up)
    option: str  # the option it belongs to: staff, practitioner or complex


@dataclass(frozen=True)
class Decision:
    """A patient-month decision that explains itself."""

    patient: str
    month: Month
    program: str
    ruleset: str
    codes: dict[str, int]
    seconds: dict[str, int]  # counted seconds by role: staff, practitioner
    counted: tuple[str, ...]  # entry ids
    not_counted: tuple[NotCounted, ...]
    blockers: tuple[str, ...]
    warnings: tuple[str, ...]
    chosen: Option | None
    alternatives: tuple[Option, ...] = ()
    potential_codes: dict[str, int] = field(default_factory=dict)  # codes if unblocked
    next_threshold: NextThreshold | None = None
    date_of_service: date | None = None
    practitioner: str | None = None
    notes: tuple[str, ...] = ()
    initiating_visit: Visit | None = None

    @property
    def billable(self) -> bool:
        return bool(self.codes) and not self.blockers

    def to_dict(self) -> dict:
        return {
            "patient": f"Patient/{self.patient}",
            "month": str(self.month),
            "program": self.program,
            "ruleset": self.ruleset,
            "billable": self.billable,
            "codes": dict(self.codes),
            "potentialCodes": dict(self.potential_codes),
            "seconds": dict(self.seconds),
            "minutes": {k: v // 60 for k, v in self.seconds.items()},
            "counted": list(self.counted),
            "notCounted": [
                {"entry": f"Encounter/{n.entry_id}", "seconds": n.seconds, "reason": n.reason}
                for n in self.not_counted
            ],
            "blockers": list(self.blockers),
            "warnings": list(self.warnings),
            "chosen": _option_dict(self.chosen),
            "alternatives": [_option_dict(o) for o in self.alternatives],
            "nextThreshold": (
                {"code": self.next_threshold.code, "minutes": self.next_threshold.minutes,
                 "option": self.next_threshold.option}
                if self.next_threshold
                else None
            ),
            "dateOfService": self.date_of_service.isoformat() if self.date_of_service else None,
            "practitioner": self.practitioner,
            "notes": list(self.notes),
            "initiatingVisit": (
                {"encounter": f"Encounter/{self.initiating_visit.visit_id}",
                 "date": self.initiating_visit.day.isoformat()}
                if self.initiating_visit else None
            ),
        }


def _option_dict(option: Option | None) -> dict | None:
    if option is None:
        return None
    return {
        "name": option.name,
        "codes": dict(option.codes),
        "medicareAmount": f"{option.medicare_amount:.2f}",
    }
