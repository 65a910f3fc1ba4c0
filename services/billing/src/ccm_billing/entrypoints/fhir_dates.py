"""A FHIR ``date`` search parameter (R4 §3.1.1.4.2 and §3.1.1.4.5): a prefix and a date or
dateTime, read as the range of time it names, compared as instants — never as text (``2026-1``
matched October to December, ``lt2026-11-99`` was taken, ``2026-13`` answered nothing).

Forms: ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` (a day of the practice's time zone: the range from
its first instant to the next one's), or ``YYYY-MM-DDThh:mm[:ss[.fff…]]`` with ``Z`` or
``±hh:mm`` (FHIR: a time has a zone), whose range is its precision (a minute, a second, …).
Prefixes: ``eq`` (the default), ``ne``, ``gt``, ``lt``, ``ge``, ``le``, ``sa``, ``eb``; an
Invoice's ``date`` is an instant, so ``sa`` is ``gt`` and ``eb`` is ``lt``. Anything else is
refused (ValueError, which the route answers with a 400 OperationOutcome)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
_FORM = re.compile(
    r"(?P<year>[0-9]{4})(?:-(?P<month>[0-9]{2})(?:-(?P<day>[0-9]{2})"
    r"(?:T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})(?::(?P<second>[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]{1,6}))?)?(?P<zone>Z|[+-][0-9]{2}:[0-9]{2}))?)?)?")


@dataclass(frozen=True)
class DateCriterion:
    """One ``date`` parameter: its prefix and the range [start, end) its value names; a value
    without a time is a range of the practice's days (``start``/``end`` naive until ``zone``
    places them); ``end`` None: past the last representable instant."""

    prefix: str
    start: datetime
    end: datetime | None

    def matches(self, value: datetime, zone: tzinfo) -> bool:
        """Whether the instant ``value`` is found by this criterion in the practice's ``zone``."""
        start, end = (self.start if self.start.tzinfo else self.start.replace(tzinfo=zone),
                      None if self.end is None else
                      self.end if self.end.tzinfo else self.end.replace(tzinfo=zone))
        within = start <= value and (end is None or value < end)
        return {"eq": within, "ne": not within,
                "ge": start <= value, "lt": value < start,
                "le": end is None or value < end, "gt": end is not None and value >= end,
                "sa": end is not None and value >= end, "eb": value < start}[self.prefix]


def parse(query: str) -> DateCriterion:
    """The criterion of a ``date`` parameter's value; ValueError saying why it is none."""
    prefix = query[:2] if query[:2] in PREFIXES else "eq"
    text = query[2:] if query[:2] in PREFIXES else query
    form = _FORM.fullmatch(text)
    if form is None:
        raise ValueError("a date is YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss] with a "
                         "zone (Z or ±hh:mm), after an optional prefix (eq, ne, gt, lt, ge, "
                         "le, sa, eb)")
    g = form.groupdict()
    year, month, day = int(g["year"]), int(g["month"] or 1), int(g["day"] or 1)
    if year < 1:
        raise ValueError("the year must be 0001 or later")
    first = date(year, month, day)  # ValueError: no such month or day (2026-13, 2026-11-99)
    if g["hour"] is None:
        start = datetime.combine(first, time())
        if g["day"] is not None:
            end = _plus(start, days=1)
        elif g["month"] is not None:
            end = None if (year, month) == (9999, 12) else datetime(
                year + month // 12, month % 12 + 1, 1)
        else:
            end = None if year == 9999 else datetime(year + 1, 1, 1)
        return DateCriterion(prefix, start, end)
    zone = _zone(g["zone"])
    fraction = g["fraction"] or ""
    start = datetime(year, month, day, int(g["hour"]), int(g["minute"]), int(g["second"] or 0),
                     int(fraction.ljust(6, "0")) if fraction else 0, tzinfo=zone)
    if fraction:
        step = timedelta(microseconds=10 ** (6 - len(fraction)))
    else:
        step = timedelta(seconds=1) if g["second"] is not None else timedelta(minutes=1)
    return DateCriterion(prefix, start, _plus(start, step=step))


def _zone(text: str) -> tzinfo:
    from datetime import UTC, timezone

    if text == "Z":
        return UTC
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 14 or minutes > 59:
        raise ValueError(f"no such time zone offset {text}")
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if text[0] == "-" else offset)


def _plus(start: datetime, *, days: int = 0, step: timedelta | None = None) -> datetime | None:
    try:
        return start + (step if step is not None else timedelta(days=days))
    except OverflowError:  # 9999-12-31: its range ends past what a datetime holds
        return None
