"""Voids, refunds and corrections of one month at the same time, on PostgreSQL: each waits for
the one holding the invoice, then works on what it left. A void never misses a copy a
correction carried, a refund never pays back more than was overpaid, nor lands on an invoice a
correction replaced meanwhile."""

from __future__ import annotations

import asyncio
from datetime import date
from decimal import Decimal

import pytest

from ccm_billing.domain.model import Month
from ccm_billing.service_layer import invoicing
from ccm_shared.errors import Conflict, InvalidInput
from tests.integration.billing.payments.payment_support import (
    CLOSE_AT,
    assert_money_is_coherent,
    deliver,
    lowered,
    march_events,
    money,
    outboxed,
    raised,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
WAIT = 1.0  # long enough for a statement that does not wait to have finished


async def closed_and_paid(b, amount: str) -> tuple[str, str]:  # noqa: ANN001
    """March closed (75.33) and paid ``amount``: (the invoice, the payment)."""
    await deliver(b.runtime, *march_events(b.practice))
    async with b.runtime.db.unit_of_work() as uow:
        result = await invoicing.close_period(uow, b.practice, Month(2025, 3), CLOSE_AT)
        invoice = result["invoice"]["id"]
        paid = await invoicing.record_payment(uow, b.practice, invoice, amount=Decimal(amount),
                                              paid_on=date(2025, 4, 10), reference="chk-1",
                                              now=CLOSE_AT)
        await uow.commit()
    return invoice, paid["payment"]["id"]


async def voided(b, invoice: str, payment: str, uow=None) -> dict:  # noqa: ANN001
    """Void the payment in ``uow`` (left open), or in a transaction of its own (committed)."""
    if uow is not None:
        return await invoicing.void_payment(uow, b.practice, invoice, payment, reason="bounced",
                                            actor="t", actor_label=None, now=CLOSE_AT)
    async with b.runtime.db.unit_of_work() as own:
        result = await voided(b, invoice, payment, own)
        await own.commit()
    return result


async def refunded(b, invoice: str, amount: str, uow=None) -> dict:  # noqa: ANN001
    if uow is not None:
        return await invoicing.record_refund(uow, b.practice, invoice, amount=Decimal(amount),
                                             refunded_on=date(2025, 4, 20), reference=None,
                                             now=CLOSE_AT)
    async with b.runtime.db.unit_of_work() as own:
        result = await refunded(b, invoice, amount, own)
        await own.commit()
    return result


async def corrected(b, event, uow=None) -> None:  # noqa: ANN001
    handler = b.runtime.definition.consumers(b.runtime)[0].handler
    if uow is not None:
        await handler(event, uow)
        return
    async with b.runtime.db.unit_of_work() as own:
        await handler(event, own)
        await own.commit()


async def waits_for(holding, work, what: str):  # noqa: ANN001, ANN201
    """Start ``work`` while ``holding`` (a transaction not yet committed) holds the invoice:
    it must wait, then go on once ``holding`` commits; its result (or error)."""
    task = asyncio.create_task(work)
    await asyncio.sleep(WAIT)
    assert not task.done(), f"{what} went on while the invoice was held"
    await holding.commit()
    return await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), timeout=30)


async def test_a_void_waiting_for_a_correction_voids_the_copy_it_carried(postgres):
    """The correction reissues the month (carrying the payment) while the void waits: the void
    then finds the replacement and voids the payment there too, naming it."""
    b = postgres
    invoice, payment = await closed_and_paid(b, "75.33")
    async with b.runtime.db.unit_of_work() as correcting:
        await corrected(b, lowered(b.practice, 2), correcting)
        (result,) = await waits_for(correcting, voided(b, invoice, payment), "the void")
    assert not isinstance(result, BaseException), result
    invoices = await assert_money_is_coherent(b.runtime, b.practice)
    old, new = invoices
    assert (old.status, old.paid, new.status, new.paid, new.total_net) == (
        "cancelled", "0.00", "issued", "0.00", "42.00")
    (event,) = await outboxed(b.runtime, b.practice, "billing.payment.voided.v1")
    assert event["data"]["invoiceId"] == new.id and len(event["data"]["voided"]) == 2


