"""What /fhir serves carries its version (billing_0024): ``meta.versionId`` and
``meta.lastUpdated`` with ``ETag: W/"<versionId>"`` and ``Last-Modified`` on a read, on
PostgreSQL. An Invoice's version goes up, at the time of the change, when what is served of it
changes (paid in full: balanced; a void: issued again; cancelled by a correction), and only
then: a partial payment, a refund, the overdue flag, a repeated close and reads leave it as it
is. Its ChargeItems go to version 2 when the cancellation enters them in error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from tests.integration.billing.payments.payment_support import CLOSE_AT, deliver, lowered
from tests.integration.billing.payments.test_payment_voids_and_refunds_on_postgres import (
    closed,
    flag_overdue,
    pay,
    refund,
    tick,
    void,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def served(b, path: str) -> tuple[str, datetime, dict]:  # noqa: ANN001
    """(versionId, lastUpdated, the resource) of a read, its headers checked against its meta."""
    r = await b.get(path)
    assert r.status_code == 200, r.text
    doc = r.json()
    version, updated = doc["meta"]["versionId"], datetime.fromisoformat(doc["meta"]["lastUpdated"])
    assert list(doc)[:3] == ["resourceType", "id", "meta"]
    assert r.headers["etag"] == f'W/"{version}"'
    assert r.headers["last-modified"] == format_datetime(
        updated.astimezone(UTC).replace(microsecond=0), usegmt=True)
    return version, updated, doc


async def invoice_version(b, invoice: str) -> tuple[str, datetime]:  # noqa: ANN001
    version, updated, doc = await served(b, f"/fhir/Invoice/{invoice}")
    # A search serves the same meta as the read.
    r = await b.get("/fhir/Invoice", params={"_id": invoice})
    assert r.json()["entry"][0]["resource"]["meta"] == doc["meta"]
    return version, updated


async def charge_items(b, invoice: str) -> dict[str, tuple[str, datetime, str]]:  # noqa: ANN001
    """The Invoice's ChargeItems: id → (versionId, lastUpdated, status), each read too."""
    _, _, doc = await served(b, f"/fhir/Invoice/{invoice}")
    out = {}
    for line in doc.get("lineItem", []):
        item = line["chargeItemReference"]["reference"]
        version, updated, resource = await served(b, f"/fhir/{item}")
        out[item] = (version, updated, resource["status"])
    return out


async def test_versions_change_with_what_is_served_and_not_otherwise(postgres):
    b = postgres
    invoice = (await closed(b))["id"]
    assert await invoice_version(b, invoice) == ("1", CLOSE_AT)
    items = await charge_items(b, invoice)
    assert items and set(items.values()) == {("1", CLOSE_AT, "billable")}

    # Not a change of what is served: reads, the close again, a partial payment, overdue.
    assert (await b.post(f"/v1/practices/{b.practice}/billing-periods/2025-03/close")
            ).status_code == 200
    await pay(b, invoice, "50.00")
    b.clock.now = datetime(2025, 5, 10, tzinfo=UTC)  # past its due date (2 May)
    assert await flag_overdue(b) == 1
    assert await invoice_version(b, invoice) == ("1", CLOSE_AT)

    # Paid in full: balanced, version 2 at that time.
    last = await pay(b, invoice, "25.33")
    paid_at = b.clock.now
    assert await invoice_version(b, invoice) == ("2", paid_at)
    assert (await b.get(f"/fhir/Invoice/{invoice}")).json()["status"] == "balanced"

    # The payment voided: issued again, version 3.
    tick(b)
    assert (await void(b, invoice, last["id"])).status_code == 200
    voided_at = b.clock.now
    assert await invoice_version(b, invoice) == ("3", voided_at)

    # A correction cancels it (and reissues the month at 42.00, which the 50.00 overpays).
    tick(b)
    corrected_at = b.clock.now
    await deliver(b.runtime, lowered(b.practice, version=2))
    version, updated = await invoice_version(b, invoice)
    assert (version, updated) == ("4", corrected_at)
    assert (await b.get(f"/fhir/Invoice/{invoice}")).json()["status"] == "cancelled"
    assert set((await charge_items(b, invoice)).values()) == {
        ("2", corrected_at, "entered-in-error")}
    replacement = (await b.get(f"/v1/invoices/{invoice}")).json()["replacedBy"]
    assert await invoice_version(b, replacement) == ("1", corrected_at)
    assert {v[:2] for v in (await charge_items(b, replacement)).values()} == {
        ("1", corrected_at)}

    # A refund of the overpayment leaves the replacement balanced: no new version.
    assert (await refund(b, replacement, "8.00")).status_code == 201
    assert await invoice_version(b, replacement) == ("1", corrected_at)
    assert await invoice_version(b, invoice) == ("4", corrected_at)


async def test_last_updated_search_finds_by_the_time_of_the_change(postgres):
    b = postgres
    invoice = (await closed(b))["id"]
    b.clock.now = CLOSE_AT + timedelta(days=3)
    await pay(b, invoice, "75.33")
    paid_at = b.clock.now

    async def found(path: str, value: str) -> list[str]:
        r = await b.get(path, params={"_lastUpdated": value})
        assert r.status_code == 200, r.text
        return [e["resource"]["id"] for e in r.json().get("entry", [])]

    # A second of UTC, the practice's day (New York), prefixes.
    stamp = paid_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert await found("/fhir/Invoice", stamp) == [invoice]
    assert await found("/fhir/Invoice", f"gt{stamp}") == []
    assert await found("/fhir/Invoice", paid_at.astimezone(UTC).date().isoformat()) == [invoice]
    assert await found("/fhir/Invoice", "lt2025-04-03") == []
    items = await found("/fhir/ChargeItem", "2025-04-02")  # closed at 08:00 New York time
    assert items and await found("/fhir/ChargeItem", "ne2025-04-02") == []
    assert await found("/fhir/ChargeItem", f"ge{stamp}") == []
    r = await b.get("/fhir/ChargeItem", params={"_lastUpdated": "2025-04-02T12:00"})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["_lastUpdated"]
