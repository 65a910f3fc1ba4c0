"""Outbox relay throughput against a bare aiokafka producer loop, in the same run.

Needs real PostgreSQL and Kafka: `deploy/local/up.sh && source .ccm-local/env` first.
Usage: uv run python benchmarks/outbox_relay.py [--events 20000] [--rounds 3] [--batch 1000]

Both sides publish the same payloads with the same producer settings (idempotent, acks=all,
same linger and batch size) and the same pipelining (a batch of sends, then wait for all acks).
The relay additionally reads its batch from PostgreSQL and marks it sent; the ratio is the cost
of that durability. Target (issue 2): >= 5,000 events/s and >= 0.4 of the bare loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid

from aiokafka import AIOKafkaProducer
from sqlalchemy import MetaData, text

from ccm_shared.db import Database
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.outbox import OutboxRelay
from ccm_shared.tables import add_messaging_tables
from ccm_shared.transport import KafkaTransport


def events(n: int) -> list[CloudEvent]:
    return [
        CloudEvent(
            source="/bench", type="bench.time.logged.v1", tenant="bench",
            subject=f"Patient/p{i % 500}", sequence=i // 500 + 1,
            data={"seconds": 1200, "encounter": f"Encounter/e{i}", "role": "staff"},
        )
        for i in range(n)
    ]


async def bare_loop(transport: KafkaTransport, topic: str, evs, batch: int) -> float:
    producer = AIOKafkaProducer(**transport.producer_options())
    await producer.start()
    try:
        messages = [to_message(topic, e) for e in evs]
        started = time.perf_counter()
        for i in range(0, len(messages), batch):
            futures = [
                await producer.send(m.topic, value=m.value, key=m.key, headers=list(m.headers))
                for m in messages[i : i + batch]
            ]
            await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def relay_run(db: Database, transport: KafkaTransport, topic: str, evs, batch: int) -> float:
    async with db.engine.begin() as conn:
        await conn.execute(text(f'TRUNCATE "{db.schema}".outbox'))
    for i in range(0, len(evs), 1000):  # filling the outbox is not timed
        async with db.unit_of_work() as uow:
            for e in evs[i : i + 1000]:
                await uow.outbox.add(topic, e)
            await uow.commit()
    relay = OutboxRelay(db, transport, batch_size=batch)
    started = time.perf_counter()
    published = await relay.drain()
    elapsed = time.perf_counter() - started
    assert published == len(evs), (published, len(evs))
    return elapsed


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    url, bootstrap = os.environ.get("CCM_DATABASE_URL"), os.environ.get(
        "CCM_KAFKA_BOOTSTRAP_SERVERS"
    )
    if not (url and url.startswith("postgresql") and bootstrap):
        print("set CCM_DATABASE_URL (PostgreSQL) and CCM_KAFKA_BOOTSTRAP_SERVERS: "
              "deploy/local/up.sh && source .ccm-local/env", file=sys.stderr)
        return 2
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    db = Database(url, schema=schema)
    metadata = MetaData()
    add_messaging_tables(metadata)
    async with db.engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        await conn.run_sync(metadata.create_all)
    transport = KafkaTransport(bootstrap, client_id="bench")
    topics = {k: f"bench.{k}.{uuid.uuid4().hex[:6]}.v1" for k in ("bare", "relay")}
    await transport.ensure_topics(list(topics.values()))
    evs = events(args.events)
    bare, relay = [], []
    try:
        for r in range(args.rounds):
            b = await bare_loop(transport, topics["bare"], evs, args.batch)
            o = await relay_run(db, transport, topics["relay"], evs, args.batch)
            bare.append(args.events / b)
            relay.append(args.events / o)
            print(f"round {r + 1}/{args.rounds}: bare {bare[-1]:,.0f} ev/s, "
                  f"relay {relay[-1]:,.0f} ev/s", file=sys.stderr)
    finally:
        await transport.stop()
        async with db.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await db.dispose()
    b, o = statistics.median(bare), statistics.median(relay)
    print(f"events per round:        {args.events:,}")
    print(f"bare aiokafka loop:      {b:,.0f} events/s (median of {args.rounds})")
    print(f"outbox relay:            {o:,.0f} events/s (median of {args.rounds})")
    print(f"ratio relay / bare:      {o / b:.2f}   (target >= 0.40)")
    print(f"relay target 5,000/s:    {'met' if o >= 5000 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
