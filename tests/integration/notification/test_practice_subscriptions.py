"""Practice subscriptions on real Kafka and PostgreSQL with real HTTP receivers: billing events
published to billing's topics (contract-valid, the envelope billing writes) come out on each
practice's own topic and at each practice's own webhook, in order, once, signed."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import outbox
from ccm_notification.bootstrap import SERVICE
from ccm_notification.entrypoints.workers import deliverer_of, practice_topics_of
from ccm_notification.subscriptions.domain import FEED_TYPES, Receiver, Verdict
from ccm_notification.subscriptions.service import feed_handler, feed_topics
from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.events import CloudEvent, practice_topic, to_message
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from ccm_shared.transport import TOPIC_CONFIG, KafkaTransport
from tests.integration.conftest import eventually
from tests.integration.notification.servers import start_http
from tests.support.contracts import assert_valid_event
from tests.unit.notification.feed_events import invoice_issued, payment_recorded, period_closed

pytestmark = pytest.mark.asyncio(loop_scope="session")
ISSUED = "billing.invoice.issued.v1"


class Service:
    """The notification service running its feed consumer, relay and webhook deliverer."""

    def __init__(self, runtime: ServiceRuntime, api: httpx.AsyncClient) -> None:
        self.runtime, self.api, self.kafka = runtime, api, runtime.transport
        self.tokens: dict[str, dict] = {}
        self.practices: set[str] = set()
        self.strangers: set[str] = set()  # tenants no practice is registered for (let through)

    async def practice(self) -> str:
        p = f"sp-{uuid.uuid4().hex[:10]}"
        await create_practice(self.runtime.db.engine, practice_id=p, name="Maple",
                              timezone="America/Chicago", pricing=Pricing())
        token = await create_token(self.runtime.db.engine, practice_id=p)
        self.tokens[p] = {"Authorization": f"Bearer {token}"}
        self.practices.add(p)
        await practice_topics_of(self.runtime).ensure([p])  # what the topics job does
        return p

    async def subscribe(self, practice: str, endpoint: str, events=(ISSUED,)) -> dict:  # noqa: ANN001
        r = await self.api.post(f"/v1/practices/{practice}/subscriptions", headers=self.tokens[
            practice], json={"events": list(events), "endpoint": endpoint,
                             "payload": "full-resource"})
        assert r.status_code == 201, r.text
        return r.json()

    async def get(self, practice: str, path: str) -> dict:
        r = await self.api.get(f"/v1/practices/{practice}/subscriptions{path}",
                               headers=self.tokens[practice])
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def settings_env():
    env = {"SUBSCRIPTION_REQUIRE_HTTPS": "false", "RETRY_BACKOFF_SECONDS": "0.2",
           "RETRY_BACKOFF_MAX_SECONDS": "0.5", "SUBSCRIPTION_PAUSE_AFTER_FAILURES": "3",
           "WEBHOOK_TIMEOUT_SECONDS": "5"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(f"CCM_NOTIFICATION_{key}", value)
        yield


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(infra, settings_env):
    await upgrade_async(infra.database_url, SERVICE.schema, SERVICE.migrations_package)
    settings = load_settings(database_url=infra.database_url,
                             kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
                             secret_key="integration-secret-key-0123456789abcdef")
    kafka = KafkaTransport(infra.kafka_bootstrap_servers, client_id="ccm-subscription-tests")
    runtime = ServiceRuntime.build(SERVICE, settings, transport=kafka)
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                            base_url="http://notify.test")
    svc = Service(runtime, api)
    handler = feed_handler(runtime.clock)
    prepare = feed_topics(practice_topics_of(runtime), runtime.db)

    async def this_tests_practices_only(event: CloudEvent, uow) -> None:  # noqa: ANN001
        # The shared broker holds other test runs' billing events; the handler under test is
        # unchanged, only foreign practices are left out of this run.
        if event.tenant in svc.practices | svc.strangers:
            await handler(event, uow)

    async def prepare_this_tests_practices(event: CloudEvent) -> None:
        if event.tenant in svc.practices | svc.strangers:
            await prepare(event)

    # A fresh group (and inbox key) per run; the production group name is notification-….
    runtime.consumers = [ConsumerRuntime(
        name=f"notification-practice-feed-it-{uuid.uuid4().hex[:8]}", topics=FEED_TYPES,
        handler=this_tests_practices_only, prepare=prepare_this_tests_practices,
        db=runtime.db, transport=kafka,
        backoff_initial=0.1, backoff_max=0.5)]
    await runtime.start(consumers=True, relay=True, background=False)
    stopping = asyncio.Event()

    async def deliver() -> None:
        while not stopping.is_set():
            if not await deliverer_of(runtime).run_once():
                await asyncio.sleep(0.1)

    delivering = asyncio.create_task(deliver())
    yield svc
    stopping.set()
    await delivering
    await api.aclose()
    await runtime.state["http_client"].aclose()
    await runtime.stop()


async def publish_as_billing(kafka, *events: CloudEvent) -> None:  # noqa: ANN001
    for event in events:
        assert_valid_event(event)
    await kafka.send_batch([to_message(e.type, e) for e in events])


async def read_topic(kafka, topic: str, expected: int, practice: str) -> list[dict]:  # noqa: ANN001
    """Read ``topic`` as the practice's own integration would (group practice.<id>.…), until
    ``expected`` records came, then a little longer to catch any extra one."""
    source = kafka.source([topic], f"practice.{practice}.it-{uuid.uuid4().hex[:6]}")
    await source.start()
    got: list[dict] = []
    try:
        async def enough() -> bool:
            for records in (await source.poll(0.5, 100)).values():
                got.extend(json.loads(r.value) for r in records)
            return len(got) >= expected

        await eventually(enough, timeout=60, what=f"{expected} records on {topic}")
        for records in (await source.poll(1.5, 100)).values():
            got.extend(json.loads(r.value) for r in records)
    finally:
        await source.stop()
    return got


async def test_two_practices_interleaved_each_get_exactly_their_own_in_order_once(service):
    a, b = await service.practice(), await service.practice()
    receivers = {a: start_http(), b: start_http()}
    try:
        subs = {p: await service.subscribe(p, receivers[p].url + "/hook") for p in (a, b)}
        sent: dict[str, list[str]] = {a: [], b: []}
        for i in range(10):
            p = (a, b)[i % 2] if i < 6 else (b, a)[i % 2]
            event = invoice_issued(p, total=f"{100 + i}.00")
            sent[p].append(event.id)
            await publish_as_billing(service.kafka, event)
        again = invoice_issued(a).model_copy(update={"id": sent[a][0]})  # billing re-publishes
        await publish_as_billing(service.kafka, again)

        for p in (a, b):
            records = await read_topic(service.kafka, practice_topic(p, ISSUED), 5, p)
            assert [r["id"] for r in records] == sent[p]  # in order, each once, only its own
            assert [r["sequence"] for r in records] == [1, 2, 3, 4, 5]
            assert [r["data"]["practiceSequence"] for r in records] == [1, 2, 3, 4, 5]
            assert {r["tenant"] for r in records} == {p}
            assert all(r["data"]["invoice"]["resourceType"] == "Invoice" for r in records)

        for p in (a, b):
            await eventually(lambda p=p: _count(receivers[p], 5), timeout=30, what="webhooks")
            await asyncio.sleep(0.5)  # nothing more arrives
            got = receivers[p].accepted()
            assert [r.json()["event"]["id"] for r in got] == sent[p]
            assert [r.json()["eventNumber"] for r in got] == [1, 2, 3, 4, 5]
            verify = Receiver(subs[p]["secret"])
            now = int(service.runtime.clock().timestamp())
            assert all(verify.check(r.headers["X-CCM-Signature"], r.body, now) is Verdict.NEW
                       for r in got)
            assert {r.json()["practice"] for r in got} == {p}
    finally:
        for r in receivers.values():
            r.close()


async def _count(receiver, n: int) -> bool:  # noqa: ANN001
    return len(receiver.accepted()) >= n


async def test_a_receiver_down_then_back_loses_nothing_and_replay_by_number_works(service):
    p = await service.practice()
    receiver = start_http()
    try:
        sub = await service.subscribe(p, receiver.url + "/hook",
                                      events=(ISSUED, "billing.payment.recorded.v1"))
        receiver.fail_with = [503, 503, 503]  # down: the third failure in a row pauses
        first = invoice_issued(p)
        events = [first, payment_recorded(p, first.data["invoiceId"]), invoice_issued(p)]
        await publish_as_billing(service.kafka, *events)
        path = f"/{sub['id']}/status"

        async def paused() -> bool:
            return (await service.get(p, path))["status"] == "paused"

        await eventually(paused, timeout=60, what="the subscription to pause")
        await eventually(lambda: _lag(service, p, path, 3), timeout=30, what="3 events waiting")
        assert receiver.accepted() == []
        async with service.runtime.db.unit_of_work() as uow:
            rows = (await uow.session.execute(select(outbox.c.payload).where(
                outbox.c.event_type == "notification.subscription.paused.v1"))).all()
        assert [json.loads(r.payload)["data"]["subscription"] for r in rows].count(sub["id"]) == 1

        # back up: resume delivers everything, in order, once
        r = await service.api.post(f"/v1/practices/{p}/subscriptions/{sub['id']}/resume",
                                   headers=service.tokens[p])
        assert r.status_code == 200 and r.json()["status"] == "active"
        await eventually(lambda: _count(receiver, 3), timeout=30, what="the backlog delivered")
        got = receiver.accepted()
        assert [d.json()["eventNumber"] for d in got] == [1, 2, 3]
        # two billing topics: their relative order is the fan-out's (the practice sequence)
        assert sorted(d.json()["event"]["id"] for d in got) == sorted(e.id for e in events)
        sequences = [d.json()["event"]["practiceSequence"] for d in got]
        assert sequences == sorted(sequences) and len(set(sequences)) == 3
        status = await service.get(p, path)
        assert status["lagEvents"] == 0 and status["deliveredThrough"] == 3

        replay = await service.get(p, f"/{sub['id']}/events?since=1")
        assert replay["events"] == [d.json() for d in got[1:]]

        verify = Receiver(sub["secret"])
        now = int(service.runtime.clock().timestamp())
        done: list[dict] = []
        assert verify.receive(got[0].headers["X-CCM-Signature"], got[0].body, now,
                              done.append) == 200
        # delivered again (its answer lost): acknowledged, the work not done twice
        assert verify.receive(got[0].headers["X-CCM-Signature"], got[0].body, now,
                              done.append) == 200
        assert [n["eventNumber"] for n in done] == [1]
        tampered = got[1].body.replace(b'"eventNumber":2', b'"eventNumber":9')
        assert verify.receive(got[1].headers["X-CCM-Signature"], tampered, now,
                              done.append) == 401

        log = await service.get(p, f"/{sub['id']}/deliveries")
        assert [d["outcome"] for d in reversed(log)] == ["retry", "retry", "paused",
                                                         "delivered", "delivered", "delivered"]
        assert all(d["latencyMs"] >= 0 for d in log) and "503" in log[-1]["response"]
    finally:
        receiver.close()


async def _lag(service: Service, practice: str, path: str, n: int) -> bool:
    return (await service.get(practice, path))["lagEvents"] == n


async def test_a_month_close_puts_the_invoice_event_on_that_practices_topic(service):
    p, other = await service.practice(), await service.practice()
    issued = invoice_issued(p, month="2026-11", total="310.25")
    # What billing publishes when it closes the month: the invoice, then the period summary.
    await publish_as_billing(service.kafka, issued, period_closed(p, issued.data["invoiceId"]))
    [record] = await read_topic(service.kafka, practice_topic(p, ISSUED), 1, p)
    assert record["type"] == ISSUED and record["tenant"] == p and record["id"] == issued.id
    assert record["subject"] == f"Invoice/{issued.data['invoiceId']}"
    assert record["data"]["invoice"] == issued.data["invoice"]
    [closed] = await read_topic(service.kafka, practice_topic(p, "billing.period.closed.v1"), 1, p)
    assert closed["data"]["invoiceId"] == issued.data["invoiceId"]
    # Numbered in the order the feed consumed them: the two come on different topics, so either
    # may be first (run alone, the period summary often is); the numbers are 1 and 2, once each.
    assert record["data"]["practiceSequence"] == record["sequence"]
    assert {record["sequence"], closed["sequence"]} == {1, 2}
    assert await read_topic_quietly(service.kafka, practice_topic(other, ISSUED), other) == []
    # A practice's Invoice can be megabytes: its topics take what the platform's topics take.
    assert await topic_setting(service.kafka, practice_topic(p, ISSUED),
                               "max.message.bytes") == TOPIC_CONFIG["max.message.bytes"]


async def topic_setting(kafka: KafkaTransport, topic: str, name: str) -> str | None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(**kafka.connection_options())
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    entries = response.to_object()["resources"][0]["config_entries"]
    return next((e["config_value"] for e in entries if e["config_names"] == name), None)


async def read_topic_quietly(kafka, topic: str, practice: str) -> list[dict]:  # noqa: ANN001
    source = kafka.source([topic], f"practice.{practice}.it-{uuid.uuid4().hex[:6]}")
    await source.start()
    got: list[dict] = []
    try:
        for _ in range(6):
            for records in (await source.poll(0.5, 100)).values():
                got.extend(json.loads(r.value) for r in records)
    finally:
        await source.stop()
    return got


async def test_an_event_of_a_tenant_not_registered_here_is_dead_lettered_and_creates_nothing(
        service):
    """Two deployments on one Kafka: the other's billing events reached this feed, which made
    topics and counters for 34 practices it does not have. Now: dead-lettered, nothing made."""
    from ccm_notification.adapters.orm import event_sequences, inbox
    from ccm_notification.subscriptions.topics import topics_of

    stranger = f"sp-stranger-{uuid.uuid4().hex[:8]}"
    service.strangers.add(stranger)
    p = await service.practice()
    lost, kept = invoice_issued(stranger), invoice_issued(p)
    await publish_as_billing(service.kafka, lost, kept)
    [record] = await read_topic(service.kafka, practice_topic(p, ISSUED), 1, p)
    assert record["id"] == kept.id  # the registered practice's event goes on as ever

    async def dead_lettered() -> bool:  # the consumer's inbox row of a dead letter
        async with service.runtime.db.unit_of_work() as uow:
            return (await uow.session.execute(select(inbox.c.outcome).where(
                inbox.c.consumer == service.runtime.consumers[0].name,
                inbox.c.tenant == stranger))).scalars().all() == ["dead-lettered"]

    await eventually(dead_lettered, timeout=30, what="the stranger's event dead-lettered")
    async with service.runtime.db.unit_of_work() as uow:
        assert (await uow.session.execute(select(event_sequences).where(
            event_sequences.c.tenant == stranger))).all() == []
    unknown: list[str] = []
    assert await service.kafka.partitions_of(topics_of(stranger), unknown=unknown) == []
    assert sorted(unknown) == sorted(topics_of(stranger))  # no topic was made for it
