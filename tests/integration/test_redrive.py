"""`ccm redrive` on real Apache Kafka and PostgreSQL: a dead letter sent back is applied by the
consumer that set it aside, once, and taken as a duplicate by the one that had applied it; each
dead letter is sent back once, and one set aside again waits for the next run."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import insert, select

from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.events import Message, routing_headers
from tests.integration.conftest import eventually
from tests.support.messaging import effects, make_event

pytestmark = pytest.mark.asyncio(loop_scope="session")


def handler(name: str, broken: dict):
    async def apply(event, uow) -> None:  # noqa: ANN001
        if name == "flaky" and broken["now"] and event.type == "tests.fragile.v1":
            raise RuntimeError("fails until fixed")
        await uow.session.execute(insert(effects).values(
            event_id=event.id, tenant=event.tenant, subject=name, value=event.data["value"]))
    return apply


async def applied(db, name: str) -> list[int]:  # noqa: ANN001
    async with db.engine.connect() as conn:
        return sorted((await conn.execute(select(effects.c.value).where(
            effects.c.subject == name))).scalars().all())


def redrive(infra, *args: str, **settings: str) -> tuple[list[dict], str]:  # noqa: ANN001
    env = {**os.environ, "CCM_KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers,
           **settings}
    env.pop("CCM_DATABASE_URL", None)
    out = subprocess.run([sys.executable, "-m", "ccm_shared.cli", "redrive", *args],
                         capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


async def test_a_dead_letter_sent_back_is_applied_once_where_it_failed(infra, pg_db, kafka, topic):
    await kafka.ensure_topics([topic, f"{topic}.dlq"])
    events = [make_event(value=1), make_event(value=2, type="tests.fragile.v1"),
              make_event(value=3)]
    await kafka.send_batch([Message(topic, e.to_json(), b"acme:p1",
                                    routing_headers(e.type, e.tenant, None)) for e in events])
    broken = {"now": True}
    consumers = [ConsumerRuntime(name=name, topics=[topic], handler=handler(name, broken),
                                 db=pg_db, transport=kafka, max_retries=0,
                                 backoff_initial=0.01, backoff_max=0.05)
                 for name in ("flaky", "steady")]
    flaky, steady = consumers
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    dlq = f"{topic}.dlq"
    try:
        async def first_pass():
            return (await applied(pg_db, "flaky") == [1, 3]
                    and await applied(pg_db, "steady") == [1, 2, 3]
                    and flaky.stats.dead_lettered == 1)

        await eventually(first_pass, what="the fragile event set aside by one consumer")

        # Older than the inboxes remember (a day's retention, less the day's margin: any
        # age): not sent back, for a consumer that applied it may have forgotten it.
        old, said = await asyncio.to_thread(redrive, infra, dlq, "--consumer", "flaky",
                                            "--dry-run", CCM_INBOX_RETENTION_DAYS="1")
        assert [(x["eventId"], x.get("tooOld"), x["sent"]) for x in old] == [
            (events[1].id, True, False)]
        assert "older than the inboxes keep event ids" in said and "0 would be sent" in said
        # Not sent, and not passed over either: the next run of the same choice finds it.
        kept, said = await asyncio.to_thread(redrive, infra, dlq, "--consumer", "flaky",
                                             CCM_INBOX_RETENTION_DAYS="1")
        assert [(x.get("tooOld"), x["sent"]) for x in kept] == [(True, False)]
        assert f"stopped there ({dlq}[" in said and "0 sent back" in said
        listed, said = await asyncio.to_thread(redrive, infra, dlq, "--consumer", "flaky",
                                               "--dry-run")
        assert [(x["eventId"], x["type"], x["to"], x["consumer"], x["chosen"], x["sent"])
                for x in listed] == [(events[1].id, "tests.fragile.v1", topic, "flaky", True,
                                      False)]
        assert listed[0]["error"] == "RuntimeError" and listed[0]["tenant"] == "acme"
        assert "data" not in json.dumps(listed)  # the event's data (PHI) is never printed
        assert "1 would be sent back" in said

        # Sent back before the fix: set aside again, a duplicate for the other consumer.
        sent, said = await asyncio.to_thread(redrive, infra, dlq, "--consumer", "flaky")
        assert [x["sent"] for x in sent] == [True] and "1 sent back" in said

        async def set_aside_again():
            return flaky.stats.dead_lettered == 2 and steady.stats.duplicates >= 1

        await eventually(set_aside_again, what="the copy set aside again")
        broken["now"] = False
        # The next run reads only the new dead letter: the first one was sent back once.
        sent, said = await asyncio.to_thread(redrive, infra, dlq, "--consumer", "flaky")
        assert [(x["offset"], x["sent"]) for x in sent] == [(1, True)]

        async def fixed():
            return await applied(pg_db, "flaky") == [1, 2, 3]

        await eventually(fixed, what="the fragile event applied after the fix")
        await asyncio.sleep(1)  # a second application would show up as a second effect
        assert await applied(pg_db, "flaky") == [1, 2, 3]
        assert await applied(pg_db, "steady") == [1, 2, 3]
        nothing, said = await asyncio.to_thread(redrive, infra, dlq, "--consumer", "flaky")
        assert nothing == [] and "0 dead letter(s) read" in said
        # Without topics: every dead-letter topic on the broker, this one read to its end.
        everywhere, said = await asyncio.to_thread(redrive, infra, "--consumer", "flaky",
                                                   "--dry-run")
        assert not [x for x in everywhere if x["topic"] == dlq] and "warning" not in said
        # Another choice has its own place: it reads both, and chooses neither.
        other, said = await asyncio.to_thread(redrive, infra, dlq, "--consumer", "someone-else")
        assert [(x["offset"], x["chosen"], x["sent"]) for x in other] == [
            (0, False, False), (1, False, False)]
    finally:
        for c in consumers:
            c.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_topic_that_is_not_a_dead_letter_topic_is_refused(infra, topic):
    env = {**os.environ, "CCM_KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers}
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ccm_shared.cli", "redrive", topic],
        capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "not dead-letter topics" in out.stderr
