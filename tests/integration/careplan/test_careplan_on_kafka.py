"""The careplan service on real PostgreSQL and Kafka: ingest's events in, tracker and review
events out, several scheduler replicas over one database."""

import asyncio
import json
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_careplan.bootstrap import SERVICE
from ccm_careplan.domain.rules import DEFAULT_RULES
from ccm_careplan.domain.schedule import planned_steps
from ccm_careplan.service_layer.common import StepClaim, claim_steps, tracker_id
from ccm_careplan.service_layer.scheduler import run_scheduler_pass
from ccm_careplan.service_layer.tracking import CONSUMED_TOPICS, make_handler
from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.db import Database
from ccm_shared.events import to_message
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime
from ccm_shared.settings import load_settings
from ccm_shared.tables import outbox_table
from ccm_shared.tenancy import Pricing, create_practice, create_token
from ccm_shared.transport import KafkaTransport
from tests.integration.conftest import eventually
from tests.support.contracts import assert_valid_event
from tests.support.kafka_read import read_topic, start_group_at_end
from tests.unit.careplan import factories as f

pytestmark = pytest.mark.asyncio(loop_scope="session")

START = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)


@pytest_asyncio.fixture(loop_scope="session")
async def careplan_schema(infra):
    await upgrade_async(infra.database_url, SERVICE.schema, SERVICE.migrations_package)
    return infra


async def new_practice(engine) -> str:
    practice = f"cp-{uuid.uuid4().hex[:10]}"
    await create_practice(engine, practice_id=practice, name=practice,
                          timezone="America/Chicago", pricing=Pricing())
    return practice


async def test_ingest_care_plan_reaches_the_tracker_and_an_overdue_plan_is_reminded_and_escalated_on_kafka(  # noqa: E501
    careplan_schema,
):
    infra = careplan_schema
    clock = f.Clock(START)
    settings = load_settings(database_url=infra.database_url,
                             kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
                             consumer_max_retries=0, outbox_poll_interval_seconds=0.05)
    transport = KafkaTransport(infra.kafka_bootstrap_servers, client_id="careplan-it")
    runtime = ServiceRuntime.build(SERVICE, settings, transport=transport, clock=clock)
    # A consumer group of its own: this test must not share partitions with other processes.
    runtime.consumers = [ConsumerRuntime(
        name=f"careplan-it-{uuid.uuid4().hex[:8]}", topics=CONSUMED_TOPICS,
        handler=make_handler(clock), db=runtime.db, transport=transport, max_retries=0)]
    practice = await new_practice(runtime.db.engine)
    token = await create_token(runtime.db.engine, practice_id=practice)
    headers = {"Authorization": f"Bearer {token}"}
    await transport.ensure_topics(CONSUMED_TOPICS)
    await start_group_at_end(infra.kafka_bootstrap_servers, runtime.consumers[0].name,
                             CONSUMED_TOPICS)
    await runtime.start(background=False)
    try:
        plan = f.care_plan(practice, "CarePlan/cp-1", at=START, patient="Patient/pt-1",
                           created="2026-01-05")
        await transport.send_batch([to_message(plan.type, plan)])
        tracker = tracker_id(practice, "CarePlan/cp-1")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                     base_url="http://t") as client:
            async def tracked() -> bool:
                r = await client.get(f"/v1/practices/{practice}/care-plans", headers=headers)
                return r.status_code == 200 and r.json()["total"] == 1

            await eventually(tracked, timeout=90, what="the CarePlan in the tracker")
            item = (await client.get(f"/v1/care-plans/{tracker}", headers=headers)).json()
            assert item["next_review_due"] == "2027-01-05"
            assert item["signoff"]["status"] == "awaiting"
            assert {r["recipient"] for r in item["distribution"]["recipients"]} == {
                "Practitioner/rn-diaz", "Practitioner/dr-lee"}

            rules = {"clinical_supervisor": "Practitioner/sup-9"}
            put = await client.put(f"/v1/practices/{practice}/care-plan-rules", json=rules,
                                   headers=headers)
            assert put.status_code == 200, put.text

            # Forty days overdue: the scheduler catches up to the latest reminder and escalates.
            clock.now = datetime(2027, 2, 14, 15, 0, tzinfo=UTC)
            result = await run_scheduler_pass(runtime.db, clock.now, practices=[practice])
            assert result.sent == 2  # the latest reminder (due, overdue superseded), escalation
            runtime.relay.notify()
            overdue = (await client.get(f"/v1/practices/{practice}/care-plans?review=overdue",
                                        headers=headers)).json()
            assert [i["review_state"] for i in overdue["items"]] == ["escalated"]

        async def mine(topic: str) -> list[dict]:
            records = await read_topic(infra.kafka_bootstrap_servers, topic, expect=10**9,
                                       timeout=3)
            docs = [json.loads(r.value) for r in records]
            return [d for d in docs if d["tenant"] == practice]

        found: dict[str, list[dict]] = {}

        async def published() -> bool:
            for topic in ("careplan.review.reminder.v1", "careplan.review.escalated.v1",
                          "careplan.plan.distributed.v1"):
                found[topic] = await mine(topic)
            return all(found.values())

        await eventually(published, timeout=90, what="reminder and escalation events on Kafka")
    finally:
        await runtime.stop()

    for docs in found.values():
        for doc in docs:
            assert_valid_event(doc)
    reminder, = found["careplan.review.reminder.v1"]
    escalation, = found["careplan.review.escalated.v1"]
    assert reminder["data"]["step"] == 8  # 3 before due + weekly overdue reminders 7…35 days
    assert reminder["data"]["dueDate"] == "2027-01-05"
    assert escalation["data"] | {"idempotencyKey": None} == {
        "tracker": tracker, "carePlan": "CarePlan/cp-1", "patient": "Patient/pt-1",
        "dueDate": "2027-01-05", "daysOverdue": 40, "responsibleProvider": "Practitioner/dr-lee",
        "supervisor": "Practitioner/sup-9", "step": 1, "idempotencyKey": None}
    assert escalation["subject"] == "Patient/pt-1"


