"""An invoice cancelled after its ``invoice-issued`` email was addressed, on real PostgreSQL:
the email waiting to be sent (due, or for an SMTP retry) is withdrawn, never sent; one already
sent stays sent; one the dispatcher is sending at that moment is left to that attempt, and if
the attempt fails it is withdrawn at its next claim instead of being retried.

The messages are made and dispatched on a clock decades ahead and by a dispatcher that claims
this practice's messages only: no other dispatcher on the database (another test's) takes them,
and this one takes no one else's."""

import asyncio
import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy import text as sql

from ccm_notification.adapters.channels import DeliveryResult, Outgoing
from ccm_notification.adapters.orm import messages, outbox, practice_contacts
from ccm_notification.adapters.sql import upsert
from ccm_notification.bootstrap import SERVICE
from ccm_notification.entrypoints.workers import notifier_of
from ccm_notification.service_layer.directory import edit_provider
from ccm_notification.service_layer.dispatch import Dispatcher
from ccm_notification.service_layer.handlers import alerts_handler
from ccm_shared.events import CloudEvent
from tests.support.infra import api_on_postgres

pytestmark = pytest.mark.asyncio(loop_scope="session")

AHEAD = datetime(2091, 3, 1, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = AHEAD

    def __call__(self) -> datetime:
        return self.now


class Mailbox:
    """An email channel answering per recipient: accepted, or a transient refusal."""

    def __init__(self, refusing: set[str]) -> None:
        self.refusing, self.sent = refusing, []

    async def send(self, out: Outgoing) -> DeliveryResult:
        if out.recipient in self.refusing:
            return DeliveryResult(False, "451 4.3.0 try again later")
        self.sent.append(out.recipient)
        return DeliveryResult(True, "250 queued")


@dataclasses.dataclass
class PracticeDispatcher(Dispatcher):
    """The service's dispatcher, claiming one practice's messages."""

    practice: str = ""

    def due(self, now: datetime):  # noqa: ANN201
        return super().due(now).where(messages.c.practice == self.practice)


@dataclasses.dataclass
class Scene:
    rt: object
    practice: str
    clock: Clock
    notifier: object
    mailbox: Mailbox
    dispatcher: PracticeDispatcher

    async def apply(self, event: CloudEvent) -> None:
        async with self.rt.db.unit_of_work() as uow:
            await alerts_handler(self.notifier)(event, uow)
            await uow.commit()

    async def invoice_messages(self, invoice_id: str) -> dict[str, object]:
        """The invoice's ``invoice-issued`` messages by recipient."""
        async with self.rt.db.unit_of_work() as uow:
            rows = (await uow.session.execute(select(messages).where(
                messages.c.practice == self.practice, messages.c.kind == "invoice-issued",
                messages.c.tracker == f"invoice:{invoice_id}"))).all()
        return {r.recipient: r for r in rows}

    async def failed_events(self) -> list[dict]:
        async with self.rt.db.unit_of_work() as uow:
            rows = (await uow.session.execute(select(outbox.c.payload).where(
                outbox.c.tenant == self.practice,
                outbox.c.event_type == "notification.message.failed.v1"))).scalars().all()
        return [json.loads(p)["data"] for p in rows]


@pytest_asyncio.fixture(loop_scope="session")
async def scene(infra):
    """A practice whose summary recipients are ann and bob; bob's mail server refuses for now."""
    async with api_on_postgres(infra.database_url, SERVICE, "unsent") as (rt, _, practice, _h):
        clock = Clock()
        notifier = dataclasses.replace(notifier_of(rt), clock=clock)
        async with rt.db.unit_of_work() as uow:
            for who in ("ann", "bob"):
                await edit_provider(uow, practice, who, {"name": who, "email": f"{who}@x.test"},
                                    (), actor="test", now=AHEAD, if_match=None)
            await upsert(uow.session, practice_contacts, {"practice": practice},
                         {"supervisor": None, "on_call": None,
                          "summary_recipients": ["ann", "bob"], "updated_at": AHEAD})
            await uow.commit()
        mailbox = Mailbox({"bob@x.test"})
        yield Scene(rt, practice, clock, notifier, mailbox,
                    PracticeDispatcher(rt.db, notifier, {"email": mailbox}, practice=practice))


def invoice_event(practice: str, kind: str, invoice_id: str, **extra) -> CloudEvent:  # noqa: ANN003
    return CloudEvent(
        source="/ccm/billing", type=f"billing.invoice.{kind}.v1", tenant=practice,
        subject=f"Invoice/{invoice_id}", id=str(uuid.uuid4()),
        data={"invoiceId": invoice_id, "month": "2026-10", "revision": 0,
              "status": "cancelled" if kind == "cancelled" else "issued",
              "totalNet": "839.80", "totalGross": "839.80", "invoice": {}, "replaces": None,
              "replacedBy": None, "reason": None, "paid": "0.00", "balance": "839.80"} | extra)


def unsent(invoice_id: str) -> str:
    return (f"not sent: invoice {invoice_id} was cancelled (replaced by invoice "
            f"{invoice_id}-r1) before this message was sent")


async def test_a_cancellation_withdraws_the_email_waiting_for_a_retry_and_keeps_the_sent_one(
        scene):
    invoice = f"inv-{uuid.uuid4().hex[:8]}"
    await scene.apply(invoice_event(scene.practice, "issued", invoice))
    assert await scene.dispatcher.run_once() == 2
    before = await scene.invoice_messages(invoice)
    assert before["ann@x.test"].status == "sent"
    waiting = before["bob@x.test"]
    assert (waiting.status, waiting.attempts) == ("pending", 1)
    assert waiting.next_attempt_at > scene.clock.now  # an SMTP retry is scheduled
    failed_before = len(await scene.failed_events())

    cancelled = invoice_event(scene.practice, "cancelled", invoice, replacedBy=f"{invoice}-r1")
    await scene.apply(cancelled)
    after = await scene.invoice_messages(invoice)
    assert after["ann@x.test"].status == "sent"  # it went out: nothing to undo
    bob = after["bob@x.test"]
    assert (bob.status, bob.next_attempt_at, bob.last_error) == ("failed", None, unsent(invoice))
    failed = (await scene.failed_events())[failed_before:]
    assert [(f["message"], f["reason"], f["attempts"]) for f in failed] == [
        (bob.id, unsent(invoice), 1)]

    scene.mailbox.refusing.clear()  # bob's server would take it now
    scene.clock.now += timedelta(days=1)
    assert await scene.dispatcher.run_once() == 0
    assert scene.mailbox.sent == ["ann@x.test"]
    await scene.apply(cancelled.model_copy(update={"id": str(uuid.uuid4())}))  # redelivered
    assert len(await scene.failed_events()) == failed_before + 1


@pytest.mark.parametrize("attempt_ok", [False, True], ids=["attempt-fails", "attempt-succeeds"])
async def test_an_email_being_sent_is_left_to_its_attempt_and_not_retried_after_it(
        scene, attempt_ok):
    """Claimed (``sending``) when the cancellation comes: the cancellation leaves it alone. The
    attempt answered: sent stays sent; failed is not retried but withdrawn at its next claim."""
    scene.mailbox.refusing = set() if attempt_ok else {"ann@x.test", "bob@x.test"}
    invoice = f"inv-{uuid.uuid4().hex[:8]}"
    await scene.apply(invoice_event(scene.practice, "issued", invoice))
    claimed = await scene.dispatcher.claim()
    assert sorted(r.recipient for r in claimed) == ["ann@x.test", "bob@x.test"]
    await scene.apply(invoice_event(scene.practice, "cancelled", invoice,
                                    replacedBy=f"{invoice}-r1"))
    assert {r.status for r in (await scene.invoice_messages(invoice)).values()} == {"sending"}

    await asyncio.gather(*(scene.dispatcher.deliver(row) for row in claimed))
    scene.clock.now += timedelta(days=1)
    scene.mailbox.refusing.clear()
    sent_before = list(scene.mailbox.sent)
    assert await scene.dispatcher.run_once() == 0
    assert scene.mailbox.sent == sent_before
    rows = (await scene.invoice_messages(invoice)).values()
    if attempt_ok:
        assert {(r.status, r.last_error) for r in rows} == {("sent", None)}
    else:
        assert {(r.status, r.next_attempt_at, r.last_error) for r in rows} == {
            ("failed", None, unsent(invoice))}


async def test_a_cancellation_waits_for_a_claim_in_progress_and_leaves_what_it_claimed(scene):
    """The dispatcher's claim holds the row (FOR UPDATE) when the cancellation reads it: the
    cancellation waits, then reads the claimed row again and leaves it to the attempt."""
    scene.mailbox.refusing = set()
    invoice = f"inv-{uuid.uuid4().hex[:8]}"
    await scene.apply(invoice_event(scene.practice, "issued", invoice))
    async with scene.rt.db.unit_of_work() as claim:  # a claim in progress: rows locked
        rows = (await claim.session.execute(select(messages).where(
            messages.c.practice == scene.practice, messages.c.kind == "invoice-issued",
            messages.c.tracker == f"invoice:{invoice}").with_for_update())).all()
        assert len(rows) == 2
        holder = (await claim.session.execute(sql("SELECT pg_backend_pid()"))).scalar_one()
        cancelling = asyncio.create_task(scene.apply(invoice_event(
            scene.practice, "cancelled", invoice, replacedBy=f"{invoice}-r1")))
        async with scene.rt.db.engine.connect() as conn:
            for _ in range(1000):
                waiting = (await conn.execute(sql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE :holder = ANY(pg_blocking_pids(pid))"), {"holder": holder})
                ).scalar_one()
                if waiting or cancelling.done():
                    break
                await conn.rollback()  # pg_stat_activity is read once per transaction
                await asyncio.sleep(0.02)
        assert not cancelling.done(), cancelling.exception()
        assert waiting, "the cancellation never waited for the claimed rows"
        await claim.session.execute(messages.update().where(
            messages.c.id.in_([r.id for r in rows])).values(
            status="sending", attempts=1, next_attempt_at=scene.clock.now + timedelta(minutes=5)))
        await claim.commit()
    await cancelling
    after = (await scene.invoice_messages(invoice)).values()
    assert {(r.status, r.attempts) for r in after} == {("sending", 1)}
