"""A payment voided after the overpayment it made was refunded, through the API on PostgreSQL.
The void is recorded (the bank took the money back, whatever was done with it since); the
refund stays, and the practice owes it back on top of the invoice's total: ``paid`` is net and
negative (minus the refund owed back), ``balance`` above the total, the invoice issued (overdue
at once past its due date). The practice pays it back as any payment: the live invoice takes it,
and an invoice cancelled without replacement, which takes no other payment, takes the refund it
is owed back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.integration.billing.payments.payment_support import (
    assert_money_is_coherent,
    deliver,
    dropped,
    outboxed,
)
from tests.integration.billing.payments.test_payment_voids_and_refunds_on_postgres import (
    closed,
    figures,
    invoice_of,
    overpaid,
    pay,
    refund,
    tick,
    void,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

VOIDED, RECORDED = "billing.payment.voided.v1", "billing.payment.recorded.v1"
PAID, OVERDUE = "billing.invoice.paid.v1", "billing.invoice.overdue.v1"


async def post_payment(b, invoice: str, amount: str, reference: str | None = None):  # noqa: ANN001, ANN201
    tick(b)
    return await b.post(f"/v1/invoices/{invoice}/payments",
                        json={"amount": amount, "date": "2025-04-25", "reference": reference})


async def test_the_refund_a_voided_payment_leaves_is_owed_back_and_paid_back(postgres):
    """75.33 paid, corrected to 42.00 (33.33 owed back), 33.33 refunded, then the cheque
    bounces: the practice owes 42.00 for the month and the 33.33 it was sent, 75.33."""
    b = postgres
    _, new = await overpaid(b)
    assert (await refund(b, new["id"], "33.33", "rf-1")).status_code == 201
    b.clock.now = datetime(2025, 4, 22, 12, tzinfo=UTC)
    r = await void(b, new["id"], new["payments"][0]["id"], "cheque bounced")
    assert r.status_code == 200, r.text  # never refused
    assert figures(r.json()["invoice"]) == ("issued", "issued", "-33.33", "33.33", "75.33")
    (event,) = await outboxed(b.runtime, b.practice, VOIDED)
    assert (event["data"]["paid"], event["data"]["balance"], event["data"]["status"],
            event["data"]["invoiceStatus"]) == ("-33.33", "75.33", "issued", "issued")
    got = await invoice_of(b, new["id"])
    assert [x["amount"] for x in got["refunds"]] == ["33.33"]  # the refund stays: it was sent
    # Paid back in part, then in full: partially paid only once something is paid net.
    assert (await post_payment(b, new["id"], "75.34")).status_code == 422
    part = await post_payment(b, new["id"], "33.33", "chk-2")
    assert part.status_code == 201, part.text
    assert figures(part.json()["invoice"]) == ("issued", "issued", "0.00", "33.33", "42.00")
    rest = await post_payment(b, new["id"], "42.00", "chk-3")
    assert figures(rest.json()["invoice"]) == ("balanced", "balanced", "42.00", "33.33", "0.00")
    recorded = await outboxed(b.runtime, b.practice, RECORDED)
    assert [(e["data"]["balance"], e["data"]["status"]) for e in recorded[-2:]] == [
        ("42.00", "issued"), ("0.00", "balanced")]
    assert (await outboxed(b.runtime, b.practice, PAID))[-1]["data"]["invoiceId"] == new["id"]
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_refunded_payment_voided_past_the_due_date_is_overdue_at_once(postgres):
    b = postgres
    _, new = await overpaid(b)
    await refund(b, new["id"], "10.00")  # 23.33 still owed back
    b.clock.now = datetime(2025, 6, 1, 12, tzinfo=UTC)  # the replacement was due on 2 May
    r = await void(b, new["id"], new["payments"][0]["id"], "chargeback")
    assert figures(r.json()["invoice"]) == ("issued", "issued", "-10.00", "10.00", "52.00")
    assert r.json()["invoice"]["overdue"] is True
    (event,) = await outboxed(b.runtime, b.practice, OVERDUE)
    assert (event["data"]["invoiceId"], event["data"]["paid"], event["data"]["balance"]) == (
        new["id"], "-10.00", "52.00")
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_an_invoice_cancelled_without_replacement_takes_back_the_refund_it_is_owed(
        postgres):
    """75.33 paid, then nothing left to bill: the cancelled invoice owes the 75.33 back and
    refunds it; the cheque bounces: the practice owes the 75.33 it was sent. The cancelled
    invoice takes that payment (none other), stays cancelled, and no invoice event follows."""
    b = postgres
    inv = await closed(b)
    first = await pay(b, inv["id"], "75.33", "chk-1")
    await deliver(b.runtime, dropped(b.practice))
    assert (await refund(b, inv["id"], "75.33", "rf-1")).status_code == 201
    r = await void(b, inv["id"], first["id"], "cheque bounced")
    assert figures(r.json()["invoice"])[::2] == ("cancelled", "-75.33", "75.33")
    paid_events = len(await outboxed(b.runtime, b.practice, PAID))
    too_much = await post_payment(b, inv["id"], "75.34")
    assert too_much.status_code == 422 and "exceeds the balance 75.33" in too_much.text
    back = await post_payment(b, inv["id"], "75.33", "chk-back")
    assert back.status_code == 201, back.text
    assert figures(back.json()["invoice"])[::2] == ("cancelled", "0.00", "0.00")
    assert back.json()["payment"]["voided"] is None
    event = (await outboxed(b.runtime, b.practice, RECORDED))[-1]
    assert (event["data"]["paymentId"], event["data"]["balance"], event["data"]["status"]) == (
        back.json()["payment"]["id"], "0.00", "balanced")
    assert len(await outboxed(b.runtime, b.practice, PAID)) == paid_events  # no invoice event
    assert (await b.get(f"/fhir/Invoice/{inv['id']}")).json()["status"] == "cancelled"
    # The same payment sent again is that payment; owed nothing more, nothing else is taken.
    again = await post_payment(b, inv["id"], "75.33", "chk-back")
    assert again.status_code == 200 and again.json()["payment"] == back.json()["payment"]
    settled = await post_payment(b, inv["id"], "0.01", "chk-more")
    assert settled.status_code == 409 and "is cancelled" in settled.json()["detail"]
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_cancelled_invoice_owed_nothing_or_replaced_takes_no_payment(postgres):
    b = postgres
    _, new = await overpaid(b)
    old = await invoice_of(b, new["replaces"])
    replaced = await post_payment(b, old["id"], "1.00")
    assert replaced.status_code == 409 and new["id"] in replaced.json()["detail"]
    await deliver(b.runtime, dropped(b.practice))  # nothing left to bill: 75.33 owed back
    owes_back = await post_payment(b, new["id"], "1.00")
    assert owes_back.status_code == 409
    assert "no current invoice" in owes_back.json()["detail"]
    assert len(await outboxed(b.runtime, b.practice, RECORDED)) == 1  # the first payment only
    await assert_money_is_coherent(b.runtime, b.practice)
