"""The embedded mode's durable log: same contract as Kafka, survives a restart."""

from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.embedded import EmbeddedLogTransport
from ccm_shared.outbox import OutboxRelay
from ccm_shared.service import build_transport
from ccm_shared.settings import load_settings
from ccm_shared.transport import InProcessTransport, KafkaTransport
from tests.support.messaging import effect_rows, make_event, record_effect, write_state_and_event

TOPIC = "tests.thing.happened.v1"


def consumer(db, bus):
    return ConsumerRuntime(name="embedded", topics=[TOPIC], handler=record_effect, db=db,
                           transport=bus, poll_timeout=0.01, backoff_initial=0, backoff_max=0)


async def test_uncommitted_progress_is_redelivered_after_a_restart_and_applied_once(sqlite_db):
    for i in range(5):
        await write_state_and_event(sqlite_db, TOPIC, make_event(value=i), commit=True)
    bus = EmbeddedLogTransport(sqlite_db.url)
    await OutboxRelay(sqlite_db, bus).drain()

    first = consumer(sqlite_db, bus)
    await first.start()
    batch = await first.source.poll(0.01, 3)  # read 3, apply them, crash before the commit
    for messages in batch.values():
        for m in messages:
            await first.process(m)
    await bus.stop()

    restarted_bus = EmbeddedLogTransport(sqlite_db.url)
    second = consumer(sqlite_db, restarted_bus)
    await second.start()
    while await second.run_once():
        pass
    assert second.stats.duplicates == 3 and second.stats.applied == 2
    assert sorted(r.value for r in await effect_rows(sqlite_db)) == [0, 1, 2, 3, 4]

    third = consumer(sqlite_db, restarted_bus)  # everything committed: nothing left
    await third.start()
    assert await third.run_once() == 0
    assert len(await restarted_bus.messages(TOPIC)) == 5
    await restarted_bus.stop()


def test_transport_choice_follows_configuration(tmp_path, clean_ccm_env):
    sqlite = load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/platform.db")
    assert isinstance(build_transport(sqlite), EmbeddedLogTransport)
    kafka = load_settings(database_url="postgresql+asyncpg://x@y/z", kafka_bootstrap_servers="k:1")
    assert isinstance(build_transport(kafka), KafkaTransport)
    assert isinstance(build_transport(load_settings(database_url="postgresql+asyncpg://x@y/z")),
                      InProcessTransport)


def test_ccm_events_reads_the_newest_events_of_the_embedded_log(tmp_path, monkeypatch):
    """`ccm events` without Kafka: the embedded mode's log in --data-dir, as from Kafka (the
    newest --last of each topic, oldest first; --practice; a topic without events named)."""
    import asyncio
    import json

    from typer.testing import CliRunner

    from ccm_shared import cli
    from ccm_shared.events import Message

    async def write() -> None:
        bus = EmbeddedLogTransport(f"sqlite+aiosqlite:///{tmp_path}/platform.db")
        await bus.send_batch([Message(TOPIC, json.dumps({"n": n}).encode(), b"k",
                                      (("ce_tenant", b"alpha" if n % 2 else b"beta"),))
                              for n in range(6)])
        await bus.send_batch([Message("tests.other.v1", b'{"n": 9}', None, ())])
        await bus.stop()

    asyncio.run(write())
    monkeypatch.delenv("CCM_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("CCM_DATABASE_URL", raising=False)

    def run(*args: str, data_dir=tmp_path):
        return CliRunner().invoke(cli.app, ["events", *args, "--data-dir", str(data_dir)])

    shown = run(TOPIC, "tests.other.v1", "tests.none.v1", "--last", "3")
    assert shown.exit_code == 0, shown.output
    lines = [json.loads(x) for x in shown.stdout.splitlines()]
    assert [(x["topic"], x["event"]["n"]) for x in lines] == [
        (TOPIC, 3), (TOPIC, 4), (TOPIC, 5), ("tests.other.v1", 9)]
    assert "no topic 'tests.none.v1' in the embedded event log" in shown.stderr
    again = run(TOPIC, "--last", "3", "--practice", "alpha")
    assert [json.loads(x)["event"]["n"] for x in again.stdout.splitlines()] == [3, 5]
    missing = run(TOPIC, data_dir=tmp_path / "none")
    assert missing.exit_code == 2 and "holds no embedded mode data" in missing.stderr
