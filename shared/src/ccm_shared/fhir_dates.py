"""FHIR date search (R4 search §3.1.1.4.2 prefixes, §3.1.1.4.5 date): a prefix and a date or
dateTime, read as the range of time its precision names and compared as instants, never as text
(``2026-1`` matched October to December when compared as text).

Forms: ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` (a year, month or day), ``YYYY-MM-DDThh:mm`` (a
minute), ``…:ss`` (a second), ``…:ss.f…`` (as precise as its digits, to the microsecond), a time
with ``Z`` or ``±hh:mm`` (at most ±14:00, as FHIR's dateTime) or without. Prefixes: ``eq`` (the
default), ``ne``, ``gt``, ``lt``, ``ge``, ``le``, ``sa``, ``eb``; what is searched is an instant
(a ``lastUpdated``, an issue time), so ``sa`` is ``gt`` and ``eb`` is ``lt``.

Two choices are the caller's: ``zone``, where a value written without a zone lies (ingest: UTC;
billing: the practice's time zone, so ``2026-11-28`` is the practice's day), and
``zone_required``, which refuses a time without a zone (FHIR: "if hours and minutes are
specified, a time zone SHALL be populated"). A date never has a zone. Anything that is no date
is a ValueError saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
MAX_OFFSET = timedelta(hours=14)
# ASCII digits only: ``\d`` also matches other scripts' digits, which int() reads (``٢٠٢٦``).
_FORM = re.compile(
    r"(?P<year>[0-9]{4})(?:-(?P<month>[0-9]{2})(?:-(?P<day>[0-9]{2})"
    r"(?:T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})(?::(?P<second>[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]+))?)?(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?")
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DateRange:
    """The instants ``[start, end)`` a value names, aware; ``end`` None: past the last instant
    a datetime holds (a value in 9999's last day, month or year)."""

    start: datetime
    end: datetime | None

    def __contains__(self, instant: datetime) -> bool:
        instant = _fixed(instant)
        return self.start <= instant and (self.end is None or instant < self.end)


@dataclass(frozen=True)
class DateValue:
    """A date or dateTime as written, at its precision: the wall-clock range ``[start, end)``
    it names, naive where the value has no zone (``range`` places it), ``end`` None past the
    last representable time."""

    start: datetime
    end: datetime | None

    def range(self, zone: tzinfo = UTC) -> DateRange:
        """The instants this value names, a value without a zone read in ``zone``."""
        return DateRange(_placed(self.start, zone),
                         None if self.end is None else _placed(self.end, zone))


@dataclass(frozen=True)
class DateCriterion:
    """One date search parameter: its prefix and the value it compares with."""

    prefix: str
    value: DateValue

    def interval(self, zone: tzinfo = UTC) -> tuple[datetime | None, datetime | None, bool]:
        """What the criterion finds as ``(low, high, inside)``: the instants in ``[low, high)``
        when ``inside``, else those outside it (``ne``); None is unbounded. Both in UTC, for a
        database: an instant past what a datetime holds in UTC (``0001-01-01T00:00+09:00``)
        is clamped to its limit, which finds the same representable instants."""
        found = self.value.range(zone)
        low, high = _utc(found.start), None if found.end is None else _utc(found.end)
        if high == _LATEST:
            high = None
        return {"eq": (low, high, True), "ne": (low, high, False),
                "ge": (low, None, True), "gt": (high, None, high is not None),
                "sa": (high, None, high is not None),
                "le": (None, high, True), "lt": (None, low, True), "eb": (None, low, True),
                }[self.prefix]

    def matches(self, instant: datetime, zone: tzinfo = UTC) -> bool:
        """Whether the (aware) ``instant`` is found, a value without a zone read in ``zone``."""
        low, high, inside = self.interval(zone)
        at = _utc(_fixed(instant))
        within = (low is None or low <= at) and (high is None or at < high)
        return within == inside


def parse_value(text: str, *, zone_required: bool = False) -> DateValue:
    """The date or dateTime ``text`` (no prefix); ValueError saying why it is none."""
    form = _FORM.fullmatch(text)
    if form is None:
        raise ValueError(_expected(zone_required))
    g = form.groupdict()
    year, month, day = int(g["year"]), int(g["month"] or 1), int(g["day"] or 1)
    if year < 1:
        raise ValueError("the year must be 0001 or later")
    first = date(year, month, day)  # ValueError: no such month or day (2026-13, 2026-02-30)
    if g["hour"] is None:
        start = datetime.combine(first, time())
        if g["day"] is not None:
            return DateValue(start, _plus(start, timedelta(days=1)))
        if g["month"] is not None:
            return DateValue(start, None if (year, month) == (9999, 12) else
                             datetime(year + month // 12, month % 12 + 1, 1))
        return DateValue(start, None if year == 9999 else datetime(year + 1, 1, 1))
    if g["zone"] is None and zone_required:
        raise ValueError("a time needs its zone (Z or ±hh:mm)")
    fraction = g["fraction"] or ""
    start = datetime(year, month, day, int(g["hour"]), int(g["minute"]), int(g["second"] or 0),
                     int(fraction[:6].ljust(6, "0")) if fraction else 0,
                     tzinfo=None if g["zone"] is None else _zone(g["zone"]))
    if fraction:  # as precise as its digits (a microsecond at most): .5 is a tenth of a second
        step = timedelta(microseconds=10 ** (6 - min(len(fraction), 6)))
    else:
        step = timedelta(seconds=1) if g["second"] is not None else timedelta(minutes=1)
    return DateValue(start, _plus(start, step))


def parse(query: str, *, zone_required: bool = False) -> DateCriterion:
    """The criterion of a date search parameter's value (``[prefix]date``); ValueError saying
    why it is none."""
    prefix = query[:2] if query[:2] in PREFIXES else "eq"
    text = query[2:] if query[:2] in PREFIXES else query
    return DateCriterion(prefix, parse_value(text, zone_required=zone_required))


def date_range(text: str, *, zone: tzinfo = UTC, zone_required: bool = False) -> DateRange:
    """The instants the date or dateTime ``text`` (no prefix) names, a value without a zone
    read in ``zone``; ValueError when it is none."""
    return parse_value(text, zone_required=zone_required).range(zone)


def _expected(zone_required: bool) -> str:
    zone = "with a zone (Z or ±hh:mm)" if zone_required else "[Z or ±hh:mm]"
    return (f"a date is YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]] {zone}, after "
            f"an optional prefix ({', '.join(PREFIXES)})")


def _zone(text: str) -> tzinfo:
    if text == "Z":
        return UTC
    offset = timedelta(hours=int(text[1:3]), minutes=int(text[4:6]))
    if int(text[4:6]) > 59 or offset > MAX_OFFSET:
        raise ValueError(f"no such time zone offset {text} (at most ±14:00)")
    return timezone(-offset if text[0] == "-" else offset)


def _plus(start: datetime, step: timedelta) -> datetime | None:
    try:
        return start + step
    except OverflowError:  # 9999-12-31: its range ends past what a datetime holds
        return None


def _fixed(value: datetime) -> datetime:
    """``value`` with a fixed offset: two datetimes of one ``ZoneInfo`` compare as wall-clock
    times (Python ignores the zone then), which is wrong across a daylight-saving change."""
    offset = value.utcoffset()
    if offset is None:
        raise ValueError("an instant needs its zone")
    return value.replace(tzinfo=timezone(offset))


def _placed(value: datetime, zone: tzinfo) -> datetime:
    return _fixed(value if value.tzinfo is not None else value.replace(tzinfo=zone))


def _utc(value: datetime) -> datetime:
    """``value`` in UTC, or the first or last instant a datetime holds when it lies beyond."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return _EARLIEST if value.year == 1 else _LATEST