async def test_two_scheduler_replicas_over_one_database_send_each_step_exactly_once(
    careplan_schema,
):
    infra = careplan_schema
    replicas = [Database(infra.database_url, schema="careplan", pool_size=3) for _ in range(2)]
    practice = await new_practice(replicas[0].engine)
    handler = make_handler(lambda: START)
    plans = 12
    try:
        for n in range(plans):
            event = f.care_plan(practice, f"CarePlan/r-{n}", at=START + timedelta(days=n),
                                patient=f"Patient/r-{n}")
            async with replicas[0].unit_of_work() as uow:
                await handler(event, uow)
                await uow.commit()
        # Sixty consecutive days around the due dates, both replicas passing at the same moment.
        sent = [0, 0]
        day = date(2026, 12, 1)
        while day <= date(2027, 1, 30):
            now = datetime(day.year, day.month, day.day, 15, tzinfo=UTC)
            results = await asyncio.gather(*(
                run_scheduler_pass(db, now, batch_size=3, practices=[practice])
                for db in replicas))
            for i, r in enumerate(results):
                sent[i] += r.sent
            day += timedelta(days=1)
        # A restarted replica finds nothing left to send for the last day.
        again = await run_scheduler_pass(replicas[1], now, practices=[practice])
        async with replicas[0].engine.connect() as conn:
            payloads = (await conn.execute(select(outbox_table.c.payload).where(
                outbox_table.c.tenant == practice,
                outbox_table.c.event_type.like("careplan.review.%")))).scalars().all()
    finally:
        for db in replicas:
            await db.dispose()
    keys = Counter(json.loads(p)["data"]["idempotencyKey"] for p in payloads)
    assert not {k: n for k, n in keys.items() if n > 1}, "a step was sent twice"
    # Every step owed by Jan 30 was sent: reminders 30/14/7 days before, the due and overdue
    # notices and weekly overdue reminders (due dates Jan 5…16, 2027; escalation comes later).
    expected = set()
    for n in range(plans):
        due = date(2027, 1, 5) + timedelta(days=n)
        for s in planned_steps(due, DEFAULT_RULES, date(2027, 1, 30)):
            expected.add(f"{practice}:{tracker_id(practice, f'CarePlan/r-{n}')}:{s.kind}:"
                         f"{due.isoformat()}:{s.step}")
    assert set(keys) == expected
    assert sum(sent) == len(payloads) and again.sent == 0
    print(f"replica work split: {sent}")
    for payload in payloads:
        assert_valid_event(json.loads(payload))


async def test_thousands_of_steps_owed_at_once_are_claimed_exactly_once(careplan_schema):
    """A practice's first pass can owe more steps than one PostgreSQL statement may bind
    (32,767 parameters, 10 per step): they are claimed in several statements, each once."""
    db = Database(careplan_schema.database_url, schema=SERVICE.schema)
    practice = f"cp-{uuid.uuid4().hex[:10]}"
    claims = [StepClaim(practice, f"t-{n}", "reminder", date(2026, 12, 1), 1, date(2026, 11, 1),
                        True) for n in range(4_000)]
    try:
        async with db.unit_of_work() as uow:
            first = await claim_steps(uow, claims, START)
            await uow.commit()
        async with db.unit_of_work() as uow:
            again = await claim_steps(uow, claims, START)
    finally:
        await db.dispose()
    assert first == {c.key for c in claims} and again == set()
