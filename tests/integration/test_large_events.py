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


async def test_a_topic_created_with_the_old_record_limit_is_raised_and_keeps_its_settings(
        infra, kafka, topic):
    """Topics an earlier version (or an operator) created at Kafka's 1 MB are raised to
    MAX_MESSAGE_BYTES by ensure_topics, other overrides kept; a higher limit is never lowered."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from ccm_shared.transport import MAX_MESSAGE_BYTES

    higher = f"{topic}-higher"
    admin = AIOKafkaAdminClient(**kafka.connection_options())
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "1048588",
                                                 "retention.ms": "123456789"}),
            NewTopic(higher, 1, 1, topic_configs={"max.message.bytes": str(2 * MAX_MESSAGE_BYTES)}),
        ])

        async def settings(name: str) -> dict[str, str] | None:
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name)])
            [(code, _msg, _kind, _name, entries)] = response.resources
            if code:  # 3: just created, not known to every broker yet
                return None
            return {n: v for n, v, _ro, source, *_ in entries if source == 1}  # the topic's own

        async def both_known() -> bool:
            return None not in (await settings(topic), await settings(higher))

        await eventually(both_known, timeout=30, what="the new topics' settings")
        assert (await settings(topic))["max.message.bytes"] == "1048588"
        await kafka.ensure_topics([topic, higher, topic])
        assert await settings(topic) == {"max.message.bytes": str(MAX_MESSAGE_BYTES),
                                         "retention.ms": "123456789"}
        assert await settings(higher) == {"max.message.bytes": str(2 * MAX_MESSAGE_BYTES)}
        await kafka.ensure_topics([topic])  # already raised: nothing to do, nothing changes
        assert (await settings(topic))["max.message.bytes"] == str(MAX_MESSAGE_BYTES)
    finally:
        await admin.delete_topics([topic, higher])
        await admin.close()
