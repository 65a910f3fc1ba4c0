"""A payment (or refund) sent twice records one: its ``Idempotency-Key`` header sent again with
the same body answers what the first recorded (200, nothing recorded, no event); with another
body 422 (a key names one request); a reference sent again with the same details answers
that payment with 200 too (it answered 201, while the docs called it a no-op). Before, a
payment without a reference sent twice (a client retrying after a timeout) was recorded twice."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from ccm_billing.adapters import orm
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver, march_practice, outboxed

PAY = {"amount": "10.00", "date": "2025-04-10"}


async def closed(billing) -> str:  # noqa: ANN001
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    return (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
            ).json()["invoice"]["id"]


async def post(billing, path: str, body: dict, key: str | bytes | None):  # noqa: ANN001, ANN201
    headers = {"Authorization": f"Bearer {billing.state['tokens']['alpha']}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return await billing.state["client"].post(path, json=body, headers=headers)


async def rows(billing, table) -> int:  # noqa: ANN001
    async with billing.db.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(table))).scalar_one()


@pytest.mark.parametrize(("second", "key", "status"), [
    # (the second request's body, its key, what it answers)
    (PAY, "k-1", 200),                                      # the retry: the same payment
    ({**PAY, "amount": "11.00"}, "k-1", 422),               # the key with another amount
    ({**PAY, "date": "2025-04-11"}, "k-1", 422),            # … another date
    ({**PAY, "reference": "chk-9"}, "k-1", 422),            # … another reference
    (PAY, "k-2", 201),                                      # another key: another payment
    (PAY, None, 201),                                       # no key, no reference: recorded
])
async def test_a_payment_sent_again_with_its_key(billing, second, key, status):
    invoice = await closed(billing)
    url = f"/v1/invoices/{invoice}/payments"
    first = await post(billing, url, PAY, "k-1")
    assert first.status_code == 201, first.text
    events = len(await outboxed(billing, "billing.payment.recorded.v1"))
    again = await post(billing, url, second, key)
    assert again.status_code == status, again.text
    recorded = await rows(billing, orm.payments)
    if status == 200:
        assert again.json()["payment"] == first.json()["payment"] and recorded == 1
        assert again.json()["invoice"]["paid"] == "10.00"
        assert len(await outboxed(billing, "billing.payment.recorded.v1")) == events
    elif status == 422:
        assert again.headers["content-type"] == "application/problem+json"
        assert "Idempotency-Key" in again.text and recorded == 1
    else:
        assert again.json()["payment"]["id"] != first.json()["payment"]["id"] and recorded == 2


async def test_the_key_of_a_voided_payment_still_names_it(billing):
    """Unlike a reference (free again once its payment is voided: the cheque presented again),
    a key names the request: its retry answers the voided payment, never records it again."""
    invoice = await closed(billing)
    url = f"/v1/invoices/{invoice}/payments"
    first = (await post(billing, url, PAY, "k-1")).json()["payment"]
    await api(billing).post(f"{url}/{first['id']}/void", json={"reason": "recorded in error"})
    again = await post(billing, url, PAY, "k-1")
    assert again.status_code == 200 and again.json()["payment"]["id"] == first["id"]
    assert again.json()["payment"]["voided"]["reason"] == "recorded in error"
    assert await rows(billing, orm.payments) == 1


async def test_the_key_follows_the_payment_into_a_replacement(billing):
    invoice = await closed(billing)
    first = (await post(billing, f"/v1/invoices/{invoice}/payments", PAY, "k-1")).json()
    await deliver(billing, ev.time_reversed("alpha", "p1", "e2"))  # reissued at 42.00
    new = (await api(billing).get(f"/v1/invoices/{invoice}")).json()["replacedBy"]
    again = await post(billing, f"/v1/invoices/{new}/payments", PAY, "k-1")
    assert again.status_code == 200, again.text
    assert again.json()["payment"]["carriedFrom"] == first["payment"]["id"]


@pytest.mark.parametrize("key", ["", "x" * 201, "ключ".encode(), "a\tb"])
async def test_a_key_that_is_not_1_to_200_printable_ascii_characters_is_422(billing, key):
    invoice = await closed(billing)
    r = await post(billing, f"/v1/invoices/{invoice}/payments", PAY, key)
    assert r.status_code == 422, r.text
    assert await rows(billing, orm.payments) == 0


async def test_a_reference_sent_again_answers_200_and_records_nothing(billing):
    invoice = await closed(billing)
    url = f"/v1/invoices/{invoice}/payments"
    body = {**PAY, "reference": "chk-1"}
    assert (await post(billing, url, body, None)).status_code == 201
    again = await post(billing, url, body, None)
    assert again.status_code == 200 and await rows(billing, orm.payments) == 1
    assert (await post(billing, url, {**body, "amount": "12.00"}, None)).status_code == 409


async def test_a_refund_sent_again_with_its_key_or_reference_is_one_refund(billing):
    invoice = await closed(billing)
    await post(billing, f"/v1/invoices/{invoice}/payments", {**PAY, "amount": "75.33"}, None)
    await deliver(billing, ev.time_reversed("alpha", "p1", "e2"))  # 42.00: 33.33 owed back
    new = (await api(billing).get(f"/v1/invoices/{invoice}")).json()["replacedBy"]
    url = f"/v1/invoices/{new}/refunds"
    refund = {"amount": "5.00", "date": "2025-04-12"}
    assert (await post(billing, url, refund, "r-1")).status_code == 201
    assert (await post(billing, url, refund, "r-1")).status_code == 200
    assert (await post(billing, url, {**refund, "amount": "6.00"}, "r-1")).status_code == 422
    with_reference = {**refund, "reference": "ach-1"}
    assert (await post(billing, url, with_reference, None)).status_code == 201
    assert (await post(billing, url, with_reference, None)).status_code == 200
    got = (await api(billing).get(f"/v1/invoices/{new}")).json()
    assert [x["amount"] for x in got["refunds"]] == ["5.00", "5.00"]
    assert got["balance"] == "-23.33"


async def test_a_payment_recorded_event_carries_paid_and_the_invoice_status(billing):
    """As a void's and a refund's do: what the practice paid net, and the FHIR status."""
    invoice = await closed(billing)
    url = f"/v1/invoices/{invoice}/payments"
    await post(billing, url, PAY, None)
    await post(billing, url, {**PAY, "amount": "65.33"}, None)
    data = [e["data"] for e in await outboxed(billing, "billing.payment.recorded.v1")]
    assert [(d["paid"], d["balance"], d["status"], d["invoiceStatus"]) for d in data] == [
        ("10.00", "65.33", "partially-paid", "issued"),
        ("75.33", "0.00", "balanced", "balanced")]


@pytest.mark.parametrize("blank", ["", "   "])
async def test_an_empty_reference_is_no_reference(billing, blank):  # noqa: ANN001
    """Kept as sent, a second payment with an empty reference on the invoice broke the unique
    index of references (a 500); an empty reference names no check or transfer: none."""
    invoice = await closed(billing)
    url = f"/v1/invoices/{invoice}/payments"
    body = {"amount": "10.00", "date": "2025-04-10", "reference": blank}
    first, second = await post(billing, url, body, None), await post(billing, url, body, None)
    assert (first.status_code, second.status_code) == (201, 201), second.text
    assert first.json().get("reference") is None
    assert await rows(billing, orm.payments) == 2
