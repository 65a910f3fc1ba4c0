"""The practice's Kafka copy of a billing event carries billing's own number
(``data.billingSequence``) beside the feed's (``data.practiceSequence``), so a Kafka reader sees
an event billing made that never reached the feed; the copy keeps its contract (embedded
SQLite, in-process bus)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import outbox
from ccm_notification.bootstrap import SERVICE
from ccm_notification.subscriptions.domain import FEED_TYPES, NO_DATA_SEQUENCE, feed_data
from ccm_notification.subscriptions.service import release_waiting
from ccm_shared.event_contracts import contract_violations
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.tenancy import Pricing, create_practice
from tests.support.embedded import embedded_runtime
from tests.unit.notification.feed_events import at_risk, fhir_invoice

T0 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)


def _invoice(invoice_id: str, status: str) -> dict:
    return {"invoiceId": invoice_id, "month": "2026-11", "revision": 0, "status": status,
            "totalNet": "10.00", "totalGross": "10.00",
            "invoice": fhir_invoice("acme", invoice_id, "10.00"), "replaces": None,
            "replacedBy": None, "reason": None}


# Contract-valid data of each type billing numbers, as billing publishes it (no billingSequence)
NUMBERED: dict[str, dict] = {
    "billing.invoice.issued.v1": _invoice("inv-1", "issued"),
    "billing.invoice.cancelled.v1": _invoice("inv-1", "cancelled"),
    "billing.invoice.paid.v1": _invoice("inv-1", "balanced"),
    "billing.invoice.overdue.v1": _invoice("inv-1", "issued"),
    "billing.payment.recorded.v1": {
        "invoiceId": "inv-1", "paymentId": "pay-1", "amount": "4.00", "date": "2026-12-02",
        "reference": None, "balance": "6.00", "status": "partially-paid"},
    "billing.payment.voided.v1": {
        "invoiceId": "inv-1", "paymentId": "pay-1", "amount": "4.00", "date": "2026-12-02",
        "reason": "bank reversal", "voidedAt": "2026-12-03T10:00:00Z",
        "voided": [{"invoiceId": "inv-1", "paymentId": "pay-1"}], "paid": "0.00",
        "balance": "10.00", "status": "issued", "invoiceStatus": "issued"},
    "billing.payment.refunded.v1": {
        "invoiceId": "inv-1", "refundId": "ref-1", "amount": "1.00", "date": "2026-12-04",
        "paid": "11.00", "refunded": "1.00", "balance": "0.00", "status": "balanced",
        "invoiceStatus": "balanced"},
    "billing.period.closed.v1": {
        "month": "2026-11", "invoiceId": "inv-1", "patientsEnrolled": 3, "patientsBillable": 2,
        "patientsBlocked": 1, "minutes": {"staff": 65, "practitioner": 0},
        "codes": {"99490": 2}, "blockers": {"consent-missing": 1}, "totalNet": "10.00"},
}


def test_the_eight_numbered_types_are_every_feed_type_but_at_risk():
    assert set(NUMBERED) == set(FEED_TYPES) - NO_DATA_SEQUENCE


@pytest.mark.parametrize("event_type", sorted(NUMBERED))
def test_the_copy_carries_billings_number_beside_the_feeds_and_keeps_its_contract(event_type):
    data = {**NUMBERED[event_type], "practiceSequence": 37}
    assert contract_violations(event_type, data) is None  # as billing publishes it
    copy = feed_data(event_type, data, 40)
    assert (copy["practiceSequence"], copy["billingSequence"]) == (40, 37)
    assert contract_violations(event_type, copy) is None
    assert data["practiceSequence"] == 37 and "billingSequence" not in data  # input unchanged


@pytest.mark.parametrize("event_type", sorted(NUMBERED))
def test_an_event_billing_did_not_number_gets_no_billing_number(event_type):
    """``billingSequence`` is optional: billing never has to send it, and an event without
    billing's number (one published before billing numbered its events) gets none."""
    copy = feed_data(event_type, NUMBERED[event_type], 5)
    assert "billingSequence" not in copy and copy["practiceSequence"] == 5
    assert contract_violations(event_type, copy) is None


def test_at_risk_has_no_number_in_its_data():
    risk = at_risk("acme")
    copy = feed_data(risk.type, risk.data, 5)
    assert "billingSequence" not in copy and "practiceSequence" not in copy
    assert contract_violations(risk.type, copy) is None


# -- through the feed consumer --------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest_asyncio.fixture
async def env(tmp_path):
    clock = Clock()
    rt = await embedded_runtime(tmp_path, SERVICE, clock=clock)
    await create_practice(rt.db.engine, practice_id="acme", name="Acme",
                          timezone="America/New_York", pricing=Pricing())
    yield rt, clock
    await rt.db.dispose()


def numbered(event_type: str, sequence: int, invoice_id: str) -> CloudEvent:
    data = {**NUMBERED[event_type], "practiceSequence": sequence}
    if "invoiceId" in data:
        data["invoiceId"] = invoice_id
    return CloudEvent(source="/ccm/billing", type=event_type, tenant="acme",
                      subject=f"Invoice/{invoice_id}", time=T0, data=data)


async def feed(rt, *events: CloudEvent) -> None:  # noqa: ANN001
    consumer = next(c for c in rt.consumers if c.name == "notification-practice-feed")
    for event in events:
        await consumer.process(to_message(event.type, event))
    assert consumer.stats.dead_lettered == 0


async def kafka_copies(rt) -> list[dict]:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(outbox.c.topic, outbox.c.payload).where(
            outbox.c.topic.like("ccm.practice.%")).order_by(outbox.c.id))).all()
    return [json.loads(r.payload) | {"_topic": r.topic} for r in rows]


async def test_a_kafka_reader_sees_an_event_lost_before_the_feed_and_where_a_redriven_one_fits(
        env):
    """Billing numbered 1..4; its 3 was dead-lettered before the feed. On the practice's
    topics the feed's numbers have no gap (1, 2, 3), billing's do (1, 2, 4); redriven, the 3
    comes last with the feed's next number and billing's own. Every copy keeps its contract."""
    rt, clock = env
    await feed(rt, numbered("billing.invoice.issued.v1", 1, "inv-a"),
               numbered("billing.payment.recorded.v1", 2, "inv-a"),
               numbered("billing.period.closed.v1", 4, "inv-a"))
    clock.now += timedelta(seconds=30)
    assert await release_waiting(rt.db, clock, 30) == 1
    await feed(rt, numbered("billing.invoice.cancelled.v1", 3, "inv-a"), at_risk("acme"))
    out = await kafka_copies(rt)
    assert [(e["type"], e["sequence"], e["data"]["practiceSequence"],
             e["data"]["billingSequence"]) for e in out[:4]] == [
        ("billing.invoice.issued.v1", 1, 1, 1),
        ("billing.payment.recorded.v1", 2, 2, 2),
        ("billing.period.closed.v1", 3, 3, 4),
        ("billing.invoice.cancelled.v1", 4, 4, 3)]
    assert out[4]["type"] == "billing.threshold.at-risk.v1" and out[4]["sequence"] == 5
    assert "billingSequence" not in out[4]["data"]
    assert all(e["_topic"] == f"ccm.practice.acme.{e['type']}" for e in out)
    for e in out:
        assert contract_violations(e["type"], e["data"]) is None, e["type"]
