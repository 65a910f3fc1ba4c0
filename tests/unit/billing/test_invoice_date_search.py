"""``GET /fhir/Invoice?date=…`` reads its value as a FHIR date or dateTime and compares ranges
of time, never text: ``2026-1`` matched October to December (a prefix of their text),
``lt2026-11-99`` and ``2026-13`` were taken (answering something, or nothing) where a value
that is no date is a 400 OperationOutcome. A date without a time is the practice's day
(America/New_York here)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccm_shared import fhir_dates
from tests.unit.billing.test_billing_flow import api, march_practice
from tests.unit.billing.test_fhir_search import ids, outcome

# Closed at 02:00 UTC on 2 April: 22:00 on 1 April in New York, the practice's day.
CLOSED_AT = datetime(2025, 4, 2, 2, tzinfo=UTC)


async def issued(billing) -> str:  # noqa: ANN001
    await march_practice(billing)
    billing.state["clock"].now = CLOSED_AT
    r = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert r.status_code == 200, r.text
    return r.json()["invoice"]["id"]


@pytest.mark.parametrize(("value", "found"), [
    ("2025", True), ("2024", False), ("2025-04", True), ("2025-03", False),
    ("2025-04-01", True),            # the practice's day (UTC's is 2 April)
    ("2025-04-02", False),
    ("eq2025-04-01", True), ("ne2025-04-01", False), ("ne2025-04-02", True),
    ("ge2025-04-01", True), ("ge2025-04-02", False),
    ("gt2025-03-31", True), ("gt2025-04-01", False),
    ("le2025-04-01", True), ("le2025-03-31", False),
    ("lt2025-04-02", True), ("lt2025-04-01", False),
    ("sa2025-03", True), ("eb2025-05", True), ("eb2025-04", False),
    ("lt2025-05", True), ("ge2025-05", False),
    ("2025-04-02T02:00:00Z", True), ("2025-04-01T22:00:00-04:00", True),
    ("2025-04-02T02:00Z", True),     # a minute's precision
    ("2025-04-02T02:00:01Z", False), ("ge2025-04-02T02:00:00.000001Z", False),
    ("lt2025-04-02T02:00:00.000001Z", True), ("gt2025-04-02T01:59:59Z", True),
    # As precise as its digits, to the microsecond (FHIR R4 takes any number of them).
    ("2025-04-02T02:00:00.0000009Z", True), ("2025-04-02T02:00:00.0000019Z", False),
    ("9999", False), ("ge0001", True), ("9999-12-31", False),
])
async def test_an_invoice_date_search_compares_ranges_of_time(billing, value, found):
    invoice = await issued(billing)
    r = await api(billing).get("/fhir/Invoice", params={"date": value})
    assert ids(r) == ([invoice] if found else []), value


@pytest.mark.parametrize("value", [
    "2025-1", "2025-13", "2025-00", "lt2025-11-99", "2025-02-29", "2025-04-31", "0000",
    "20250402", "2025-04-02T02:00:00", "2025-04-02T02:00", "2025-04-02T24:00:00Z",
    "2025-04-02T02:60Z", "2025-04-02T02:00:00+15:00", "2025-04-02T02:00:00+14:30",
    "xx2025", "eq", "", "2025-04-02Z", "2025-04-02T", " 2025", "２０２５", "soon",
])
async def test_a_date_that_is_none_is_a_400_operation_outcome(billing, value):
    await issued(billing)
    issue = outcome(await api(billing).get("/fhir/Invoice", params={"date": value}), 400,
                    "value")
    assert issue["expression"] == ["date"] and "date" in issue["diagnostics"]


async def test_two_bounds_are_both_applied(billing):
    invoice = await issued(billing)
    get = api(billing).get
    assert ids(await get("/fhir/Invoice?date=ge2025-04&date=lt2025-05")) == [invoice]
    assert ids(await get("/fhir/Invoice?date=ge2025-04-02&date=lt2025-05")) == []


ZONE = ZoneInfo("America/New_York")
INSTANTS = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                        timezones=st.just(UTC))


@given(INSTANTS, st.datetimes(min_value=datetime(2000, 1, 1),
                              max_value=datetime(2100, 1, 1)).map(lambda d: d.date()))
def test_prefixes_partition_the_timeline(value, day):
    """For any instant and day: exactly one of lt, eq, gt holds; ge = eq or gt; le = lt or eq;
    ne = not eq."""
    is_ = {p: fhir_dates.parse(f"{p}{day.isoformat()}").matches(value, ZONE)
           for p in fhir_dates.PREFIXES}
    assert [is_["lt"], is_["eq"], is_["gt"]].count(True) == 1
    assert is_["ge"] == (is_["eq"] or is_["gt"]) and is_["le"] == (is_["lt"] or is_["eq"])
    assert is_["ne"] == (not is_["eq"]) and is_["sa"] == is_["gt"] and is_["eb"] == is_["lt"]
    assert is_["eq"] == (value.astimezone(ZONE).date() == day)
