"""The practice feed follows billing's order on real Kafka and PostgreSQL: a correction's
``cancelled`` and ``issued`` travel on two topics, and the replacement's ``issued`` reaching the
feed consumer first is held until the ``cancelled`` billing numbered before it has gone out."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import select

from ccm_notification.adapters.orm import feed_held
from ccm_shared.events import CloudEvent, practice_topic
from tests.integration.conftest import eventually
from tests.integration.notification import test_practice_subscriptions as subscriptions
from tests.integration.notification.servers import start_http
from tests.integration.notification.test_practice_subscriptions import (
    publish_as_billing,
    read_topic,
)
from tests.unit.notification.feed_events import fhir_invoice

# The notification service with its feed consumer, relay and deliverer on Kafka and PostgreSQL,
# as the subscription tests run it.
service = subscriptions.service
settings_env = subscriptions.settings_env

pytestmark = pytest.mark.asyncio(loop_scope="session")
ISSUED, CANCELLED = "billing.invoice.issued.v1", "billing.invoice.cancelled.v1"


def invoice_event(practice: str, kind: str, invoice_id: str, sequence: int,
                  **extra) -> CloudEvent:  # noqa: ANN003
    data = {"invoiceId": invoice_id, "month": "2026-10", "revision": 1,
            "status": "cancelled" if kind == CANCELLED else "issued", "totalNet": "10.00",
            "totalGross": "10.00", "invoice": fhir_invoice(practice, invoice_id, "10.00"),
            "replaces": None, "replacedBy": None, "reason": None, "paid": "10.00",
            "balance": "0.00", "practiceSequence": sequence}
    return CloudEvent(source="/ccm/billing", type=kind, tenant=practice,
                      subject=f"Invoice/{invoice_id}", data=data | extra)


async def held_ids(service, practice: str) -> list[str]:  # noqa: ANN001
    async with service.runtime.db.unit_of_work() as uow:
        return list((await uow.session.execute(select(feed_held.c.event_id).where(
            feed_held.c.practice == practice))).scalars().all())


async def test_a_replacement_consumed_before_its_cancellation_is_numbered_after_it(service):
    p = await service.practice()
    receiver = start_http()
    try:
        sub = await service.subscribe(p, receiver.url + "/hook", events=(ISSUED, CANCELLED))
        original = invoice_event(p, ISSUED, f"inv-{uuid.uuid4().hex[:6]}", 1)
        await publish_as_billing(service.kafka, original)
        await read_topic(service.kafka, practice_topic(p, ISSUED), 1, p)
        old = original.data["invoiceId"]
        new = f"inv-{uuid.uuid4().hex[:6]}"
        cancelled = invoice_event(p, CANCELLED, old, 2, replacedBy=new, reason="corrected")
        replacement = invoice_event(p, ISSUED, new, 3, replaces=old)
        # The worst order the two topics can give: the replacement is applied first.
        await publish_as_billing(service.kafka, replacement)

        async def replacement_held() -> bool:
            return await held_ids(service, p) == [replacement.id]

        await eventually(replacement_held, timeout=60, what="the replacement to be held")
        await asyncio.sleep(1)
        status = await service.get(p, f"/{sub['id']}/status")
        assert status["lastEventNumber"] == 1  # not numbered while it waits
        await publish_as_billing(service.kafka, cancelled)

        issued = await read_topic(service.kafka, practice_topic(p, ISSUED), 2, p)
        [gone] = await read_topic(service.kafka, practice_topic(p, CANCELLED), 1, p)
        assert [(r["id"], r["sequence"]) for r in issued] == [(original.id, 1),
                                                              (replacement.id, 3)]
        assert (gone["id"], gone["sequence"], gone["data"]["practiceSequence"]) == (
            cancelled.id, 2, 2)
        assert await held_ids(service, p) == []
        events = (await service.get(p, f"/{sub['id']}/events?since=0"))["events"]
        assert [(e["eventNumber"], e["event"]["type"], e["event"]["focus"]) for e in events] == [
            (1, ISSUED, f"Invoice/{old}"), (2, CANCELLED, f"Invoice/{old}"),
            (3, ISSUED, f"Invoice/{new}")]
        await eventually(lambda: _count(receiver, 3), timeout=30, what="three webhooks")
        assert [r.json()["eventNumber"] for r in receiver.accepted()] == [1, 2, 3]
        assert [r.json()["event"]["type"] for r in receiver.accepted()] == [ISSUED, CANCELLED,
                                                                           ISSUED]
    finally:
        receiver.close()


async def _count(receiver, n: int) -> bool:  # noqa: ANN001
    return len(receiver.accepted()) >= n
