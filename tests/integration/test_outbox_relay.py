"""Outbox and relay on real PostgreSQL and Apache Kafka."""

import asyncio
import json
import uuid
from collections import defaultdict

import pytest
from sqlalchemy import func, select, text

from ccm_shared import outbox as outbox_module
from ccm_shared.audit import audit_log
from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.db import Database
from ccm_shared.events import CloudEvent, Message
from ccm_shared.outbox import LeadershipLost, OutboxRelay
from ccm_shared.transport import InProcessTransport
from tests.integration.conftest import eventually
from tests.support.kafka_read import read_topic
from tests.support.messaging import (
    effect_rows,
    make_event,
    record_effect,
    state_count,
    write_state_and_event,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_state_change_and_its_event_commit_together(infra, pg_db, kafka, topic):
    await kafka.ensure_topics([topic])
    committed = await write_state_and_event(pg_db, topic, make_event(value=1), commit=True)
    rolled_back = await write_state_and_event(pg_db, topic, make_event(value=2), commit=False)
    marker = await write_state_and_event(pg_db, topic, make_event(value=3), commit=True)

    assert await OutboxRelay(pg_db, kafka).drain() == 2
    records = await read_topic(infra.kafka_bootstrap_servers, topic, expect=2)
    ids = [CloudEvent.from_json(r.value).id for r in records]
    assert sorted(ids) == sorted([committed.id, marker.id])
    assert rolled_back.id not in ids
    assert await state_count(pg_db) == 2
    first = next(r for r in records if CloudEvent.from_json(r.value).id == committed.id)
    assert first.key == b"acme:p1"
    assert dict(first.headers)["content-type"] == b"application/cloudevents+json"


async def test_broker_outage_loses_nothing_and_applies_each_event_once(
    infra, pg_db, kafka, topic
):
    control = infra.require_kafka_control()
    await kafka.ensure_topics([topic])
    total, patients = 1000, 20
    relay = OutboxRelay(pg_db, kafka, batch_size=50, poll_interval=0.05, backoff_max=1.0)
    consumer = ConsumerRuntime(
        name="outage-consumer", topics=[topic], handler=record_effect, db=pg_db,
        transport=kafka, backoff_initial=0.05, backoff_max=1.0,
    )

    async def write_all():
        for i in range(0, total, 10):
            async with pg_db.unit_of_work() as uow:
                for j in range(i, i + 10):
                    await uow.outbox.add(topic, make_event(patient=f"p{j % patients}", value=j))
                await uow.commit()
            relay.notify()
            await asyncio.sleep(0.02)

    relay_task = asyncio.create_task(relay.run())
    consumer_task = asyncio.create_task(consumer.run())
    writer = asyncio.create_task(write_all())
    try:
        async def some_published():
            return relay.stats.published >= 200

        await eventually(some_published, timeout=60, what="200 events relayed before the outage")
        await asyncio.to_thread(control.stop)
        stopped_at = relay.stats.published
        await asyncio.sleep(3)
        await writer  # the services keep writing while the broker is away
        assert relay.stats.published < total, "the outage came too late to test anything"
        await asyncio.to_thread(control.start)

        async def all_applied():
            return len(await effect_rows(pg_db)) >= total and await relay.backlog() == 0

        await eventually(all_applied, timeout=240, interval=0.5, what="all 1,000 events applied")
        await asyncio.sleep(2)  # anything redelivered late would show up as a second effect
    finally:
        relay.stop()
        consumer.stop()
        await asyncio.gather(relay_task, consumer_task, return_exceptions=True)

    rows = await effect_rows(pg_db)
    assert len(rows) == total, "an effect was applied twice"
    assert len({r.event_id for r in rows}) == total
    by_patient = defaultdict(list)
    for r in rows:  # rows in the order the consumer applied them
        by_patient[r.subject].append(r.sequence)
    for subject, seqs in by_patient.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{subject} applied out of order"
    assert stopped_at < total
    print(f"relay failures during outage: {relay.stats.failures}; "
          f"duplicates absorbed by the inbox: {consumer.stats.duplicates}")


async def test_poison_event_goes_to_dlq_and_partition_keeps_flowing(infra, pg_db, kafka, topic):
    await kafka.ensure_topics([topic])
    good1 = await write_state_and_event(pg_db, topic, make_event(value=1), commit=True)
    poison = await write_state_and_event(
        pg_db, topic, make_event(type="tests.poison.v1"), commit=True
    )
    good2 = await write_state_and_event(pg_db, topic, make_event(value=2), commit=True)
    await OutboxRelay(pg_db, kafka).drain()
    consumer = ConsumerRuntime(
        name="dlq-consumer", topics=[topic], handler=record_effect, db=pg_db, transport=kafka,
        max_retries=2, backoff_initial=0.01, backoff_max=0.05,
    )
    task = asyncio.create_task(consumer.run())
    try:
        async def both_good_applied():
            return len(await effect_rows(pg_db)) == 2

        await eventually(both_good_applied, what="the events after the poison one")
    finally:
        consumer.stop()
        await task
    assert [r.event_id for r in await effect_rows(pg_db)] == [good1.id, good2.id]
    [dead] = await read_topic(infra.kafka_bootstrap_servers, topic + ".dlq", expect=1)
    assert CloudEvent.from_json(dead.value).id == poison.id
    headers = dict(dead.headers)
    assert headers["dlq-error"] == b"RuntimeError"
    assert headers["dlq-attempts"] == b"3"
    assert headers["dlq-consumer"] == b"dlq-consumer"
    assert json.loads(dead.value)["tenant"] == "acme"


async def _published(db, kafka, topic, n):  # noqa: ANN001, ANN202
    """n events of one patient (values 0…n-1) through the outbox onto a one-partition topic."""
    await kafka.ensure_topics([topic], partitions=1)
    async with db.unit_of_work() as uow:
        for i in range(n):
            await uow.outbox.add(topic, make_event(patient="p1", value=i))
        await uow.commit()
    await OutboxRelay(db, kafka).drain()


async def _consume_until_applied(consumer, db, n):  # noqa: ANN001, ANN202
    task = asyncio.create_task(consumer.run())
    try:
        async def all_applied():
            return len(await effect_rows(db)) == n

        await eventually(all_applied, what=f"{n} effects")
    finally:
        consumer.stop()
        await task


async def test_batched_consumer_keeps_order_when_a_message_in_the_middle_fails_once(
    infra, pg_db, kafka, topic
):
    await _published(pg_db, kafka, topic, 30)
    failed_once: set[str] = set()

    async def flaky(event, uow):
        if event.data["value"] == 12 and event.id not in failed_once:
            failed_once.add(event.id)
            raise RuntimeError("first attempt fails")
        await record_effect(event, uow)

    consumer = ConsumerRuntime(name="batch-consumer", topics=[topic], handler=flaky, db=pg_db,
                               transport=kafka, batch_size=50, backoff_initial=0.01)
    await _consume_until_applied(consumer, pg_db, 30)
    assert [r.value for r in await effect_rows(pg_db)] == list(range(30))
    assert len(failed_once) == 1  # the failure did happen, inside a batch
    assert consumer.stats.applied == 30 and consumer.stats.dead_lettered == 0


def _count_savepoints(monkeypatch) -> list[int]:  # noqa: ANN001
    from sqlalchemy.ext.asyncio import AsyncSession

    savepoints: list[int] = []
    original = AsyncSession.begin_nested

    def counting(self):  # noqa: ANN001, ANN202
        savepoints.append(1)
        return original(self)

    monkeypatch.setattr(AsyncSession, "begin_nested", counting)
    return savepoints


async def test_batches_without_failures_take_no_savepoint_per_event(
    infra, pg_db, kafka, topic, monkeypatch
):
    savepoints = _count_savepoints(monkeypatch)
    await _published(pg_db, kafka, topic, 30)
    consumer = ConsumerRuntime(name=f"clean-{uuid.uuid4().hex[:8]}", topics=[topic],
                               handler=record_effect, db=pg_db, transport=kafka, batch_size=50)
    await _consume_until_applied(consumer, pg_db, 30)
    assert [r.value for r in await effect_rows(pg_db)] == list(range(30))
    assert consumer.stats.applied == 30 and savepoints == []
    assert await audited(pg_db, consumer.name) == 30  # written together, before the commit


async def audited(db, consumer: str) -> int:  # noqa: ANN001
    """The audit entries a consumer wrote (one per applied patient event)."""
    async with db.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(audit_log)
                                   .where(audit_log.c.actor == consumer))).scalar()


