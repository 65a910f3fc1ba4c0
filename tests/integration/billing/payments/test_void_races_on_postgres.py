"""A void at the same time as another void, a payment or a refund of the same invoice, on
PostgreSQL: whichever holds the invoice first, the other waits for it, then works on what it
left. Two voids void once; a payment of a voided payment's reference waiting for the void is
recorded anew (the reference is free once the void commits); a void after a refund leaves the
refund owed back, a refund after a void finds nothing owed back."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from ccm_billing.service_layer import invoicing
from ccm_shared.errors import Conflict
from tests.integration.billing.payments.payment_support import (
    CLOSE_AT,
    assert_money_is_coherent,
    deliver,
    dropped,
    lowered,
    money,
    outboxed,
)
from tests.integration.billing.payments.test_payment_races_on_postgres import (
    closed_and_paid,
    corrected,
    refunded,
    voided,
    waits_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
VOIDED = "billing.payment.voided.v1"


async def paid(b, invoice: str, amount: str, reference: str, uow=None) -> dict:  # noqa: ANN001
    """Record a payment in ``uow`` (left open), or in a transaction of its own (committed)."""
    if uow is not None:
        return await invoicing.record_payment(uow, b.practice, invoice, amount=Decimal(amount),
                                              paid_on=date(2025, 4, 12), reference=reference,
                                              now=CLOSE_AT)
    async with b.runtime.db.unit_of_work() as own:
        result = await paid(b, invoice, amount, reference, own)
        await own.commit()
    return result


async def test_two_voids_of_one_payment_void_it_once(postgres):
    b = postgres
    invoice, payment = await closed_and_paid(b, "75.33")
    async with b.runtime.db.unit_of_work() as first:
        mine = await voided(b, invoice, payment, first)
        (second,) = await waits_for(first, voided(b, invoice, payment), "the second void")
    assert not isinstance(second, BaseException), second
    assert second["payment"] == mine["payment"]  # the first's time, reason and actor
    assert (second["invoice"]["paid"], second["invoice"]["balance"]) == ("0.00", "75.33")
    assert len(await outboxed(b.runtime, b.practice, VOIDED)) == 1
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_payment_of_a_reference_waiting_for_its_void_is_recorded_anew(postgres):
    """chk-1 was recorded in error; the void holds the invoice while the cheque is recorded
    again with its reference: once the void commits, the reference is free and the payment is
    recorded (before billing_0022 it was answered with the voided one, and never recorded)."""
    b = postgres
    invoice, payment = await closed_and_paid(b, "75.33")
    async with b.runtime.db.unit_of_work() as voiding:
        await voided(b, invoice, payment, voiding)
        (result,) = await waits_for(voiding, paid(b, invoice, "75.33", "chk-1"), "the payment")
    assert not isinstance(result, BaseException), result
    assert result["payment"]["id"] != payment and result["payment"]["voided"] is None
    assert (result["invoice"]["status"], result["invoice"]["paid"]) == ("balanced", "75.33")
    (_, pays, _) = await money(b.runtime, b.practice)
    assert sorted((x.reference, x.voided_at is None) for x in pays[invoice]) == [
        ("chk-1", False), ("chk-1", True)]
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_void_waiting_for_a_payment_takes_only_its_payment_out(postgres):
    b = postgres
    invoice, payment = await closed_and_paid(b, "50.00")
    async with b.runtime.db.unit_of_work() as paying:
        await paid(b, invoice, "25.33", "chk-2", paying)
        (result,) = await waits_for(paying, voided(b, invoice, payment), "the void")
    assert not isinstance(result, BaseException), result
    assert (result["invoice"]["paymentStatus"], result["invoice"]["paid"],
            result["invoice"]["balance"]) == ("partially-paid", "25.33", "50.00")
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_a_void_waiting_for_a_refund_leaves_the_refund_owed_back(postgres):
    b = postgres
    invoice, payment = await closed_and_paid(b, "75.33")
    await corrected(b, lowered(b.practice, 2))  # 42.00: owes 33.33 back
    _, new = (await money(b.runtime, b.practice))[0]
    async with b.runtime.db.unit_of_work() as refunding:
        await refunded(b, new.id, "33.33", refunding)
        (result,) = await waits_for(refunding, voided(b, invoice, payment), "the void")
    assert not isinstance(result, BaseException), result
    _, new = await assert_money_is_coherent(b.runtime, b.practice)
    assert (new.status, new.paid, new.refunded) == ("issued", "-33.33", "33.33")
    (event,) = await outboxed(b.runtime, b.practice, VOIDED)
    assert (event["data"]["invoiceId"], event["data"]["paid"], event["data"]["balance"]) == (
        new.id, "-33.33", "75.33")


async def test_a_refund_waiting_for_a_void_finds_nothing_owed_back(postgres):
    b = postgres
    invoice, payment = await closed_and_paid(b, "75.33")
    await corrected(b, lowered(b.practice, 2))
    _, new = (await money(b.runtime, b.practice))[0]
    async with b.runtime.db.unit_of_work() as voiding:
        await voided(b, invoice, payment, voiding)
        (result,) = await waits_for(voiding, refunded(b, new.id, "33.33"), "the refund")
    assert isinstance(result, Conflict) and "owes nothing back" in result.detail
    _, new = await assert_money_is_coherent(b.runtime, b.practice)
    assert (new.status, new.paid, new.refunded) == ("issued", "0.00", "0.00")


async def test_a_refund_paid_back_waiting_for_the_void_that_made_it_owed_is_taken(postgres):
    """Nothing left to bill, the 75.33 refunded: the void of the bounced cheque holds the
    cancelled invoice while the practice's repayment waits; then the repayment is taken."""
    b = postgres
    invoice, payment = await closed_and_paid(b, "75.33")
    await deliver(b.runtime, dropped(b.practice))
    await refunded(b, invoice, "75.33")
    async with b.runtime.db.unit_of_work() as voiding:
        await voided(b, invoice, payment, voiding)
        (result,) = await waits_for(voiding, paid(b, invoice, "75.33", "chk-back"),
                                    "the repayment")
    assert not isinstance(result, BaseException), result
    assert (result["invoice"]["status"], result["invoice"]["paid"],
            result["invoice"]["balance"]) == ("cancelled", "0.00", "0.00")
    await assert_money_is_coherent(b.runtime, b.practice)
