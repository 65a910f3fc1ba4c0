"""SIGKILL a consumer between its DB commit and its offset commit."""

import asyncio
import json
import signal
import sys

import pytest

from ccm_shared.outbox import OutboxRelay
from tests.support.infra import ROOT
from tests.support.messaging import effect_rows, make_event, write_state_and_event

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def run_consumer(infra, db, topic, *, expect: int, crash: bool):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.consumer_process",
        infra.database_url, db.schema, infra.kafka_bootstrap_servers, topic, "crash-group",
        str(expect), "1" if crash else "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode, out.decode(), err.decode()


async def test_killed_consumer_gets_the_event_again_and_the_inbox_makes_it_a_no_op(
    infra, pg_db, kafka, topic
):
    await kafka.ensure_topics([topic])
    event = await write_state_and_event(pg_db, topic, make_event(value=7), commit=True)
    await OutboxRelay(pg_db, kafka).drain()

    code, _, err = await run_consumer(infra, pg_db, topic, expect=1, crash=True)
    assert code == -signal.SIGKILL, f"the consumer was meant to die by SIGKILL: {err[-2000:]}"
    assert [r.event_id for r in await effect_rows(pg_db)] == [event.id]  # the effect committed

    code, out, err = await run_consumer(infra, pg_db, topic, expect=1, crash=False)
    assert code == 0, err[-2000:]
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats == {"applied": 0, "duplicates": 1}, "the offset was not committed before death"
    assert [r.event_id for r in await effect_rows(pg_db)] == [event.id]