async def test_a_failure_in_a_batch_rolls_back_its_whole_first_try(
    infra, pg_db, kafka, topic, monkeypatch
):
    """When one event fails after writing, the batch's first try (no savepoints) is rolled back
    whole; then the events before it commit once, it is dead-lettered, and the ones after it are
    applied: each effect exactly once, in order."""
    savepoints = _count_savepoints(monkeypatch)
    await _published(pg_db, kafka, topic, 30)
    attempts: list[int] = []

    async def fails_after_writing(event, uow):
        await record_effect(event, uow)
        if event.data["value"] == 12:
            attempts.append(12)
            raise RuntimeError("always fails, after its write")

    consumer = ConsumerRuntime(name=f"rollback-{uuid.uuid4().hex[:8]}", topics=[topic],
                               handler=fails_after_writing, db=pg_db, transport=kafka,
                               batch_size=50, max_retries=2, backoff_initial=0.01)
    await _consume_until_applied(consumer, pg_db, 29)
    assert [r.value for r in await effect_rows(pg_db)] == [v for v in range(30) if v != 12]
    assert consumer.stats.applied == 29 and consumer.stats.dead_lettered == 1
    assert await audited(pg_db, consumer.name) == 29  # none for the rolled-back tries
    assert len(attempts) >= 3  # the batch's try, its savepoint try, then alone until the DLQ
    # Savepoints only in the failed batch's second try, up to and including event 12.
    assert 1 <= len(savepoints) <= 13