async def test_a_correction_waiting_for_a_void_carries_the_payment_voided(postgres):
    b = postgres
    invoice, payment = await closed_and_paid(b, "75.33")
    async with b.runtime.db.unit_of_work() as voiding:
        await voided(b, invoice, payment, voiding)
        (result,) = await waits_for(voiding, corrected(b, lowered(b.practice, 2)),
                                    "the correction")
    assert not isinstance(result, BaseException), result
    old, new = await assert_money_is_coherent(b.runtime, b.practice)
    assert (new.status, new.payment_status, new.paid) == ("issued", "issued", "0.00")
    _, pays, _ = await money(b.runtime, b.practice)
    assert [x.void_reason for x in pays[new.id]] == ["bounced"]
    issued = (await outboxed(b.runtime, b.practice, "billing.invoice.issued.v1"))[-1]["data"]
    assert (issued["invoiceId"], issued["paid"], issued["balance"]) == (new.id, "0.00", "42.00")


async def test_a_refund_waiting_for_a_refund_sees_what_is_left_owed(postgres):
    b = postgres
    invoice, _ = await closed_and_paid(b, "75.33")
    await corrected(b, lowered(b.practice, 2))  # owes 33.33 back
    _, new = (await money(b.runtime, b.practice))[0]
    async with b.runtime.db.unit_of_work() as first:
        await refunded(b, new.id, "20.00", first)
        (second,) = await waits_for(first, refunded(b, new.id, "20.00"), "the second refund")
    assert isinstance(second, InvalidInput) and "owes back (13.33)" in second.detail
    _, new = await assert_money_is_coherent(b.runtime, b.practice)
    assert (new.refunded, new.paid) == ("20.00", "55.33")


async def test_a_refund_waiting_for_a_correction_is_not_recorded_on_the_invoice_it_replaced(
        postgres):
    """Owed 33.33 back on the 42.00 replacement; a correction back to 75.33 holds it while a
    refund of the 33.33 waits: the refund is refused (the replacement owes nothing back),
    never recorded where no invoice counts it."""
    b = postgres
    await closed_and_paid(b, "75.33")
    await corrected(b, lowered(b.practice, 2))
    _, overpaid = (await money(b.runtime, b.practice))[0]
    async with b.runtime.db.unit_of_work() as correcting:
        await corrected(b, raised(b.practice, 3), correcting)
        (result,) = await waits_for(correcting, refunded(b, overpaid.id, "33.33"), "the refund")
    invoices = await assert_money_is_coherent(b.runtime, b.practice)
    assert [(x.status, x.paid, x.refunded) for x in invoices] == [
        ("cancelled", "75.33", "0.00"), ("cancelled", "75.33", "0.00"),
        ("balanced", "75.33", "0.00")]
    # It names the month's current invoice, where the refund belongs.
    assert isinstance(result, Conflict)
    assert f"its month's current invoice is {invoices[-1].id}" in result.detail
    assert await outboxed(b.runtime, b.practice, "billing.payment.refunded.v1") == []


async def test_refunds_sent_together_never_pay_back_more_than_was_overpaid(postgres):
    """Through the API, four refunds of 20.00 at once for 33.33 owed back: one is recorded."""
    b = postgres
    await closed_and_paid(b, "75.33")
    await corrected(b, lowered(b.practice, 2))
    _, new = (await money(b.runtime, b.practice))[0]
    answers = await asyncio.gather(*(b.post(f"/v1/invoices/{new.id}/refunds", json={
        "amount": "20.00", "date": "2025-04-20", "reference": f"rf-{n}"}) for n in range(4)))
    assert sorted(r.status_code for r in answers) == [201, 422, 422, 422]
    again = await asyncio.gather(*(b.post(f"/v1/invoices/{new.id}/refunds", json={
        "amount": "10.00", "date": "2025-04-20", "reference": f"rg-{n}"}) for n in range(4)))
    assert sorted(r.status_code for r in again) == [201, 422, 422, 422]  # 13.33 left: one fits
    _, new = await assert_money_is_coherent(b.runtime, b.practice)
    assert (new.refunded, new.paid) == ("30.00", "45.33")
    assert len(await outboxed(b.runtime, b.practice, "billing.payment.refunded.v1")) == 2
