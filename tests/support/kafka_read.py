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


async def partitions_of(bootstrap: str, topics) -> list:  # noqa: ANN001
    """Every partition of the topics (as aiokafka TopicPartitions)."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]


async def start_group_at_end(bootstrap: str, group_id: str, topics) -> None:  # noqa: ANN001
    """Commit a new consumer group's offsets at the topics' current ends, so that it reads only
    what is published from now on: a test's own group on a long-lived local broker must not
    wade through every earlier run's events before reaching the test's."""
    partitions = await partitions_of(bootstrap, topics)
    assert len({tp.topic for tp in partitions}) == len(set(topics)), "a topic does not exist"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.commit(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()
