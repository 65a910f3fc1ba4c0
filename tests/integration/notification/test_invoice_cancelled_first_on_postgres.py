"""An invoice's ``billing.invoice.issued.v1`` and ``billing.invoice.cancelled.v1`` travel on
topics of their own, so notification may consume the cancellation first. Either way round, on
real PostgreSQL, the practice is never told to pay the cancelled invoice: an ``invoice-issued``
message held when the cancellation comes is withdrawn, and one whose cancellation came first is
never made (recorded as not sent, once)."""

import asyncio
import json
import uuid

import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import invoice_cancellations, messages, outbox
from ccm_notification.bootstrap import SERVICE
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.events import CloudEvent, to_message
from tests.support.infra import api_on_postgres

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    async with api_on_postgres(infra.database_url, SERVICE, "cancel1st") as (
            rt, client, practice, headers):
        now = rt.clock()
        async with rt.db.unit_of_work() as uow:
            await edit_provider(uow, practice, "ann", {"name": "Ann", "email": "ann@x.test"}, (),
                                actor="test", now=now, if_match=None)
            await uow.commit()
        yield rt, client, practice, headers


def _invoice(practice: str, kind: str, invoice_id: str, **extra) -> CloudEvent:  # noqa: ANN003
    return CloudEvent(
        source="/ccm/billing", type=f"billing.invoice.{kind}.v1", tenant=practice,
        subject=f"Invoice/{invoice_id}", id=str(uuid.uuid4()),
        data={"invoiceId": invoice_id, "month": "2026-10", "revision": 0,
              "status": "cancelled" if kind == "cancelled" else "issued",
              "totalNet": "839.80", "totalGross": "839.80", "invoice": {}, "replaces": None,
              "replacedBy": None, "reason": None, "paid": "0.00", "balance": "839.80"} | extra)


async def apply(rt, *events: CloudEvent) -> None:  # noqa: ANN001
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    for event in events:
        await alerts.process(to_message(event.type, event))
    assert alerts.stats.dead_lettered == 0


async def invoice_messages(rt, practice: str, invoice_id: str) -> list:  # noqa: ANN001
    """The practice's messages about the invoice (``invoice-issued``, ``invoice-cancelled``)."""
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(messages).where(
            messages.c.practice == practice).order_by(messages.c.created_at))).all()
    return [r for r in rows if (r.fields or {}).get("invoice_id") == invoice_id]


async def failed_events(rt, practice: str) -> list[dict]:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(outbox.c.payload).where(
            outbox.c.tenant == practice,
            outbox.c.event_type == "notification.message.failed.v1"))).scalars().all()
    return [json.loads(p)["data"] for p in rows]


async def set_contacts(client, practice: str, headers: dict, *who: str) -> None:  # noqa: ANN001
    r = await client.put(f"/v1/practices/{practice}/contacts", headers=headers,
                         json={"supervisor": None, "summary_recipients": list(who)})
    assert r.status_code == 200, r.text


def _never_sent(rows) -> bool:  # noqa: ANN001
    """No row of them is, or will be, sent: each failed (withdrawn or not made)."""
    return all(r.status == "failed" for r in rows)


@pytest.mark.parametrize("contacts", [True, False], ids=["with-contacts", "before-contacts"])
async def test_a_replacement_cancellation_consumed_first_means_no_invoice_issued_email(
        api, contacts):
    rt, client, practice, headers = api
    await set_contacts(client, practice, headers, *(["ann"] if contacts else []))
    invoice = f"inv-{uuid.uuid4().hex[:8]}"
    before = len(await failed_events(rt, practice))
    issued = _invoice(practice, "issued", invoice)
    await apply(rt, _invoice(practice, "cancelled", invoice, replacedBy=f"{invoice}-r1",
                             reason="corrected"), issued)
    [row] = await invoice_messages(rt, practice, invoice)
    assert (row.kind, row.status, row.next_attempt_at, row.recipient) == (
        "invoice-issued", "failed", None, None)
    assert row.last_error == (f"not sent: invoice {invoice} was cancelled (replaced by invoice "
                              f"{invoice}-r1) before its issue was processed")
    failed = (await failed_events(rt, practice))[before:]
    assert [(f["kind"], f["message"]) for f in failed] == [("invoice-issued", row.id)]
    # billing re-publishes the issued event (or the group is reset): still nothing, once
    await apply(rt, issued.model_copy(update={"id": str(uuid.uuid4())}), issued)
    assert [r.id for r in await invoice_messages(rt, practice, invoice)] == [row.id]
    assert len(await failed_events(rt, practice)) == before + 1
    # contacts saved later: nothing of this invoice is released
    await set_contacts(client, practice, headers, "ann")
    assert _never_sent(await invoice_messages(rt, practice, invoice))


