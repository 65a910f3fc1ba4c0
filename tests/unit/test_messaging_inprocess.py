"""Outbox, relay and consumer runtime on the in-process bus and SQLite (embedded mode)."""

import asyncio
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from ccm_shared.consumer import ConsumerRuntime, dlq_topic
from ccm_shared.events import CloudEvent, EventDraft, Message
from ccm_shared.outbox import OutboxRelay
from ccm_shared.tables import inbox_table
from ccm_shared.transport import InProcessTransport
from tests.support.messaging import (
    effect_rows,
    make_event,
    record_effect,
    state_count,
    write_state_and_event,
)

TOPIC = "tests.thing.happened.v1"


def consumer(db, bus, **kw) -> ConsumerRuntime:
    return ConsumerRuntime(
        name="tests-consumer", topics=[TOPIC], handler=record_effect, db=db, transport=bus,
        backoff_initial=0, backoff_max=0, poll_timeout=0.01, **kw,
    )


async def test_committed_state_change_publishes_its_event(sqlite_db):
    bus = InProcessTransport()
    stored = await write_state_and_event(sqlite_db, TOPIC, make_event(), commit=True)
    assert await OutboxRelay(sqlite_db, bus).drain() == 1
    [msg] = bus.messages(TOPIC)
    assert CloudEvent.from_json(msg.value).id == stored.id
    assert msg.key == b"acme:p1"


async def test_rolled_back_transaction_publishes_nothing(sqlite_db):
    bus = InProcessTransport()
    await write_state_and_event(sqlite_db, TOPIC, make_event(), commit=False)
    assert await OutboxRelay(sqlite_db, bus).drain() == 0
    assert bus.messages(TOPIC) == []
    assert await state_count(sqlite_db) == 0


async def test_an_event_kafka_cannot_take_is_refused_with_its_unit_of_work(sqlite_db):
    """Over MAX_EVENT_BYTES the relay could never publish it and every later event would wait
    behind it: it is refused when written, and its transaction's state with it."""
    from ccm_shared.errors import EventTooLarge
    from ccm_shared.outbox import MAX_EVENT_BYTES

    big = make_event(data={"blob": "x" * (MAX_EVENT_BYTES + 1)})
    with pytest.raises(EventTooLarge, match="tests.thing.happened.v1: .* bytes of JSON"):
        await write_state_and_event(sqlite_db, TOPIC, big, commit=True)
    assert await state_count(sqlite_db) == 0
    bus = InProcessTransport()
    assert await OutboxRelay(sqlite_db, bus).drain() == 0
    fits = make_event(data={"blob": "x" * (MAX_EVENT_BYTES - 1024)})
    await write_state_and_event(sqlite_db, TOPIC, fits, commit=True)
    assert await OutboxRelay(sqlite_db, bus).drain() == 1


async def test_sequence_counts_per_patient_and_tenant(sqlite_db):
    seqs = []
    for tenant, patient in [("a", "p1"), ("a", "p1"), ("a", "p2"), ("b", "p1"), ("a", "p1")]:
        ev = await write_state_and_event(sqlite_db, TOPIC, make_event(tenant, patient), commit=True)
        seqs.append(ev.sequence)
    assert seqs == [1, 2, 1, 1, 3]


async def test_event_without_patient_has_no_sequence_and_tenant_key(sqlite_db):
    bus = InProcessTransport()
    ev = await write_state_and_event(sqlite_db, TOPIC, make_event(patient=None), commit=True)
    await OutboxRelay(sqlite_db, bus).drain()
    assert ev.sequence is None
    assert bus.messages(TOPIC)[0].key == b"acme"


async def test_relay_sends_each_event_once_and_marks_it_sent(sqlite_db):
    bus = InProcessTransport()
    for i in range(25):
        await write_state_and_event(sqlite_db, TOPIC, make_event(value=i), commit=True)
    relay = OutboxRelay(sqlite_db, bus, batch_size=7)
    assert await relay.drain() == 25
    assert await relay.drain() == 0
    assert await relay.backlog() == 0
    assert len(bus.messages(TOPIC)) == 25


async def test_redelivered_event_is_a_no_op(sqlite_db):
    bus = InProcessTransport()
    await write_state_and_event(sqlite_db, TOPIC, make_event(), commit=True)
    await OutboxRelay(sqlite_db, bus).drain()
    runtime = consumer(sqlite_db, bus)
    await runtime.start()
    await runtime.run_once()
    # Same message again, as after a crash before the offset commit.
    await runtime.process(bus.messages(TOPIC)[0])
    assert len(await effect_rows(sqlite_db)) == 1
    assert runtime.stats.applied == 1 and runtime.stats.duplicates == 1


