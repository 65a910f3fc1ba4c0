"""The practice feed numbers billing's events in billing's order (``practiceSequence``) though
they arrive on separate topics in any order; a gap is waited for a bounded time (embedded
SQLite, in-process bus; the receiver an httpx mock)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import feed_held, outbox
from ccm_notification.bootstrap import SERVICE
from ccm_notification.entrypoints.workers import http_client_of, notifier_of
from ccm_notification.subscriptions.domain import producer_sequence, releasable
from ccm_notification.subscriptions.service import release_waiting
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime
from tests.unit.notification.feed_events import at_risk, fhir_invoice

T0 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
HOLD = timedelta(seconds=30)


# -- the rule -------------------------------------------------------------------------------


def test_the_next_number_goes_out_at_once_and_a_later_one_waits_for_the_gap():
    held = [(3, T0), (4, T0)]
    assert releasable(held, 2, T0, HOLD) == (2, 4)
    assert releasable(held, 1, T0, HOLD) == (0, 1)  # 2 is missing: both wait
    assert releasable([(2, T0 + timedelta(seconds=1)), (3, T0)], 1, T0 + timedelta(seconds=1),
                      HOLD) == (2, 3)  # the late 2 came: 2 then 3


def test_a_gap_not_filled_within_the_hold_window_is_passed_over_in_order():
    held = [(5, T0), (6, T0 + timedelta(seconds=10)), (9, T0 + timedelta(seconds=25))]
    assert releasable(held, 3, T0 + timedelta(seconds=29), HOLD) == (0, 3)
    # 4 never came: after the window 5 and 6 go; 9 waits its own window for 7 and 8
    assert releasable(held, 3, T0 + timedelta(seconds=30), HOLD) == (2, 6)
    assert releasable(held, 3, T0 + timedelta(seconds=55), HOLD) == (3, 9)


def test_only_billings_own_number_orders_an_event():
    assert producer_sequence("billing.invoice.cancelled.v1", {"practiceSequence": 44}) == 44
    assert producer_sequence("billing.payment.recorded.v1", {}) is None
    assert producer_sequence("billing.threshold.at-risk.v1", {"practiceSequence": 3}) is None
    assert producer_sequence("billing.invoice.issued.v1", {"practiceSequence": True}) is None


# -- the consumer ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Receiver:
    def __init__(self) -> None:
        self.got: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.got.append(json.loads(request.content))
        return httpx.Response(200)


@pytest_asyncio.fixture
async def env(tmp_path):
    clock = Clock()
    rt = await embedded_runtime(tmp_path, SERVICE, clock=clock)
    rt.state["http_client"] = httpx.AsyncClient(transport=httpx.MockTransport(Receiver()))
    await create_practice(rt.db.engine, practice_id="acme", name="Acme",
                          timezone="America/New_York", pricing=Pricing())
    token = await create_token(rt.db.engine, practice_id="acme")
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app()), base_url="http://n")
    headers = {"Authorization": f"Bearer {token}"}
    r = await api.post("/v1/practices/acme/subscriptions", headers=headers, json={
        "events": ["billing.invoice.issued.v1", "billing.invoice.cancelled.v1",
                   "billing.threshold.at-risk.v1"],
        "endpoint": "https://erp.acme.example/hook", "payload": "full-resource"})
    assert r.status_code == 201, r.text
    yield rt, clock, api, headers, r.json()["id"]
    await api.aclose()
    await http_client_of(rt).aclose()
    await rt.db.dispose()


def invoice_event(kind: str, invoice_id: str, sequence: int, **extra) -> CloudEvent:  # noqa: ANN003
    data = {"invoiceId": invoice_id, "month": "2026-10", "revision": 1,
            "status": "cancelled" if kind == "cancelled" else "issued", "totalNet": "10.00",
            "totalGross": "10.00", "invoice": fhir_invoice("acme", invoice_id, "10.00"),
            "replaces": None, "replacedBy": None, "reason": None, "practiceSequence": sequence}
    return CloudEvent(source="/ccm/billing", type=f"billing.invoice.{kind}.v1", tenant="acme",
                      subject=f"Invoice/{invoice_id}", time=T0, data=data | extra)


async def feed(rt, *events: CloudEvent) -> None:  # noqa: ANN001
    consumer = next(c for c in rt.consumers if c.name == "notification-practice-feed")
    for event in events:
        await consumer.process(to_message(event.type, event))
    assert consumer.stats.dead_lettered == 0


async def copies(rt) -> list[dict]:  # noqa: ANN001
    """The practice-topic copies in the order the relay publishes them."""
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(outbox.c.payload).where(
            outbox.c.topic.like("ccm.practice.%")).order_by(outbox.c.id))).scalars().all()
    return [json.loads(p) for p in rows]


async def replay(api, headers, sub: str) -> list[dict]:  # noqa: ANN001
    r = await api.get(f"/v1/practices/acme/subscriptions/{sub}/events?since=0", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["events"]


async def test_a_replacement_applied_before_its_cancellation_is_numbered_after_it(env):
    """The walkthrough: billing wrote cancelled (2) then issued (3) in one transaction; the feed
    consumer got issued first (its topic's partition came first in the poll)."""
    rt, clock, api, headers, sub = env
    first = invoice_event("issued", "inv-r0", 1)
    cancelled = invoice_event("cancelled", "inv-r0", 2, replacedBy="inv-r1")
    replacement = invoice_event("issued", "inv-r1", 3, replaces="inv-r0")
    await feed(rt, first, replacement, cancelled)
    out = await copies(rt)
    assert [(e["type"], e["data"]["invoiceId"]) for e in out] == [
        ("billing.invoice.issued.v1", "inv-r0"), ("billing.invoice.cancelled.v1", "inv-r0"),
        ("billing.invoice.issued.v1", "inv-r1")]
    assert [e["sequence"] for e in out] == [1, 2, 3]
    assert [e["data"]["practiceSequence"] for e in out] == [1, 2, 3]
    events = await replay(api, headers, sub)
    assert [(b["eventNumber"], b["event"]["type"], b["event"]["focus"]) for b in events] == [
        (1, "billing.invoice.issued.v1", "Invoice/inv-r0"),
        (2, "billing.invoice.cancelled.v1", "Invoice/inv-r0"),
        (3, "billing.invoice.issued.v1", "Invoice/inv-r1")]


async def test_an_event_waits_for_the_one_billing_numbered_before_it_then_both_go(env):
    rt, clock, api, headers, sub = env
    await feed(rt, invoice_event("issued", "inv-a", 1))
    await feed(rt, invoice_event("issued", "inv-c", 3))
    assert len(await copies(rt)) == 1  # 3 waits for 2
    assert [b["event"]["focus"] for b in await replay(api, headers, sub)] == ["Invoice/inv-a"]
    async with rt.db.unit_of_work() as uow:
        assert len((await uow.session.execute(select(feed_held))).all()) == 1
    clock.now += timedelta(seconds=5)
    await feed(rt, invoice_event("cancelled", "inv-a", 2))
    assert [e["data"]["practiceSequence"] for e in await copies(rt)] == [1, 2, 3]
    assert [e["data"]["invoiceId"] for e in await copies(rt)] == ["inv-a", "inv-a", "inv-c"]
    async with rt.db.unit_of_work() as uow:
        assert (await uow.session.execute(select(feed_held))).all() == []


async def test_a_gap_billing_never_fills_holds_the_feed_for_the_window_only(env):
    """Billing numbers events the feed does not carry (and one may be dead-lettered): after
    the hold window the waiting events go out, in billing's order, with no gap in the feed's
    own numbers."""
    rt, clock, api, headers, sub = env
    await feed(rt, invoice_event("issued", "inv-a", 1), invoice_event("issued", "inv-d", 4),
               invoice_event("cancelled", "inv-a", 3))
    assert len(await copies(rt)) == 1
    clock.now += timedelta(seconds=29)
    assert await release_waiting(rt.db, clock, 30) == 0
    clock.now += timedelta(seconds=1)
    assert await release_waiting(rt.db, clock, 30) == 2
    out = await copies(rt)
    assert [(e["data"]["invoiceId"], e["sequence"]) for e in out] == [
        ("inv-a", 1), ("inv-a", 2), ("inv-d", 3)]
    assert [b["eventNumber"] for b in await replay(api, headers, sub)] == [1, 2, 3]
    # 2 arrives at last, after its place: numbered on arrival, not lost
    await feed(rt, invoice_event("issued", "inv-b", 2))
    out = await copies(rt)
    assert [(e["data"]["invoiceId"], e["sequence"]) for e in out][-1] == ("inv-b", 4)


async def test_an_event_billing_does_not_number_is_not_held_behind_a_gap(env):
    rt, clock, api, headers, sub = env
    await feed(rt, invoice_event("issued", "inv-c", 3), at_risk("acme", "p1"))
    out = await copies(rt)
    assert [e["type"] for e in out] == ["billing.threshold.at-risk.v1"] and out[0]["sequence"] == 1


async def test_a_held_event_delivered_again_is_held_once_and_fanned_out_once(env):
    rt, clock, api, headers, sub = env
    waiting = invoice_event("issued", "inv-c", 3)
    await feed(rt, invoice_event("issued", "inv-a", 1), waiting)
    # redelivered under a new consumer (a second feed group, a group reset): not held twice
    again = next(c for c in rt.consumers if c.name == "notification-practice-feed")
    group, again.name = again.name, f"notification-practice-feed-{uuid.uuid4().hex[:6]}"
    await again.process(to_message(waiting.type, waiting))
    again.name = group
    async with rt.db.unit_of_work() as uow:
        assert len((await uow.session.execute(select(feed_held))).all()) == 1
    await feed(rt, invoice_event("issued", "inv-b", 2))
    assert [e["data"]["invoiceId"] for e in await copies(rt)] == ["inv-a", "inv-b", "inv-c"]


async def test_a_hold_window_of_zero_numbers_events_on_arrival(tmp_path, monkeypatch):
    monkeypatch.setenv("CCM_NOTIFICATION_PRACTICE_FEED_HOLD_SECONDS", "0")
    rt = await embedded_runtime(tmp_path, SERVICE, clock=lambda: T0)
    try:
        assert notifier_of(rt).settings.practice_feed_hold_seconds == 0
        await create_practice(rt.db.engine, practice_id="acme", name="Acme",
                              timezone="America/New_York", pricing=Pricing())
        await feed(rt, invoice_event("issued", "inv-c", 3), invoice_event("issued", "inv-a", 1))
        assert [e["data"]["invoiceId"] for e in await copies(rt)] == ["inv-c", "inv-a"]
    finally:
        await rt.db.dispose()


async def test_billings_own_number_shows_an_event_lost_upstream_and_where_a_redriven_one_fits(env):
    """Billing numbered 1..4; its 3 was dead-lettered before the feed. The feed's numbers have
    no gap (1, 2, 3), billing's do (1, 2, 4): that is how a practice sees the loss. After
    ``ccm redrive`` it comes last, with the feed's next number and billing's own (3)."""
    rt, clock, api, headers, sub = env
    await feed(rt, invoice_event("issued", "inv-a", 1), invoice_event("cancelled", "inv-a", 2),
               invoice_event("issued", "inv-d", 4))
    clock.now += timedelta(seconds=30)
    assert await release_waiting(rt.db, clock, 30) == 1
    events = await replay(api, headers, sub)
    assert [(b["eventNumber"], b["event"]["practiceSequence"], b["event"]["billingSequence"])
            for b in events] == [(1, 1, 1), (2, 2, 2), (3, 3, 4)]
    await feed(rt, invoice_event("issued", "inv-c", 3))  # redriven from the dead-letter topic
    last = (await replay(api, headers, sub))[-1]
    assert (last["eventNumber"], last["event"]["billingSequence"]) == (4, 3)
    assert last["data"]["invoiceId"] == "inv-c"


async def test_an_event_billing_does_not_number_has_no_billing_number(env):
    rt, clock, api, headers, sub = env
    await feed(rt, at_risk("acme", "p1"))
    [body] = await replay(api, headers, sub)
    assert body["event"]["billingSequence"] is None and body["event"]["practiceSequence"] == 1
