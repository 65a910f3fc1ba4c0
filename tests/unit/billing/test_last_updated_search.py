"""``_lastUpdated`` on billing's /fhir searches (``GET /fhir/Invoice``, ``GET /fhir/ChargeItem``):
``meta.lastUpdated`` compared as an instant with the range of time the value names (the shared
``ccm_shared.fhir_dates``), a date being the practice's day (America/New_York here) and a time
needing its zone; what is no date is a 400 OperationOutcome naming ``_lastUpdated``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.unit.billing.test_billing_flow import api
from tests.unit.billing.test_fhir_search import ids, outcome, self_params
from tests.unit.billing.test_invoice_date_search import issued

PATHS = ("/fhir/Invoice", "/fhir/ChargeItem")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("value", "found"), [
    ("2025", True), ("2024", False), ("2025-04", True), ("2025-03", False),
    ("2025-04-01", True),            # the practice's day (UTC's is 2 April)
    ("2025-04-02", False), ("ne2025-04-02", True), ("ne2025-04-01", False),
    ("ge2025-04-01", True), ("ge2025-04-02", False), ("gt2025-03-31", True),
    ("gt2025-04-01", False), ("sa2025-03", True), ("le2025-04-01", True),
    ("le2025-03-31", False), ("lt2025-04-02", True), ("lt2025-04-01", False),
    ("eb2025-05", True), ("eb2025-04", False),
    ("2025-04-02T02:00:00Z", True), ("2025-04-01T22:00:00-04:00", True),
    ("2025-04-02T02:00Z", True), ("2025-04-02T02:00:01Z", False),
    ("ge2025-04-02T02:00:00.000001Z", False), ("lt2025-04-02T02:00:00.000001Z", True),
    ("9999", False), ("ge0001", True), ("le9999-12-31", True),
])
async def test_last_updated_compares_ranges_of_time(billing, path, value, found):
    await issued(billing)
    r = await api(billing).get(path, params={"_lastUpdated": value})
    assert bool(ids(r)) is found, value
    assert ("_lastUpdated", value) in self_params(r)  # the links name it


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value", [
    "2025-1", "2025-13", "lt2025-11-99", "2025-02-29", "0000", "2025-04-02T02:00:00",
    "2025-04-02T02:00", "2025-04-02T02:00:00+15:00", "2025-04-02Z", "soon", "",
])
async def test_a_last_updated_that_is_no_date_is_a_400_operation_outcome(billing, path, value):
    await issued(billing)
    issue = outcome(await api(billing).get(path, params={"_lastUpdated": value}), 400, "value")
    assert issue["expression"] == ["_lastUpdated"] and "_lastUpdated" in issue["diagnostics"]


async def test_a_payment_that_balances_the_invoice_moves_its_last_updated_alone(billing):
    """Paid in full on 3 April, the Invoice (balanced) is found as updated then; its
    ChargeItems did not change; both bounds given are both applied."""
    invoice = await issued(billing)
    get = api(billing).get
    billing.state["clock"].now = datetime(2025, 4, 3, 15, tzinfo=UTC)
    r = await api(billing).post(f"/v1/invoices/{invoice}/payments",
                                json={"amount": "75.33", "date": "2025-04-03"})
    assert r.status_code == 201, r.text
    assert ids(await get("/fhir/Invoice", params={"_lastUpdated": "2025-04-03"})) == [invoice]
    assert ids(await get("/fhir/Invoice", params={"_lastUpdated": "2025-04-01"})) == []
    assert ids(await get("/fhir/ChargeItem", params={"_lastUpdated": "2025-04-03"})) == []
    assert ids(await get("/fhir/ChargeItem", params={"_lastUpdated": "2025-04-01"}))
    both = "/fhir/Invoice?_lastUpdated=ge2025-04-02&_lastUpdated=lt2025-04-04"
    assert ids(await get(both)) == [invoice]
    read = await get(f"/fhir/Invoice/{invoice}")
    assert read.json()["meta"] == {"versionId": "2", "lastUpdated": "2025-04-03T15:00:00Z"}
    assert read.headers["etag"] == 'W/"2"'
    assert read.headers["last-modified"] == "Thu, 03 Apr 2025 15:00:00 GMT"