async def test_a_cancellation_leaving_nothing_to_bill_consumed_first_sends_only_the_cancellation(
        api):
    rt, client, practice, headers = api
    await set_contacts(client, practice, headers)  # none yet: both would be held
    invoice = f"inv-{uuid.uuid4().hex[:8]}"
    await apply(rt, _invoice(practice, "cancelled", invoice, reason="corrected: nothing left"),
                _invoice(practice, "issued", invoice))
    rows = await invoice_messages(rt, practice, invoice)
    assert sorted((r.kind, r.status) for r in rows) == [
        ("invoice-cancelled", "pending"), ("invoice-issued", "failed")]
    await set_contacts(client, practice, headers, "ann")
    rows = {r.kind: r for r in await invoice_messages(rt, practice, invoice)}
    assert rows["invoice-cancelled"].recipient == "ann@x.test"
    assert rows["invoice-cancelled"].next_attempt_at is not None  # released: it is sent
    assert rows["invoice-issued"].status == "failed" and rows["invoice-issued"].recipient is None


async def test_the_usual_order_withdraws_the_held_email_and_a_late_replay_adds_nothing(api):
    """Issued, then cancelled (billing's order): the held message is withdrawn, as before; the
    issued event delivered again afterwards finds it and records nothing more."""
    rt, client, practice, headers = api
    await set_contacts(client, practice, headers)
    invoice = f"inv-{uuid.uuid4().hex[:8]}"
    issued = _invoice(practice, "issued", invoice)
    await apply(rt, issued)
    [held] = await invoice_messages(rt, practice, invoice)
    assert (held.status, held.next_attempt_at) == ("pending", None)
    before = len(await failed_events(rt, practice))
    await apply(rt, _invoice(practice, "cancelled", invoice, replacedBy=f"{invoice}-r1"))
    [row] = await invoice_messages(rt, practice, invoice)
    assert (row.id, row.status) == (held.id, "failed")
    assert row.last_error.startswith(f"not sent: invoice {invoice} was cancelled (replaced by")
    await apply(rt, issued.model_copy(update={"id": str(uuid.uuid4())}))
    await set_contacts(client, practice, headers, "ann")
    assert [(r.id, r.status) for r in await invoice_messages(rt, practice, invoice)] == [
        (held.id, "failed")]
    assert len(await failed_events(rt, practice)) == before + 1


async def test_issued_and_cancelled_applied_at_once_never_leave_an_email_to_send(api):
    """The two consumed at the same moment (two topics, two transactions): whichever commits
    second sees the other (a per-invoice lock), so the email is withdrawn or never made."""
    rt, client, practice, headers = api
    await set_contacts(client, practice, headers)
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    invoices = [f"inv-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    pairs = [(_invoice(practice, "issued", i), _invoice(practice, "cancelled", i,
                                                         replacedBy=f"{i}-r1"))
             for i in invoices]
    await asyncio.gather(*(alerts.process(to_message(e.type, e))
                           for n, pair in enumerate(pairs)
                           for e in (pair if n % 2 else reversed(pair))))
    assert alerts.stats.dead_lettered == 0
    await set_contacts(client, practice, headers, "ann")
    for invoice in invoices:
        rows = await invoice_messages(rt, practice, invoice)
        assert [r.kind for r in rows] == ["invoice-issued"] and _never_sent(rows), invoice
    async with rt.db.unit_of_work() as uow:
        recorded = (await uow.session.execute(select(invoice_cancellations.c.invoice_id).where(
            invoice_cancellations.c.practice == practice))).scalars().all()
    assert set(invoices) <= set(recorded)
