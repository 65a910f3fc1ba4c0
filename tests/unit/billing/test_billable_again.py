"""A month a correction left nothing to bill (its invoice cancelled without replacement) that
becomes billable again: the new invoice replaces the cancelled one and carries its payments and
refunds, as a reissue does. Before, it was issued with ``replaces`` None: the cancelled invoice
went on owing back what it was paid while the new one billed the month in full (the practice
was owed its payment back and dunned for the month at once)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.invoice import Invoice

from ccm_billing.entrypoints.jobs import run_once
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver, march_practice, outboxed

MONTH = "/v1/practices/alpha/billing-periods/2025-03"
E2_DAY = "2025-03-17T10:00:00-04:00"


async def nothing_left_then_billable_again(billing, money) -> tuple[dict, dict]:  # noqa: ANN001
    """March closed (75.33: p1's two Encounters), ``money`` done to it, p1's consent entered
    in error (nothing left to bill), then granted again and p1's second Encounter revised (a
    correction of p1's month, which bills 75.33 again): (the cancelled invoice, the new one) as
    the API shows them."""
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post(f"{MONTH}/close")).json()["invoice"]
    await money(billing, inv["id"], when="paid")
    await deliver(billing, ev.consent("alpha", "p1", "c-p1", status="entered-in-error",
                                      version=2))
    cancelled = (await api(billing).get(f"/v1/invoices/{inv['id']}")).json()
    assert (cancelled["status"], cancelled["replacedBy"]) == ("cancelled", None)
    await money(billing, inv["id"], when="cancelled")
    await deliver(billing, ev.consent("alpha", "p1", "c-p1", version=3),
                  ev.time_logged("alpha", "p1", "e2", 1200, E2_DAY, version=3))
    old = (await api(billing).get(f"/v1/invoices/{inv['id']}")).json()
    assert old["status"] == "cancelled" and old["replacedBy"] is not None, old
    new = (await api(billing).get(f"/v1/invoices/{old['replacedBy']}")).json()
    return old, new


async def paid_in_full(billing, invoice: str, when: str) -> None:  # noqa: ANN001
    if when == "paid":
        r = await api(billing).post(f"/v1/invoices/{invoice}/payments", json={
            "amount": "75.33", "date": "2025-04-10", "reference": "chk-1"})
        assert r.status_code == 201, r.text


async def paid_then_part_refunded(billing, invoice: str, when: str) -> None:  # noqa: ANN001
    await paid_in_full(billing, invoice, when)
    if when == "cancelled":
        r = await api(billing).post(f"/v1/invoices/{invoice}/refunds", json={
            "amount": "30.00", "date": "2025-04-12", "reference": "ach-1"})
        assert r.status_code == 201, r.text


async def refunded_then_voided(billing, invoice: str, when: str) -> None:  # noqa: ANN001
    """Paid, refunded in full once cancelled, then the cheque bounced: the cancelled invoice is
    owed the refund back (75.33)."""
    await paid_in_full(billing, invoice, when)
    if when == "cancelled":
        r = await api(billing).post(f"/v1/invoices/{invoice}/refunds", json={
            "amount": "75.33", "date": "2025-04-12", "reference": "ach-1"})
        assert r.status_code == 201, r.text
        got = (await api(billing).get(f"/v1/invoices/{invoice}")).json()
        r = await api(billing).post(
            f"/v1/invoices/{invoice}/payments/{got['payments'][0]['id']}/void",
            json={"reason": "cheque bounced"})
        assert r.status_code == 200, r.text


async def unpaid(billing, invoice: str, when: str) -> None:  # noqa: ANN001
    return None


@pytest.mark.parametrize(("money", "paid", "refunded", "balance", "status"), [
    # (what was done, the new invoice's paid, refunded, balance, payment status)
    (unpaid, "0.00", "0.00", "75.33", "issued"),
    # Paid in full before: nothing owed (before this fix: 75.33 owed back on the cancelled
    # invoice, and 75.33 due on the new one).
    (paid_in_full, "75.33", "0.00", "0.00", "balanced"),
    (paid_then_part_refunded, "45.33", "30.00", "30.00", "partially-paid"),
    # The month again (75.33) and the refund the practice owes back (75.33).
    (refunded_then_voided, "-75.33", "75.33", "150.66", "issued"),
], ids=["unpaid", "paid", "part-refunded", "refund-owed-back"])
async def test_the_new_invoice_replaces_the_cancelled_one_and_carries_its_money(
        billing, money, paid, refunded, balance, status):
    old, new = await nothing_left_then_billable_again(billing, money)
    assert (new["replaces"], new["revision"], new["totalNet"]) == (old["id"], 1, "75.33")
    assert (new["paid"], new["refunded"], new["balance"], new["paymentStatus"]) == (
        paid, refunded, balance, status)
    # The cancelled invoice owes nothing back any more: its money is the new one's.
    assert (old["balance"], old["replacedBy"]) == ("0.00", new["id"])
    assert [x["carriedFrom"] for x in new["payments"]] == [x["id"] for x in old["payments"]]
    assert [x["carriedFrom"] for x in new["refunds"]] == [x["id"] for x in old["refunds"]]
    issued = (await outboxed(billing, "billing.invoice.issued.v1"))[-1]["data"]
    assert (issued["invoiceId"], issued["replaces"], issued["paid"], issued["balance"]) == (
        new["id"], old["id"], paid, balance)
    # The cancelled Invoice's FHIR resource names its replacement, as a reissue's does.
    fhir_old = (await api(billing).get(f"/fhir/Invoice/{old['id']}")).json()
    Invoice.model_validate(fhir_old)
    assert any(x["valueReference"]["reference"] == f"Invoice/{new['id']}"
               for x in fhir_old.get("extension", []))
    # Money goes to the new invoice now: the cancelled one, replaced, takes no payment.
    r = await api(billing).post(f"/v1/invoices/{old['id']}/payments", json={
        "amount": "1.00", "date": "2025-04-20"})
    assert r.status_code == 409 and new["id"] in r.text, r.text


async def listed(billing, status: str) -> list[str]:  # noqa: ANN001
    r = await api(billing).get("/v1/practices/alpha/invoices", params={"status": status})
    assert r.status_code == 200, r.text
    return [x["id"] for x in r.json()["invoices"]]


async def test_invoices_owing_money_back_either_way_are_listed_never_flagged_overdue(billing):
    """A cancelled invoice is never overdue (the scheduler flags live invoices the practice
    owes; a cancelled one's event would tell the practice to pay an invoice that no longer
    bills anything). What it owes back is listed instead: ``refund-due`` while the vendor owes
    the practice its payment back, ``repayment-due`` once the practice owes a refund back."""
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post(f"{MONTH}/close")).json()["invoice"]["id"]
    assert await listed(billing, "refund-due") == await listed(billing, "repayment-due") == []
    r = await api(billing).post(f"/v1/invoices/{inv}/payments", json={
        "amount": "75.33", "date": "2025-04-10", "reference": "chk-1"})
    assert r.status_code == 201
    await deliver(billing, ev.consent("alpha", "p1", "c-p1", status="entered-in-error",
                                      version=2))
    assert (await listed(billing, "refund-due"), await listed(billing, "repayment-due")) == (
        [inv], [])
    await api(billing).post(f"/v1/invoices/{inv}/refunds", json={
        "amount": "75.33", "date": "2025-04-12"})
    assert await listed(billing, "refund-due") == []
    payment = r.json()["payment"]["id"]
    await api(billing).post(f"/v1/invoices/{inv}/payments/{payment}/void",
                            json={"reason": "cheque bounced"})
    assert (await listed(billing, "refund-due"), await listed(billing, "repayment-due")) == (
        [], [inv])
    billing.state["clock"].now = datetime(2025, 6, 1, 12, tzinfo=UTC)  # past its due date
    assert (await run_once(billing))["overdue"] == 0
    assert await listed(billing, "overdue") == [] and await outboxed(
        billing, "billing.invoice.overdue.v1") == []