async def test_prepare_runs_outside_the_transaction_before_each_event_and_a_failure_is_retried(
    infra, pg_db, kafka, topic
):
    await _published(pg_db, kafka, topic, 20)
    prepared: list[int] = []
    failed_once: set[str] = set()
    own = Database(infra.database_url, schema=pg_db.schema, pool_size=2)  # the consumer's only
    open_connections: list[int] = []

    async def prepare(event):
        open_connections.append(own.engine.pool.checkedout())  # 0: no transaction around it
        if event.data["value"] == 7 and event.id not in failed_once:
            failed_once.add(event.id)
            raise RuntimeError("topic creation failed once")
        prepared.append(event.data["value"])

    unprepared: list[int] = []

    async def handle(event, uow):
        if event.data["value"] not in prepared:
            unprepared.append(event.data["value"])
            raise RuntimeError("handled before its prepare succeeded")
        await record_effect(event, uow)

    consumer = ConsumerRuntime(name="prepare-consumer", topics=[topic], handler=handle,
                               prepare=prepare, db=own, transport=kafka, batch_size=50,
                               backoff_initial=0.01)
    try:
        await _consume_until_applied(consumer, pg_db, 20)
    finally:
        await own.dispose()
    assert [r.value for r in await effect_rows(pg_db)] == list(range(20))
    assert len(failed_once) == 1 and consumer.stats.dead_lettered == 0
    assert set(open_connections) == {0}
    assert unprepared == []


async def test_a_relay_whose_lock_session_ends_stands_down_and_takes_the_lock_again(
        infra, pg_db, kafka, topic, monkeypatch):
    """The active relay holds an advisory lock on a session of its own. When that session ends
    (a database restart or failover), the relay stops publishing (LeadershipLost; the
    service's supervisor starts it again), instead of going on beside a replica that took the
    lock; run again, it takes the lock and publishes what came since."""
    monkeypatch.setattr(outbox_module, "LEADERSHIP_CHECK_SECONDS", 0.1)
    await kafka.ensure_topics([topic])
    relay = OutboxRelay(pg_db, kafka, poll_interval=0.05)
    key = relay._leadership_key()
    first = await write_state_and_event(pg_db, topic, make_event(value=1), commit=True)
    running = asyncio.create_task(relay.run())
    records = await read_topic(infra.kafka_bootstrap_servers, topic, expect=1)
    assert CloudEvent.from_json(records[0].value).id == first.id
    holders = f"""SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
                  AND ((classid::bigint << 32) | objid::bigint) = {key}"""
    async with pg_db.engine.connect() as conn:
        (pid,) = (await conn.execute(text(holders))).scalars().all()
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        await conn.commit()
    with pytest.raises(LeadershipLost):
        await asyncio.wait_for(running, timeout=10)
    again = asyncio.create_task(relay.run())
    second = await write_state_and_event(pg_db, topic, make_event(value=2), commit=True)
    records = await read_topic(infra.kafka_bootstrap_servers, topic, expect=2)
    assert [CloudEvent.from_json(r.value).id for r in records] == [first.id, second.id]
    async with pg_db.engine.connect() as conn:
        assert len((await conn.execute(text(holders))).scalars().all()) == 1
    relay.stop()
    await asyncio.wait_for(again, timeout=10)


async def test_the_consumers_log_lines_name_no_data_of_a_failing_event(pg_db, topic):
    """(PostgreSQL: consumers apply batches there.) A failure inside a batch was logged with
    the error's text, which may quote the event (a driver's error repeats the value it
    refused). The log events themselves are read (structlog's capture), whatever the process's
    logging configuration."""
    from structlog.testing import capture_logs

    async def fail(event, uow):
        if event.data.get("value") == 1:
            raise ValueError("Invalid isoformat string: '1950-02-03'")

    bus = InProcessTransport(partitions=1)
    await bus.send_batch([Message(topic, make_event(value=v).to_json(), key=b"acme:p1")
                          for v in (1, 2, 3)])
    runtime = ConsumerRuntime(name="quiet", topics=[topic], handler=fail, db=pg_db,
                              transport=bus, max_retries=1, backoff_initial=0, backoff_max=0,
                              poll_timeout=0.01)
    await runtime.start()
    with capture_logs() as logged:
        while await runtime.run_once():
            pass
    assert any("event failed inside a batch" in e["event"] for e in logged), logged
    assert "1950" not in json.dumps(logged, default=str)