async def test_poison_event_goes_to_dlq_after_retries_and_partition_keeps_flowing(sqlite_db):
    bus = InProcessTransport(partitions=1)
    good1, poison, good2 = make_event(value=1), make_event(type="tests.poison.v1"), make_event(value=2)
    await bus.send_batch([Message(TOPIC, e.to_json(), key=b"acme:p1") for e in (good1, poison, good2)])
    await bus.send_batch([Message(TOPIC, b"{not json", key=b"acme:p1")])
    runtime = consumer(sqlite_db, bus, max_retries=2)
    await runtime.start()
    while await runtime.run_once():
        pass
    assert [r.event_id for r in await effect_rows(sqlite_db)] == [good1.id, good2.id]
    dead = bus.messages(dlq_topic(TOPIC))
    assert len(dead) == 2
    assert CloudEvent.from_json(dead[0].value).id == poison.id
    assert dead[0].header("dlq-error") == b"RuntimeError"
    assert dead[0].header("dlq-attempts") == b"3"
    assert dead[1].header("dlq-error") == b"PoisonMessage"
    assert runtime.stats.retries == 2
    assert bus.committed[("tests-consumer", runtime.source.assignment().pop())] == 4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_any_order_and_number_of_deliveries_applies_each_event_once(tmp_path_factory, data):
    from ccm_shared.audit import audit_metadata
    from ccm_shared.db import Database
    from tests.support.messaging import metadata

    folder = tmp_path_factory.mktemp("prop")
    db = Database(f"sqlite+aiosqlite:///{folder}/platform.db", schema="ingest")
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.run_sync(audit_metadata.create_all)
    try:
        events = [make_event(patient=f"p{i % 3}", value=i) for i in range(8)]
        deliveries = data.draw(
            st.lists(st.sampled_from(range(len(events))), min_size=len(events), max_size=30)
            .map(lambda xs: xs + list(range(len(events))))
            .flatmap(st.permutations)
        )
        runtime = consumer(db, InProcessTransport())
        for i in deliveries:
            await runtime.process(Message(TOPIC, events[i].to_json(), key=b"k"))
        rows = await effect_rows(db)
        assert sorted(r.event_id for r in rows) == sorted(e.id for e in events)
    finally:
        await db.dispose()


async def test_concurrent_duplicate_deliveries_apply_once(sqlite_db):
    event = make_event()
    runtime = consumer(sqlite_db, InProcessTransport())
    msg = Message(TOPIC, event.to_json(), key=b"acme:p1")
    await asyncio.gather(*(runtime.process(msg) for _ in range(5)))
    assert len(await effect_rows(sqlite_db)) == 1


async def test_add_many_numbers_each_patient_in_order_and_continues_the_sequence(sqlite_db):
    first = await write_state_and_event(sqlite_db, TOPIC, make_event("a", "p1"), commit=True)
    async with sqlite_db.unit_of_work() as uow:
        stored = await uow.outbox.add_many(
            [(TOPIC, make_event("a", p, value=i)) for i, p in enumerate(["p1", "p2", "p1", "p1"])]
            + [(TOPIC, make_event("a", None))]
        )
        await uow.commit()
    assert first.sequence == 1
    assert [e.sequence for e in stored] == [2, 1, 3, 4, None]
    assert await OutboxRelay(sqlite_db, InProcessTransport()).drain() == 6


async def test_event_drafts_are_numbered_and_published_as_their_cloud_events(sqlite_db):
    drafts = [EventDraft("/t", "tests.x.y.v1", "a", datetime(2026, 3, 1, tzinfo=UTC),
                         f"Patient/{p}", {"value": i}) for i, p in enumerate(["p1", "p2", "p1"])]
    async with sqlite_db.unit_of_work() as uow:
        stored = await uow.outbox.add_many([(TOPIC, d) for d in drafts])
        await uow.commit()
    assert [(e.id, e.sequence) for e in stored] == [(drafts[0].id, 1), (drafts[1].id, 1),
                                                   (drafts[2].id, 2)]
    bus = InProcessTransport()
    assert await OutboxRelay(sqlite_db, bus).drain() == 3
    assert [CloudEvent.from_json(m.value) for m in bus.messages(TOPIC)] == [
        CloudEvent(**{name: getattr(e, name) for name in CloudEvent.model_fields}) for e in stored]


async def test_handler_raising_poison_message_is_dead_lettered_without_retries(sqlite_db):
    from ccm_shared.consumer import PoisonMessage

    calls = []

    async def refuse(event, uow):
        calls.append(event.id)
        raise PoisonMessage("tenant is not a practice id")

    bus = InProcessTransport()
    runtime = ConsumerRuntime(name="poison", topics=[TOPIC], handler=refuse, db=sqlite_db,
                              transport=bus, max_retries=5, backoff_initial=0, backoff_max=0)
    await runtime.process(Message(TOPIC, make_event().to_json(), key=b"k"))
    assert len(calls) == 1 and runtime.stats.retries == 0
    assert bus.messages(dlq_topic(TOPIC))[0].header("dlq-error") == b"PoisonMessage"


