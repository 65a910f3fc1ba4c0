"""Large events on real Apache Kafka: an Invoice of a large practice is several megabytes of
JSON (~180 bytes a line; 18,000 lines for a 10,000-patient practice). Kafka's defaults stop at
1 MB a record batch; producers allow records up to ``MAX_MESSAGE_BYTES`` (16 MiB, compressed
by CCM_KAFKA_COMPRESSION) and topics are created to take them, so such an event is relayed and consumed like any other, in
order, instead of blocking the outbox behind it."""

import asyncio
import uuid

import pytest
from sqlalchemy import select

from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.events import CloudEvent
from ccm_shared.outbox import OutboxRelay
from tests.integration.conftest import eventually
from tests.support.messaging import effects, make_event, record_effect

pytestmark = pytest.mark.asyncio(loop_scope="session")


def invoice_lines(n: int) -> list[dict]:
    """Invoice.lineItem as billing writes it: one ChargeItem reference and price per line."""
    return [{"sequence": i, "chargeItemReference": {"reference": f"ChargeItem/ci-{uuid.uuid4().hex}"},
             "priceComponent": [{"type": "base", "amount": {"value": 42.0 + i % 7,
                                                            "currency": "USD"}}]}
            for i in range(1, n + 1)]


async def test_a_multi_megabyte_event_is_relayed_and_consumed_in_order(infra, pg_db, kafka, topic):
    await kafka.ensure_topics([topic])
    big = make_event(value=2, data={"invoice": {"resourceType": "Invoice",
                                                "lineItem": invoice_lines(50_000)}})
    size = len(big.to_json())
    # ~9 MB: over Kafka's default 1 MB a record batch even compressed (lz4 gives ~4x here), so
    # the topic's max.message.bytes and the consumer's fetch of a batch over its
    # max_partition_fetch_bytes are exercised too.
    assert size > 8 * 2**20, size
    events = [make_event(value=1), big, make_event(value=3)]  # one key: one partition, in order
    async with pg_db.unit_of_work() as uow:
        for e in events:
            await uow.outbox.add(topic, e)
        await uow.commit()
    assert await OutboxRelay(pg_db, kafka).drain() == 3

    received: list[CloudEvent] = []

    async def handler(event: CloudEvent, uow) -> None:  # noqa: ANN001
        received.append(event)
        await record_effect(event, uow)

    consumer = ConsumerRuntime(name=f"large-{uuid.uuid4().hex[:6]}", topics=[topic],
                               handler=handler, db=pg_db, transport=kafka)
    task = asyncio.create_task(consumer.run())
    try:
        async def all_applied() -> bool:
            async with pg_db.unit_of_work() as uow:
                rows = (await uow.session.execute(select(effects.c.value))).scalars().all()
            return len(rows) >= 3

        await eventually(all_applied, timeout=60, what="the three events applied")
    finally:
        consumer.stop()
        await task
    assert [e.data["value"] for e in received] == [1, 2, 3]
    assert received[1].data["invoice"] == big.data["invoice"]
