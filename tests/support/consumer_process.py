"""A consumer in a process of its own, for the crash test.

Usage: python -m tests.support.consumer_process DB_URL SCHEMA BOOTSTRAP TOPIC GROUP EXPECT CRASH
Consumes until EXPECT messages were handled (applied or duplicate), printing its stats as JSON.
With CRASH=1 it SIGKILLs itself right after the first DB commit, before any offset commit.
"""

import asyncio
import json
import os
import signal
import sys

from ccm_shared.consumer import ConsumerHooks, ConsumerRuntime
from ccm_shared.db import Database
from ccm_shared.transport import KafkaTransport
from tests.support.messaging import record_effect


async def main(db_url, schema, bootstrap, topic, group, expect, crash) -> None:
    db = Database(db_url, schema=schema, pool_size=2)
    transport = KafkaTransport(bootstrap, client_id="crash-test")

    def after_commit(_message):
        if crash:
            os.kill(os.getpid(), signal.SIGKILL)

    runtime = ConsumerRuntime(
        name=group, topics=[topic], handler=record_effect, db=db, transport=transport,
        hooks=ConsumerHooks(after_db_commit=after_commit),
    )
    await runtime.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while runtime.stats.applied + runtime.stats.duplicates < expect:
            if loop.time() > deadline:
                raise SystemExit(f"only {runtime.stats} after 90 s")
            await runtime.run_once()
    finally:
        await runtime.stop_source()
        await transport.stop()
        await db.dispose()
    print(json.dumps({"applied": runtime.stats.applied, "duplicates": runtime.stats.duplicates}))


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], a[1], a[2], a[3], a[4], int(a[5]), a[6] == "1"))
