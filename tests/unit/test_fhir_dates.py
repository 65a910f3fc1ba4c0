"""``ccm_shared.fhir_dates``: one FHIR date search for the services. A value names the range of
time of its precision and is compared as instants; where a value without a zone lies
(``zone``: ingest UTC, billing the practice's) and whether a time needs one (``zone_required``)
are the caller's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ccm_shared import fhir_dates

NY = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(("text", "zone", "start", "end"), [
    ("2026", UTC, utc(2026, 1, 1), utc(2027, 1, 1)),
    ("2026-11", UTC, utc(2026, 11, 1), utc(2026, 12, 1)),
    ("2026-12", UTC, utc(2026, 12, 1), utc(2027, 1, 1)),
    ("2026-11-28", UTC, utc(2026, 11, 28), utc(2026, 11, 29)),
    ("2026-11-28", NY, utc(2026, 11, 28, 5), utc(2026, 11, 29, 5)),  # the practice's day
    ("2025-03-09", NY, utc(2025, 3, 9, 5), utc(2025, 3, 10, 4)),  # 23 hours: clocks go forward
    ("2025-11", NY, utc(2025, 11, 1, 4), utc(2025, 12, 1, 5)),
    ("2026-11-28T10:30", UTC, utc(2026, 11, 28, 10, 30), utc(2026, 11, 28, 10, 31)),
    ("2026-11-28T10:30", NY, utc(2026, 11, 28, 15, 30), utc(2026, 11, 28, 15, 31)),
    ("2026-11-28T10:30Z", NY, utc(2026, 11, 28, 10, 30), utc(2026, 11, 28, 10, 31)),
    ("2026-11-28T10:30:15-05:00", UTC, utc(2026, 11, 28, 15, 30, 15),
     utc(2026, 11, 28, 15, 30, 16)),
    ("2026-11-28T10:30:15.5+14:00", UTC, utc(2026, 11, 27, 20, 30, 15, 500000),
     utc(2026, 11, 27, 20, 30, 15, 600000)),
    ("2026-11-28T10:30:15.000001Z", UTC, utc(2026, 11, 28, 10, 30, 15, 1),
     utc(2026, 11, 28, 10, 30, 15, 2)),
    ("2026-11-28T10:30:15.1234567Z", UTC, utc(2026, 11, 28, 10, 30, 15, 123456),
     utc(2026, 11, 28, 10, 30, 15, 123457)),  # to the microsecond at most
    ("9999", UTC, utc(9999, 1, 1), None),  # to the end of time
    ("9999-12", UTC, utc(9999, 12, 1), None),
    ("9999-12-31", UTC, utc(9999, 12, 31), None),
    ("9999-12-31T23:59:59Z", UTC, utc(9999, 12, 31, 23, 59, 59), None),
    ("0001", UTC, utc(1, 1, 1), utc(2, 1, 1)),
])
def test_a_value_names_the_range_of_its_precision(text, zone, start, end):
    found = fhir_dates.date_range(text, zone=zone)
    assert found.start == start and found.start.utcoffset() is not None
    assert found.end == end


@pytest.mark.parametrize("text", [
    "2026-1", "2026-13", "2026-00", "2026-11-99", "2026-02-29", "2026-04-31", "0000", "20261128",
    "2026-11-28T24:00Z", "2026-11-28T10:60Z", "2026-11-28T10:30:60Z", "2026-11-28T10Z",
    "2026-11-28T10:30+15:00", "2026-11-28T10:30+14:01", "2026-11-28T10:30+05:60",
    "2026-11-28T10:30+0500", "2026-11-28Z", "2026-11-28T", "2026-11-28T10:30:15.Z", " 2026",
    "２０２６", "٢٠٢٦", "soon", "", "ge2026",  # a bare value takes no prefix
])
def test_what_is_no_date_is_refused(text):
    with pytest.raises(ValueError):
        fhir_dates.date_range(text)


@pytest.mark.parametrize(("text", "zone_required", "refused"), [
    ("2026-11-28T10:30", False, False), ("2026-11-28T10:30", True, True),
    ("2026-11-28T10:30:15.25", True, True), ("2026-11-28T10:30Z", True, False),
    ("2026-11-28T10:30+01:00", True, False), ("2026-11-28", True, False),  # a date has no zone
    ("2026-11", True, False), ("2026", True, False),
])
def test_a_time_without_a_zone_is_refused_when_a_zone_is_required(text, zone_required, refused):
    if refused:
        with pytest.raises(ValueError, match="zone"):
            fhir_dates.parse(text, zone_required=zone_required)
    else:
        fhir_dates.parse(text, zone_required=zone_required)


# One instant (10:30 UTC on 28 November 2026) against each prefix: a day of UTC, the day of a
# zone where it is the 28th too, and a day it is not in.
AT = utc(2026, 11, 28, 10, 30)


@pytest.mark.parametrize(("query", "zone", "found"), [
    ("2026-11-28", UTC, True), ("eq2026-11-28", UTC, True), ("ne2026-11-28", UTC, False),
    ("2026-11-27", UTC, False), ("ne2026-11-27", UTC, True),
    ("ge2026-11-28", UTC, True), ("ge2026-11-29", UTC, False),
    ("gt2026-11-27", UTC, True), ("gt2026-11-28", UTC, False), ("sa2026-11-27", UTC, True),
    ("sa2026-11-28", UTC, False),
    ("le2026-11-28", UTC, True), ("le2026-11-27", UTC, False),
    ("lt2026-11-29", UTC, True), ("lt2026-11-28", UTC, False), ("eb2026-11-29", UTC, True),
    ("eb2026-11-28", UTC, False),
    ("2026-11-28", TOKYO, True),   # 19:30 in Tokyo
    ("2026-11-28T10:30", TOKYO, False),  # 10:30 in Tokyo is 01:30 UTC
    ("2026-11-28T19:30", TOKYO, True), ("2026-11-28T05:30-05:00", TOKYO, True),
    ("gt9999", UTC, False), ("le9999", UTC, True), ("ge0001", UTC, True),
    ("ge0001-01-01T00:00+09:00", UTC, True),  # before the first instant UTC holds
    ("lt0001-01-01T00:00+09:00", UTC, False),
    ("lt9999-12-31T23:59-05:00", UTC, True),  # after the last instant UTC holds
    ("ge9999-12-31T23:59-05:00", UTC, False),
])
def test_each_prefix_compares_the_instant_with_the_range(query, zone, found):
    criterion = fhir_dates.parse(query)
    assert criterion.matches(AT, zone) is found
    assert _interval_finds(criterion.interval(zone), AT) is found


def _interval_finds(interval, instant: datetime) -> bool:
    low, high, inside = interval
    within = (low is None or low <= instant) and (high is None or instant < high)
    return within == inside


# -- invariants ------------------------------------------------------------------------------

OFFSETS = st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=14)),
                           timezone(timedelta(hours=-12)), timezone(timedelta(hours=5, minutes=30)),
                           NY, TOKYO])
INSTANTS = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                        timezones=st.just(UTC))
PRECISIONS = ("year", "month", "day", "minute", "second", "fraction")


def written(instant: datetime, zone, precision: str, digits: int) -> str:
    """The value naming ``instant`` at ``precision`` in ``zone`` (a date: without a zone)."""
    local = instant.astimezone(zone)
    assume(local.utcoffset() % timedelta(minutes=1) == timedelta(0))  # no LMT: -04:56:02
    day = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    offset = local.strftime("%z")
    zone_text = "Z" if offset == "+0000" else f"{offset[:3]}:{offset[3:]}"
    return {"year": f"{local.year:04d}", "month": day[:7], "day": day,
            "minute": f"{day}T{local:%H:%M}{zone_text}",
            "second": f"{day}T{local:%H:%M:%S}{zone_text}",
            "fraction": f"{day}T{local:%H:%M:%S}.{local.microsecond:06d}"[:20 + digits]
                        + zone_text}[precision]


@given(INSTANTS, OFFSETS, st.sampled_from(PRECISIONS), st.integers(1, 6))
def test_the_range_of_a_value_contains_the_instant_it_names(instant, zone, precision, digits):
    text = written(instant, zone, precision, digits)
    found = fhir_dates.date_range(text, zone=zone, zone_required=True)
    assert instant in found, (text, found)
    assert fhir_dates.parse(text).matches(instant, zone)


@given(INSTANTS, INSTANTS, OFFSETS, st.sampled_from(PRECISIONS), st.integers(1, 6))
def test_prefixes_partition_the_timeline(instant, other, zone, precision, digits):
    """Against any value: exactly one of lt, eq, gt holds; ge = eq or gt; le = lt or eq; ne =
    not eq; sa = gt, eb = lt; and the database's interval agrees with ``matches``."""
    text = written(other, zone, precision, digits)
    is_ = {}
    for p in fhir_dates.PREFIXES:
        criterion = fhir_dates.parse(f"{p}{text}")
        is_[p] = criterion.matches(instant, zone)
        assert _interval_finds(criterion.interval(zone), instant) == is_[p]
    assert [is_["lt"], is_["eq"], is_["gt"]].count(True) == 1
    assert is_["ge"] == (is_["eq"] or is_["gt"]) and is_["le"] == (is_["lt"] or is_["eq"])
    assert is_["ne"] == (not is_["eq"]) and is_["sa"] == is_["gt"] and is_["eb"] == is_["lt"]
