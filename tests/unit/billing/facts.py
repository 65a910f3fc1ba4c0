"""Builders of patient-month facts for the rules tests (scenario defaults of billing-scenarios.yaml)."""

from __future__ import annotations

from datetime import date, datetime, time
from zoneinfo import ZoneInfo

from ccm_billing.domain.model import CarePlan, Consent, Month, PatientMonth, TimeEntry

TZ = "America/New_York"


def local(day: date, hour: int = 10, tz: str = TZ) -> datetime:
    return datetime.combine(day, time(hour), tzinfo=ZoneInfo(tz))


def month_facts(month: str, *, time_entries=(), consent="default", care_plan="default",
                chronic_conditions=2, complexity_documented=False, tz=TZ, **extra) -> PatientMonth:
    mo = Month.parse(month)
    before = mo.first_day.replace(day=1)
    consents = ()
    if consent == "default":
        consents = (Consent("c1", "active", local(date(before.year - 1, 12, 1), tz=tz)),)
    elif consent is not None:
        consents = (consent,)
    plans = ()
    if care_plan == "default":
        plans = (CarePlan("cp1", "active", "plan", created=date(before.year - 1, 12, 1),
                          last_review=before),)
    elif care_plan is not None:
        plans = (care_plan,)
    return PatientMonth(
        patient="pat-1", month=mo, timezone=tz, entries=tuple(time_entries), consents=consents,
        care_plans=plans, chronic_conditions=chronic_conditions,
        complexity_documented=complexity_documented, **extra,
    )


def entry(n: int, role: str, seconds: int, day: date, *, status="finished", tz=TZ, hour=10,
          **kw) -> TimeEntry:
    return TimeEntry(f"enc-{n}", seconds, local(day, hour, tz), role, status=status, **kw)
