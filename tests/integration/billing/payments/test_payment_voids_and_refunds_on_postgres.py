"""Voiding a payment and refunding what a practice overpaid, through the API on PostgreSQL:
states, figures, events (checked against their contracts), carry-over into replacements,
tenancy and scope, idempotency."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ccm_billing.service_layer.common import practice_info
from ccm_billing.service_layer.invoicing import mark_overdue
from ccm_shared.tenancy import create_token
from tests.integration.billing.payments.payment_support import (
    CLOSE_AT,
    assert_money_is_coherent,
    deliver,
    dropped,
    lowered,
    march_events,
    outboxed,
    raised,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

VOIDED, REFUNDED = "billing.payment.voided.v1", "billing.payment.refunded.v1"
PAID, OVERDUE = "billing.invoice.paid.v1", "billing.invoice.overdue.v1"


async def flag_overdue(b) -> int:  # noqa: ANN001
    """The scheduler's overdue pass, for the test's practice only (the database is shared)."""
    async with b.runtime.db.unit_of_work() as uow:
        flagged = await mark_overdue(uow, await practice_info(uow.session, b.practice),
                                     b.clock.now)
        await uow.commit()
    return flagged


async def closed(b) -> dict:  # noqa: ANN001
    await deliver(b.runtime, *march_events(b.practice))
    b.clock.now = CLOSE_AT
    r = await b.post(f"/v1/practices/{b.practice}/billing-periods/2025-03/close")
    assert r.status_code == 200, r.text
    invoice = r.json()["invoice"]
    assert invoice["totalNet"] == "75.33"
    return invoice


def tick(b) -> None:  # noqa: ANN001
    """A second later: what is recorded next lists after what was (by when it was recorded)."""
    b.clock.now += timedelta(seconds=1)


async def pay(b, invoice: str, amount: str, reference: str | None = None) -> dict:  # noqa: ANN001
    tick(b)
    r = await b.post(f"/v1/invoices/{invoice}/payments",
                     json={"amount": amount, "date": "2025-04-10", "reference": reference})
    assert r.status_code == 201, r.text
    return r.json()["payment"]


async def void(b, invoice: str, payment: str, reason: str = "cheque bounced", **kw):  # noqa: ANN001, ANN003, ANN201
    return await b.post(f"/v1/invoices/{invoice}/payments/{payment}/void",
                        json={"reason": reason}, **kw)


async def refund(b, invoice: str, amount: str, reference: str | None = None,  # noqa: ANN001, ANN201
                 day: str = "2025-04-20", practice: str | None = None):
    tick(b)
    return await b.post(f"/v1/invoices/{invoice}/refunds", practice=practice,
                        json={"amount": amount, "date": day, "reference": reference})


async def invoice_of(b, invoice: str) -> dict:  # noqa: ANN001
    r = await b.get(f"/v1/invoices/{invoice}")
    assert r.status_code == 200, r.text
    return r.json()


def figures(inv: dict) -> tuple:
    return inv["status"], inv["paymentStatus"], inv["paid"], inv["refunded"], inv["balance"]


# -- voids ---------------------------------------------------------------------------------------


async def test_a_voided_payment_stays_marked_and_the_paid_invoice_is_issued_again(postgres):
    b = postgres
    inv = await closed(b)
    payment = await pay(b, inv["id"], "75.33", "chk-1")
    assert figures(await invoice_of(b, inv["id"])) == ("balanced", "balanced", "75.33", "0.00",
                                                       "0.00")
    b.clock.now = datetime(2025, 4, 15, 14, tzinfo=UTC)  # before the due date (2 May)
    r = await void(b, inv["id"], payment["id"], "  cheque bounced  ")
    assert r.status_code == 200, r.text
    body = r.json()
    assert figures(body["invoice"]) == ("issued", "issued", "0.00", "0.00", "75.33")
    assert not body["invoice"]["overdue"]
    assert body["payment"]["voided"] == {"at": "2025-04-15T14:00:00+00:00",
                                         "reason": "cheque bounced",
                                         "by": b.token_ids[b.practice], "byLabel": "finance"}
    got = await invoice_of(b, inv["id"])
    assert [(p["id"], p["amount"], p["voided"]["reason"]) for p in got["payments"]] == [
        (payment["id"], "75.33", "cheque bounced")]  # kept, never deleted
    assert (await b.get(f"/fhir/Invoice/{inv['id']}")).json()["status"] == "issued"
    (event,) = await outboxed(b.runtime, b.practice, VOIDED)
    data = event["data"]
    assert (data["invoiceId"], data["paymentId"], data["carriedFrom"], data["amount"],
            data["reference"], data["reason"], data["paid"], data["balance"], data["status"],
            data["invoiceStatus"]) == (inv["id"], payment["id"], None, "75.33", "chk-1",
                                       "cheque bounced", "0.00", "75.33", "issued", "issued")
    assert data["voided"] == [{"invoiceId": inv["id"], "paymentId": payment["id"]}]
    assert await outboxed(b.runtime, b.practice, OVERDUE) == []  # not due yet
    # Again, even for another reason: the same answer, no second event.
    again = await void(b, inv["id"], payment["id"], "recorded twice")
    assert again.status_code == 200 and again.json() == body
    assert len(await outboxed(b.runtime, b.practice, VOIDED)) == 1
    # It counts no more, and leaves its reference free (billing_0022): the payment sent again
    # with it is recorded anew (the cheque re-presented), and pays the invoice in full.
    presented = await pay(b, inv["id"], "75.33", "chk-1")
    assert presented["id"] != payment["id"] and presented["voided"] is None
    assert figures(await invoice_of(b, inv["id"]))[:2] == ("balanced", "balanced")
    assert len(await outboxed(b.runtime, b.practice, PAID)) == 2
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_void_past_the_due_date_makes_the_invoice_overdue_at_once(postgres):
    b = postgres
    inv = await closed(b)
    payment = await pay(b, inv["id"], "75.33")
    b.clock.now = datetime(2025, 5, 10, 12, tzinfo=UTC)  # due 2 May
    assert await flag_overdue(b) == 0  # paid: nothing to flag
    r = await void(b, inv["id"], payment["id"], "chargeback")
    assert r.status_code == 200, r.text
    assert r.json()["invoice"]["overdue"] is True
    assert figures(r.json()["invoice"]) == ("issued", "issued", "0.00", "0.00", "75.33")
    (event,) = await outboxed(b.runtime, b.practice, OVERDUE)
    assert (event["data"]["invoiceId"], event["data"]["status"], event["data"]["paid"],
            event["data"]["balance"]) == (inv["id"], "issued", "0.00", "75.33")
    assert event["data"]["invoice"]["status"] == "issued"
    events = [e["type"] for e in await outboxed(b.runtime, b.practice, VOIDED)]
    assert events == [VOIDED]
    listed = await b.get(f"/v1/practices/{b.practice}/invoices", params={"status": "overdue"})
    assert [x["id"] for x in listed.json()["invoices"]] == [inv["id"]]
    assert await flag_overdue(b) == 0  # flagged once, by the void


async def test_voiding_one_of_two_payments_leaves_the_invoice_partially_paid(postgres):
    b = postgres
    inv = await closed(b)
    first = await pay(b, inv["id"], "50.00", "chk-1")
    await pay(b, inv["id"], "25.33", "chk-2")
    r = await void(b, inv["id"], first["id"], "recorded against the wrong invoice")
    assert figures(r.json()["invoice"]) == ("issued", "partially-paid", "25.33", "0.00", "50.00")
    (event,) = await outboxed(b.runtime, b.practice, VOIDED)
    assert (event["data"]["status"], event["data"]["invoiceStatus"]) == ("partially-paid", "issued")
    await assert_money_is_coherent(b.runtime, b.practice)


@pytest.mark.parametrize("through", ["the replacement's copy", "the cancelled invoice's payment"])
async def test_a_carried_payment_is_voided_wherever_it_counts(postgres, through):
    """Paid 50.00, then corrected to 42.00: the replacement carries the payment (owed 8.00
    back). The bank reverses it: voided through either record, both are voided, the cancelled
    invoice's paid drops with it (its balance stays 0.00: replaced), the replacement is owed
    42.00 again; one event, naming the replacement."""
    b = postgres
    inv = await closed(b)
    original = await pay(b, inv["id"], "50.00", "chk-1")
    await deliver(b.runtime, lowered(b.practice, 2))
    old = await invoice_of(b, inv["id"])
    new = await invoice_of(b, old["replacedBy"])
    assert figures(new) == ("balanced", "balanced", "50.00", "0.00", "-8.00")
    (copy,) = new["payments"]
    assert copy["carriedFrom"] == original["id"]
    target = (new["id"], copy["id"]) if through.startswith("the replacement") else (
        old["id"], original["id"])
    r = await void(b, *target, "chargeback")
    assert r.status_code == 200, r.text
    old, new = await invoice_of(b, old["id"]), await invoice_of(b, new["id"])
    assert figures(old) == ("cancelled", old["paymentStatus"], "0.00", "0.00", "0.00")
    assert figures(new) == ("issued", "issued", "0.00", "0.00", "42.00")
    assert old["payments"][0]["voided"] == new["payments"][0]["voided"]
    assert old["payments"][0]["voided"]["reason"] == "chargeback"
    (event,) = await outboxed(b.runtime, b.practice, VOIDED)
    data = event["data"]
    assert (data["invoiceId"], data["paymentId"], data["carriedFrom"], data["balance"],
            data["invoiceStatus"]) == (new["id"], copy["id"], original["id"], "42.00", "issued")
    assert data["voided"] == [{"invoiceId": old["id"], "paymentId": original["id"]},
                              {"invoiceId": new["id"], "paymentId": copy["id"]}]
    # Through the other record: already voided, the same answer and no event.
    other = (old["id"], original["id"]) if target[0] == new["id"] else (new["id"], copy["id"])
    again = await void(b, *other, "chargeback")
    assert again.status_code == 200 and again.json()["payment"]["voided"] is not None
    assert len(await outboxed(b.runtime, b.practice, VOIDED)) == 1
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_payment_voided_before_a_correction_is_carried_voided(postgres):
    b = postgres
    inv = await closed(b)
    kept = await pay(b, inv["id"], "30.00", "chk-1")
    gone = await pay(b, inv["id"], "20.00", "chk-2")
    await void(b, inv["id"], gone["id"], "recorded in error")
    await deliver(b.runtime, lowered(b.practice, 2))
    new = await invoice_of(b, (await invoice_of(b, inv["id"]))["replacedBy"])
    assert figures(new) == ("issued", "partially-paid", "30.00", "0.00", "12.00")
    carried = {p["carriedFrom"]: p for p in new["payments"]}
    assert carried[gone["id"]]["voided"]["reason"] == "recorded in error"
    assert carried[kept["id"]]["voided"] is None
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_void_of_an_invoice_cancelled_without_replacement_owes_nothing_back(postgres):
    b = postgres
    inv = await closed(b)
    payment = await pay(b, inv["id"], "75.33")
    await deliver(b.runtime, dropped(b.practice))
    assert figures(await invoice_of(b, inv["id"]))[::2] == ("cancelled", "75.33", "-75.33")
    r = await void(b, inv["id"], payment["id"], "cheque bounced")
    assert figures(r.json()["invoice"])[::2] == ("cancelled", "0.00", "0.00")
    (event,) = await outboxed(b.runtime, b.practice, VOIDED)
    assert (event["data"]["invoiceStatus"], event["data"]["balance"]) == ("cancelled", "0.00")
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_voids_are_refused_clearly(postgres):
    b = postgres
    inv = await closed(b)
    payment = await pay(b, inv["id"], "10.00")
    url = f"/v1/invoices/{inv['id']}/payments/{payment['id']}/void"
    for body in ({}, {"reason": ""}, {"reason": "   "}, {"reason": "a\x00b"},
                 {"reason": "x" * 501}, {"reason": "ok", "extra": 1}):
        r = await b.post(url, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert (await b.post(f"/v1/invoices/{inv['id']}/payments/nope/void",
                         json={"reason": "x"})).status_code == 404
    assert (await b.post(f"/v1/invoices/nope/payments/{payment['id']}/void",
                         json={"reason": "x"})).status_code == 404
    # Another practice's invoice and payment do not exist for its token: 404, not 403.
    other = await void(b, inv["id"], payment["id"], practice=b.other)
    assert other.status_code == 404 and other.headers["content-type"] == "application/problem+json"
    # A token without the billing scope: 403, before anything is read.
    ehr = await create_token(b.runtime.db.engine, practice_id=b.practice,
                             scopes=("fhir:read", "fhir:write"))
    r = await b.client.post(url, json={"reason": "x"}, headers={"Authorization": f"Bearer {ehr}"})
    assert r.status_code == 403 and "'billing' scope" in r.text
    assert (await invoice_of(b, inv["id"]))["payments"][0]["voided"] is None
    assert await outboxed(b.runtime, b.practice, VOIDED) == []


# -- refunds -------------------------------------------------------------------------------------


async def overpaid(b) -> tuple[dict, dict]:  # noqa: ANN001
    """Paid 75.33, then corrected to 42.00: (the cancelled invoice, its replacement, owed 33.33
    back)."""
    inv = await closed(b)
    await pay(b, inv["id"], "75.33", "chk-1")
    await deliver(b.runtime, lowered(b.practice, 2))
    old = await invoice_of(b, inv["id"])
    new = await invoice_of(b, old["replacedBy"])
    assert figures(new) == ("balanced", "balanced", "75.33", "0.00", "-33.33")
    return old, new


async def test_a_refund_pays_back_what_was_overpaid_and_the_invoice_stays_settled(postgres):
    b = postgres
    old, new = await overpaid(b)
    too_much = await refund(b, new["id"], "33.34")
    assert too_much.status_code == 422 and "owes back (33.33)" in too_much.json()["detail"]
    for amount in ("0.00", "-1.00", "1.005", "1e3", 5):
        assert (await refund(b, new["id"], amount)).status_code == 422, amount
    replaced = await refund(b, old["id"], "1.00")
    assert replaced.status_code == 409 and new["id"] in replaced.json()["detail"]
    assert (await refund(b, new["id"], "1.00", day="2025-02-28")).status_code == 422
    first = await refund(b, new["id"], "20.00", "rf-1")
    assert first.status_code == 201, first.text
    assert figures(first.json()["invoice"]) == ("balanced", "balanced", "55.33", "20.00",
                                                "-13.33")
    same = await refund(b, new["id"], "20.00", "rf-1")  # sent again: recorded once
    assert same.status_code == 200 and same.json()["refund"] == first.json()["refund"]
    changed = await refund(b, new["id"], "21.00", "rf-1")
    assert changed.status_code == 409
    rest = await refund(b, new["id"], "13.33", "rf-2")
    assert figures(rest.json()["invoice"]) == ("balanced", "balanced", "42.00", "33.33", "0.00")
    settled = await refund(b, new["id"], "0.01")
    assert settled.status_code == 409 and "owes nothing back" in settled.json()["detail"]
    got = await invoice_of(b, new["id"])
    assert [(x["amount"], x["reference"], x["date"]) for x in got["refunds"]] == [
        ("20.00", "rf-1", "2025-04-20"), ("13.33", "rf-2", "2025-04-20")]
    events = await outboxed(b.runtime, b.practice, REFUNDED)
    assert [(e["data"]["amount"], e["data"]["refunded"], e["data"]["balance"],
             e["data"]["status"], e["data"]["invoiceStatus"]) for e in events] == [
        ("20.00", "20.00", "-13.33", "balanced", "balanced"),
        ("13.33", "33.33", "0.00", "balanced", "balanced")]
    assert [e["data"]["refundId"] for e in events] == [x["id"] for x in got["refunds"]]
    # Settled: no payment is taken, and no invoice event said more than its issue and payment.
    assert (await pay_status(b, new["id"], "0.01")) == 422
    assert [e["data"]["invoiceId"] for e in await outboxed(b.runtime, b.practice, PAID)] == [
        old["id"], new["id"]]
    assert (await refund(b, new["id"], "1.00", practice=b.other)).status_code == 404
    ehr = await create_token(b.runtime.db.engine, practice_id=b.practice,
                             scopes=("fhir:read", "fhir:write"))
    r = await b.client.post(f"/v1/invoices/{new['id']}/refunds", headers={
        "Authorization": f"Bearer {ehr}"}, json={"amount": "1.00", "date": "2025-04-20"})
    assert r.status_code == 403 and "'billing' scope" in r.text
    assert len((await invoice_of(b, new["id"]))["refunds"]) == 2  # nothing more recorded
    await assert_money_is_coherent(b.runtime, b.practice)


async def pay_status(b, invoice: str, amount: str) -> int:  # noqa: ANN001
    return (await b.post(f"/v1/invoices/{invoice}/payments",
                         json={"amount": amount, "date": "2025-04-10"})).status_code


async def test_nothing_is_refunded_on_an_invoice_that_owes_nothing_back(postgres):
    b = postgres
    inv = await closed(b)
    await pay(b, inv["id"], "75.33")
    r = await refund(b, inv["id"], "1.00")
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
    assert "owes nothing back (balance 0.00)" in r.json()["detail"]
    assert await outboxed(b.runtime, b.practice, REFUNDED) == []


async def test_an_invoice_cancelled_without_replacement_refunds_what_was_paid(postgres):
    b = postgres
    inv = await closed(b)
    await pay(b, inv["id"], "75.33")
    await deliver(b.runtime, dropped(b.practice))
    r = await refund(b, inv["id"], "75.33", "rf-1")
    assert r.status_code == 201, r.text
    assert figures(r.json()["invoice"])[::2] == ("cancelled", "0.00", "0.00")
    (event,) = await outboxed(b.runtime, b.practice, REFUNDED)
    assert (event["data"]["invoiceStatus"], event["data"]["balance"]) == ("cancelled", "0.00")
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_refunds_are_carried_into_a_later_replacement(postgres):
    """Refunded 33.33 of the 75.33 paid on a 42.00 correction, then the month is corrected back
    to 75.33: the practice owes the 33.33 it was refunded."""
    b = postgres
    _, new = await overpaid(b)
    first = (await refund(b, new["id"], "33.33", "rf-1")).json()["refund"]
    await deliver(b.runtime, raised(b.practice, 3))
    latest = await invoice_of(b, (await invoice_of(b, new["id"]))["replacedBy"])
    assert latest["totalNet"] == "75.33"
    assert figures(latest) == ("issued", "partially-paid", "42.00", "33.33", "33.33")
    assert [(x["amount"], x["carriedFrom"]) for x in latest["refunds"]] == [
        ("33.33", first["id"])]
    issued = (await outboxed(b.runtime, b.practice, "billing.invoice.issued.v1"))[-1]["data"]
    assert (issued["paid"], issued["balance"]) == ("42.00", "33.33")
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_payment_voided_after_its_refund_leaves_the_refund_owed(postgres):
    b = postgres
    _, new = await overpaid(b)
    await refund(b, new["id"], "33.33")
    r = await void(b, new["id"], new["payments"][0]["id"], "cheque bounced")
    assert figures(r.json()["invoice"]) == ("issued", "issued", "-33.33", "33.33", "75.33")
    await assert_money_is_coherent(b.runtime, b.practice)
