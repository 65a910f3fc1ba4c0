"""The same payment sent twice at once, on PostgreSQL, records one: with its Idempotency-Key
(no reference), the second request waits for the invoice the first holds, then finds the
first's payment by its key and answers it (200). Before, both were recorded."""

from __future__ import annotations

import asyncio
from datetime import date
from decimal import Decimal

import pytest
from sqlalchemy import select

from ccm_billing.adapters import orm
from ccm_billing.domain.model import Month
from ccm_billing.service_layer import invoicing
from tests.integration.billing.payments.payment_support import (
    CLOSE_AT,
    assert_money_is_coherent,
    deliver,
    march_events,
    outboxed,
)
from tests.integration.billing.payments.test_payment_races_on_postgres import waits_for

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def closed(b) -> str:  # noqa: ANN001
    await deliver(b.runtime, *march_events(b.practice))
    async with b.runtime.db.unit_of_work() as uow:
        result = await invoicing.close_period(uow, b.practice, Month(2025, 3), CLOSE_AT)
        await uow.commit()
    return result["invoice"]["id"]


async def pay(b, invoice: str, key: str, uow=None):  # noqa: ANN001, ANN201
    if uow is not None:
        return await invoicing.record_payment(uow, b.practice, invoice, amount=Decimal("10.00"),
                                              paid_on=date(2025, 4, 10), reference=None,
                                              now=CLOSE_AT, idempotency_key=key)
    async with b.runtime.db.unit_of_work() as own:
        result = await pay(b, invoice, key, own)
        await own.commit()
    return result


async def payments(b, invoice: str) -> list:  # noqa: ANN001
    p = orm.payments
    async with b.runtime.db.engine.connect() as conn:
        return (await conn.execute(select(p).where(p.c.invoice_id == invoice))).all()


async def test_a_retry_waiting_for_its_first_attempt_answers_its_payment(postgres):
    b = postgres
    invoice = await closed(b)
    async with b.runtime.db.unit_of_work() as first:
        recorded = await pay(b, invoice, "k-1", first)
        (again,) = await waits_for(first, pay(b, invoice, "k-1"), "the retry")
    assert not isinstance(again, BaseException), again
    assert again.replayed and not recorded.replayed
    assert again["payment"] == recorded["payment"] and again["invoice"]["paid"] == "10.00"
    assert len(await payments(b, invoice)) == 1
    assert len(await outboxed(b.runtime, b.practice, "billing.payment.recorded.v1")) == 1
    await assert_money_is_coherent(b.runtime, b.practice)


async def test_the_same_request_sent_four_times_at_once_over_http_is_one_payment(postgres):
    b = postgres
    invoice = await closed(b)
    headers = {**b.headers(), "Idempotency-Key": "retry-7f3a"}
    answers = await asyncio.gather(*(b.client.post(
        f"/v1/invoices/{invoice}/payments", headers=headers,
        json={"amount": "10.00", "date": "2025-04-10"}) for _ in range(4)))
    assert sorted(r.status_code for r in answers) == [200, 200, 200, 201], [
        r.text for r in answers]
    assert len({r.json()["payment"]["id"] for r in answers}) == 1
    assert [x.amount for x in await payments(b, invoice)] == ["10.00"]
    await assert_money_is_coherent(b.runtime, b.practice)