async def test_prepare_runs_before_the_unit_of_work_and_its_failure_is_retried_then_dead_lettered(sqlite_db):
    calls: list[str] = []
    failures = {"left": 1}

    async def prepare(event):
        calls.append(f"prepare {event.data['value']}")
        if event.data["value"] == 2 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("topic creation failed once")
        if event.data["value"] == 3:
            raise RuntimeError("topic creation always fails")

    async def handle(event, uow):
        calls.append(f"handle {event.data['value']}")
        await record_effect(event, uow)

    bus = InProcessTransport(partitions=1)
    runtime = ConsumerRuntime(name="prepared", topics=[TOPIC], handler=handle, prepare=prepare,
                              db=sqlite_db, transport=bus, max_retries=2, backoff_initial=0,
                              backoff_max=0)
    for value in (1, 2, 3):
        await runtime.process(Message(TOPIC, make_event(value=value).to_json(), key=b"k"))
    assert calls == ["prepare 1", "handle 1", "prepare 2", "prepare 2", "handle 2",
                     "prepare 3", "prepare 3", "prepare 3"]
    assert [r.value for r in await effect_rows(sqlite_db)] == [1, 2]
    assert bus.messages(dlq_topic(TOPIC))[0].header("dlq-error") == b"RuntimeError"


@pytest.mark.parametrize("failure", ["value", "validation"])
async def test_the_dead_letter_reason_names_no_data_of_the_event(sqlite_db, failure):
    """``dlq-reason`` was the error's text, which may quote the event (a birth date in a
    ValueError, a validation error's input): Kafka headers carry no PHI."""
    from pydantic import BaseModel

    class Patient(BaseModel):
        birthDate: int  # noqa: N815 - the event's field

    async def fail(event, uow):
        if failure == "value":
            raise ValueError("Invalid isoformat string: '1950-02-03'")
        Patient(birthDate="1950-02-03")

    bus = InProcessTransport()
    runtime = ConsumerRuntime(name="reasons", topics=[TOPIC], handler=fail, db=sqlite_db,
                              transport=bus, max_retries=0, backoff_initial=0, backoff_max=0)
    await runtime.process(Message(TOPIC, make_event().to_json(), key=b"k"))
    (dead,) = bus.messages(dlq_topic(TOPIC))
    reason = dead.header("dlq-reason").decode()
    assert "1950" not in reason
    assert reason == ("ValueError" if failure == "value" else "birthDate: int_parsing"), reason


@pytest.mark.parametrize(("change", "rule"), [
    ({"seconds": -100000}, "data.seconds: breaks 'minimum'"),
    ({"unexpected": "field"}, "data.(root): breaks 'additionalProperties'"),
    ({"serviceMonth": "2025-13"}, "data.serviceMonth: breaks"),
    # a source version no FHIR server names so (billing held 64 characters and retried it)
    ({"source": {"resourceType": "Encounter", "id": "e1", "versionId": "9" * 65,
                 "lastUpdated": "2025-03-03T10:00:00Z", "sha256": "0" * 64,
                 "receivedAt": "2025-03-03T10:00:00Z"}}, "data.source.versionId: breaks"),
])
async def test_an_event_breaking_its_contract_is_dead_lettered_not_applied(sqlite_db, change,
                                                                             rule):
    """Consumers applied any data a well-formed envelope carried: a time entry of -100,000
    seconds took a patient's billed time below zero. Its contract is checked first."""
    from tests.unit.billing.events import time_logged

    applied = []

    async def handler(event, uow):
        applied.append(event.data["seconds"])

    good = time_logged("acme", "p1", "e1", 1200, "2025-03-03T10:00:00Z")
    bad = good.model_copy(update={"id": "bad-1", "data": {**good.data, **change}})
    bus = InProcessTransport()
    runtime = ConsumerRuntime(name="contracts", topics=[TOPIC], handler=handler, db=sqlite_db,
                              transport=bus, max_retries=3, backoff_initial=0, backoff_max=0)
    for e in (bad, good):
        await runtime.process(Message(TOPIC, e.to_json(), key=b"acme:p1"))
    assert applied == [1200] and runtime.stats.retries == 0
    (dead,) = bus.messages(dlq_topic(TOPIC))
    reason = dead.header("dlq-reason").decode()
    assert dead.header("dlq-error") == b"PoisonMessage" and rule in reason, reason
    assert "100000" not in reason and "unexpected" not in reason
    # its inbox row says whose it was: a practice's set-aside events can be found
    async with sqlite_db.engine.connect() as conn:
        rows = (await conn.execute(select(inbox_table.c.tenant, inbox_table.c.outcome).where(
            inbox_table.c.consumer == "contracts"))).all()
    assert ("acme", "dead-lettered") in [tuple(r) for r in rows]



