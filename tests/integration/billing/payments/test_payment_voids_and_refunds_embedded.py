"""Voids and refunds on the embedded database (SQLite, as `ccm up` runs billing): the same
statements as on PostgreSQL, through the API."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.integration.billing.payments.payment_support import (
    assert_money_is_coherent,
    deliver,
    lowered,
    outboxed,
    raised,
)
from tests.unit.billing.test_billing_flow import api, march_practice


async def test_pay_correct_refund_void_and_correct_again_on_sqlite(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    alpha = api(billing)
    inv = (await alpha.post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    paid = await alpha.post(f"/v1/invoices/{inv['id']}/payments",
                            json={"amount": "75.33", "date": "2025-04-10", "reference": "chk-1"})
    assert paid.status_code == 201, paid.text
    await deliver(billing, lowered("alpha", 2))  # 42.00: 33.33 owed back
    new = (await alpha.get(f"/v1/invoices/{inv['id']}")).json()["replacedBy"]
    refund = await alpha.post(f"/v1/invoices/{new}/refunds",
                              json={"amount": "33.33", "date": "2025-04-20"})
    assert refund.status_code == 201, refund.text
    assert (refund.json()["invoice"]["balance"], refund.json()["invoice"]["status"]) == (
        "0.00", "balanced")
    payment = paid.json()["payment"]["id"]
    void = await alpha.post(f"/v1/invoices/{inv['id']}/payments/{payment}/void",
                            json={"reason": "cheque bounced"})
    assert void.status_code == 200, void.text
    got = (await alpha.get(f"/v1/invoices/{new}")).json()
    assert (got["status"], got["paid"], got["refunded"], got["balance"]) == (
        "issued", "-33.33", "33.33", "75.33")
    await deliver(billing, raised("alpha", 3))  # 75.33 again: owed 75.33 + the 33.33 refunded
    latest = (await alpha.get(f"/v1/invoices/{got['id']}")).json()["replacedBy"]
    last = (await alpha.get(f"/v1/invoices/{latest}")).json()
    assert (last["status"], last["paid"], last["balance"]) == ("issued", "-33.33", "108.66")
    assert [p["voided"]["reason"] for p in last["payments"]] == ["cheque bounced"]
    await assert_money_is_coherent(billing, "alpha")
    assert len(await outboxed(billing, "alpha", "billing.payment.voided.v1")) == 1
    assert len(await outboxed(billing, "alpha", "billing.payment.refunded.v1")) == 1
