"""Read a topic from the beginning with a plain aiokafka consumer (no group, no commits)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer


async def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 60) -> list:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(records) < expect and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                records.extend(recs)
        # A short grace period shows whether anything beyond the expected arrived.
        for recs in (await consumer.getmany(timeout_ms=1000)).values():
            records.extend(recs)
    finally:
        await consumer.stop()
    return records