def test_an_infrastructure_error_is_logged_without_the_data_it_was_about():
    """The consumer's 'infrastructure unavailable' and the relay's 'publish failed' lines logged
    the error's text: SQLAlchemy's quotes the statement and its parameters (an event's data)."""
    from sqlalchemy.exc import OperationalError

    from ccm_shared.db import loggable

    class Refused(Exception):
        sqlstate = "57P01"

    error = OperationalError("INSERT INTO billing.patients VALUES ($1, $2)",
                             ("Jane Doe", "1950-01-01"), Refused("terminating connection"))
    assert loggable(error) == "OperationalError (SQLSTATE 57P01)"
    assert "Jane" not in loggable(error) and "1950" not in loggable(error)
    # Other errors keep their words: where it could not connect is what an operator needs.
    assert loggable(ConnectionRefusedError(111, "Connect call failed ('10.0.0.7', 5432)")) \
        == "[Errno 111] Connect call failed ('10.0.0.7', 5432)"


@pytest.mark.parametrize(("change", "reason"), [
    ({"id": "x" * 201}, "the event id has 201 characters; an inbox holds 200 at most"),
    ({"tenant": "t" * 65}, "the event's tenant is no practice id"),
    ({"tenant": "a practice"}, "the event's tenant is no practice id"),
])
async def test_an_event_no_inbox_can_record_is_dead_lettered_at_once(sqlite_db, change, reason):
    """An event id or tenant longer than the inbox's columns failed that insert at every retry
    on PostgreSQL (SQLite keeps any length), then was dead-lettered: now at once."""
    applied = []

    async def handler(event, uow):
        applied.append(event.id)

    bus = InProcessTransport()
    runtime = ConsumerRuntime(name="widths", topics=[TOPIC], handler=handler, db=sqlite_db,
                              transport=bus, max_retries=3, backoff_initial=0, backoff_max=0)
    event = make_event().model_copy(update=change)
    await runtime.process(Message(TOPIC, event.to_json(), key=b"acme:p1"))
    assert applied == [] and runtime.stats.retries == 0
    (dead,) = bus.messages(dlq_topic(TOPIC))
    assert dead.header("dlq-reason").decode() == reason


def _kafka_errors():
    from aiokafka import errors

    return errors


@pytest.mark.parametrize(("error", "transient"), [
    # Kafka too slow or away: waited out (these are RuntimeErrors, not OSErrors)
    (lambda e: e.RequestTimedOutError(), True),
    (lambda e: e.NodeNotReadyError(), True),
    (lambda e: e.KafkaConnectionError(), True),
    (lambda e: e.KafkaTimeoutError(), True),
    (lambda e: e.LeaderNotAvailableError(), True),
    (lambda e: e.for_code(41)("could not create topic t: error code 41"), True),  # no controller
    # what Kafka says will not change by waiting: retried, then dead-lettered
    (lambda e: e.InvalidPartitionsError(), False),
    (lambda e: e.TopicAuthorizationFailedError(), False),
    # the database and the network, as before
    (lambda e: ConnectionRefusedError(), True),
    (lambda e: RuntimeError("a handler's own failure"), False),
])
def test_which_failures_are_waited_out_rather_than_dead_lettered(error, transient):
    from ccm_shared.consumer import is_transient

    assert is_transient(error(_kafka_errors())) is transient


async def test_a_kafka_timeout_in_prepare_is_waited_out_not_dead_lettered(sqlite_db):
    """notification's feed creates a practice's topics in ``prepare``; a busy broker timed the
    request out six times and the billing event was dead-lettered (and the feed, numbering
    events itself, showed no gap). Kafka's retriable errors are now waited out."""
    left = {"timeouts": 8}

    async def prepare(event):
        if left["timeouts"]:
            left["timeouts"] -= 1
            raise _kafka_errors().RequestTimedOutError()

    bus = InProcessTransport(partitions=1)
    runtime = ConsumerRuntime(name="prepared", topics=[TOPIC], handler=record_effect,
                              prepare=prepare, db=sqlite_db, transport=bus, max_retries=2,
                              backoff_initial=0, backoff_max=0)
    await runtime.process(Message(TOPIC, make_event(value=7).to_json(), key=b"k"))
    assert [r.value for r in await effect_rows(sqlite_db)] == [7]
    assert bus.messages(dlq_topic(TOPIC)) == []
