"""Held care-plan review messages nobody can receive yet never keep the ones behind them held:
the release reads every held message, a batch at a time, not only the oldest batch (embedded
SQLite, in-process bus)."""

import uuid
from datetime import timedelta

import httpx
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import messages, practice_contacts
from ccm_notification.adapters.sql import upsert
from ccm_notification.bootstrap import SERVICE
from ccm_notification.entrypoints.workers import notifier_of, sweep_and_release
from ccm_notification.service_layer import handlers
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime
from tests.unit.notification.conftest import NOW

BATCH = 3
STUCK = 2 * BATCH + 1  # more than two batches' worth, all older than the releasable one


class Clock:
    """A clock the test moves on, so that every message is older than the next one."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self):  # noqa: ANN204
        return self.now

    def tick(self) -> None:
        self.now += timedelta(minutes=1)


@pytest_asyncio.fixture
async def rt(tmp_path, monkeypatch):
    """Practices acme and beta (each with provider doc-1 and lead), no contacts anywhere;
    the release reads ``BATCH`` messages at a time."""
    monkeypatch.setattr(handlers, "SWEEP_BATCH", BATCH)
    clock = Clock()
    runtime = await embedded_runtime(tmp_path, SERVICE, clock=clock)
    runtime.state["test_clock"] = clock
    for practice in ("acme", "beta"):
        await create_practice(runtime.db.engine, practice_id=practice, name=practice,
                              timezone="America/New_York", pricing=Pricing())
        async with runtime.db.unit_of_work() as uow:
            for pid in ("doc-1", "lead"):
                await edit_provider(uow, practice, pid,
                                    {"name": pid, "email": f"{pid}@{practice}.test"}, (),
                                    actor="test", now=NOW, if_match=None)
            await uow.commit()
    yield runtime
    await runtime.db.dispose()


def review(practice: str, kind: str = "escalated",
           responsible: str = "Practitioner/doc-1") -> CloudEvent:
    tracker = f"tr-{uuid.uuid4().hex[:8]}"
    return CloudEvent(
        source="/ccm/careplan", type=f"careplan.review.{kind}.v1", tenant=practice,
        subject="Patient/p1", id=str(uuid.uuid4()),
        data={"tracker": tracker, "carePlan": "CarePlan/cp1", "patient": "Patient/p1",
              "dueDate": "2026-06-01", "daysOverdue": 180, "responsibleProvider": responsible,
              "supervisor": None, "step": 5, "idempotencyKey": f"{tracker}:{kind}"})


async def deliver(rt, event: CloudEvent) -> None:  # noqa: ANN001
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    await alerts.process(to_message(event.type, event))
    assert alerts.stats.dead_lettered == 0
    rt.state["test_clock"].tick()


async def held_of(rt, practice: str) -> list:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        return (await uow.session.execute(select(messages).where(
            messages.c.practice == practice).order_by(messages.c.created_at))).all()


def is_held(row) -> bool:  # noqa: ANN001
    return row.status == "pending" and row.next_attempt_at is None


async def test_escalations_nobody_can_receive_do_not_starve_the_sweep(rt):
    """acme has no supervisor anywhere: its escalations stay held, and were the oldest batch of
    every pass; beta's, behind them, was never reached though beta has a supervisor."""
    for _ in range(STUCK):
        await deliver(rt, review("acme"))
    await deliver(rt, review("beta"))
    async with rt.db.unit_of_work() as uow:  # written without the API: the sweep's case
        await upsert(uow.session, practice_contacts, {"practice": "beta"},
                     {"supervisor": "lead", "on_call": None, "summary_recipients": [],
                      "updated_at": NOW})
        await uow.commit()
    assert await sweep_and_release(rt, notifier_of(rt)) == 1
    [beta] = await held_of(rt, "beta")
    assert (beta.provider_id, beta.recipient) == ("lead", "lead@beta.test")
    assert beta.next_attempt_at is not None
    acme = await held_of(rt, "acme")
    assert len(acme) == STUCK and all(is_held(r) for r in acme)
    assert await sweep_and_release(rt, notifier_of(rt)) == 0


async def test_a_practices_own_unreceivable_messages_do_not_starve_its_contacts_change(rt):
    """Saving a practice's contacts releases its held messages the same way: review notices
    for a role the directory does not know yet stay held (their recipient is the role's
    practitioner, not the supervisor), and the escalation behind them goes to the new
    supervisor."""
    for _ in range(STUCK):
        await deliver(rt, review("acme", "due", "PractitionerRole/not-yet"))
    await deliver(rt, review("acme"))
    headers = {"Authorization": f"Bearer {await create_token(rt.db.engine, practice_id='acme')}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app()),
                                 base_url="http://n") as client:
        r = await client.put("/v1/practices/acme/contacts", headers=headers,
                             json={"supervisor": "lead", "summary_recipients": []})
    assert r.status_code == 200, r.text
    *due, escalated = await held_of(rt, "acme")
    assert escalated.kind == "review-escalated" and not is_held(escalated)
    assert escalated.recipient == "lead@acme.test"
    assert len(due) == STUCK and all(is_held(r) and r.kind == "review-due" for r in due)
