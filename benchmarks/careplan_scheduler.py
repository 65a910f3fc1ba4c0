"""Care-plan scheduler: one pass over N tracked plans across P practices, each owing a step
(the overdue notice), and a quiet pass (nothing owed: the steady state every few minutes), against
the same run's bare SQL insert of the same step rows and outbox rows. Also two replicas running
the owed pass concurrently (the work is split by SKIP LOCKED; each step still sent once).

Needs real PostgreSQL: `deploy/local/up.sh && source .ccm-local/env` first.
Usage: uv run python benchmarks/careplan_scheduler.py [--plans 20000] [--practices 20]

Runs in throwaway schemas (dropped afterwards); the bench practices it registers in
platform.practices are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, date, datetime

from sqlalchemy import delete, func, insert, select, text

from ccm_careplan.adapters.orm import metadata, review_steps, trackers
from ccm_careplan.service_layer.common import tracker_id
from ccm_careplan.service_layer.scheduler import run_scheduler_pass
from ccm_shared.db import Database
from ccm_shared.migrate import upgrade_platform
from ccm_shared.tables import outbox_table, practices
from ccm_shared.tenancy import Pricing, create_practice

DUE = date(2027, 1, 5)
OWED = datetime(2027, 1, 6, 15, tzinfo=UTC)  # one day overdue: exactly one step each


async def fresh_schema(url: str, tag: str) -> Database:
    db = Database(url, schema=f"bench_cp_{tag}_{uuid.uuid4().hex[:6]}", pool_size=4)
    async with db.engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{db.schema}"'))
        await conn.run_sync(metadata.create_all)
    return db


async def drop(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{db.schema}" CASCADE'))
    await db.dispose()


async def seed(db: Database, practice_ids: list[str], plans: int) -> None:
    rows = []
    now = datetime.now(UTC)
    for n in range(plans):
        practice = practice_ids[n % len(practice_ids)]
        plan = f"CarePlan/b-{n}"
        rows.append({
            "id": tracker_id(practice, plan), "practice": practice, "care_plan": plan,
            "patient": f"Patient/b-{n}", "status": "active", "intent": "plan",
            "created": date(2026, 1, 5), "first_seen": date(2026, 1, 5), "current_version": "1",
            "current_last_updated": now, "author": "Practitioner/dr-b", "care_team": [],
            "addresses": [], "last_review": None, "last_reviewer": None, "next_review_due": DUE,
            "early_trigger": None, "early_trigger_date": None, "signoff_status": "awaiting",
            "signoff_by": None, "signoff_date": None, "reminders_sent": 0, "escalation_level": 0,
            "updated_at": now,
        })
    async with db.engine.begin() as conn:
        for i in range(0, len(rows), 2000):
            await conn.execute(insert(trackers), rows[i:i + 2000])
    # The three reminders before due were already sent: only the overdue notice is owed.
    async with db.engine.begin() as conn:
        for i in range(0, len(rows), 2000):
            await conn.execute(insert(review_steps), [
                {"idempotency_key": f"{r['practice']}:{r['id']}:reminder:{DUE}:{k}",
                 "practice": r["practice"], "tracker_id": r["id"], "kind": "reminder",
                 "cycle_due": DUE, "step": k, "scheduled_on": DUE, "sent": True,
                 "event_id": None, "recorded_at": now}
                for r in rows[i:i + 2000] for k in (1, 2, 3)] + [
                {"idempotency_key": f"{r['practice']}:{r['id']}:due:{DUE}:0",
                 "practice": r["practice"], "tracker_id": r["id"], "kind": "due",
                 "cycle_due": DUE, "step": 0, "scheduled_on": DUE, "sent": True,
                 "event_id": None, "recorded_at": now} for r in rows[i:i + 2000]])


async def bare_insert(db: Database, practice_ids: list[str], plans: int) -> float:
    """The floor: the same step rows and outbox rows, batch-inserted by plain SQL."""
    now = datetime.now(UTC)
    started = time.perf_counter()
    async with db.engine.begin() as conn:
        for i in range(0, plans, 2000):
            chunk = range(i, min(plans, i + 2000))
            await conn.execute(insert(review_steps), [
                {"idempotency_key": f"k-{n}", "practice": practice_ids[n % len(practice_ids)],
                 "tracker_id": f"t-{n}", "kind": "overdue", "cycle_due": DUE, "step": 0,
                 "scheduled_on": DUE, "sent": True, "event_id": str(uuid.uuid4()),
                 "recorded_at": now} for n in chunk])
            await conn.execute(insert(outbox_table), [
                {"event_id": str(uuid.uuid4()), "tenant": practice_ids[n % len(practice_ids)],
                 "topic": "careplan.review.overdue.v1", "key": f"k-{n}",
                 "event_type": "careplan.review.overdue.v1",
                 "payload": json.dumps({"n": n, "pad": "x" * 400}), "correlation_id": None,
                 "created_at": now} for n in chunk])
    return time.perf_counter() - started


async def count_outbox(db: Database) -> int:
    async with db.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(outbox_table))).scalar_one()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=20_000)
    parser.add_argument("--practices", type=int, default=20)
    args = parser.parse_args()
    url = os.environ.get("CCM_DATABASE_URL")
    if not url or not url.startswith("postgresql"):
        print("set CCM_DATABASE_URL to PostgreSQL (source .ccm-local/env)", file=sys.stderr)
        return 2
    await asyncio.to_thread(upgrade_platform, url)
    tag = uuid.uuid4().hex[:6]
    practice_ids = [f"bench-cp-{tag}-{i}" for i in range(args.practices)]
    one, two, floor = [await fresh_schema(url, t) for t in ("one", "two", "floor")]
    try:
        for pid in practice_ids:
            await create_practice(one.engine, practice_id=pid, name=pid,
                                  timezone="America/Chicago", pricing=Pricing())
        for db in (one, two):
            await seed(db, practice_ids, args.plans)

        started = time.perf_counter()
        result = await run_scheduler_pass(one, OWED, practices=practice_ids)
        owed = time.perf_counter() - started
        assert result.sent == args.plans == await count_outbox(one), result

        started = time.perf_counter()
        quiet_result = await run_scheduler_pass(one, OWED, practices=practice_ids)
        quiet = time.perf_counter() - started
        assert quiet_result.sent == 0

        second = Database(url, schema=two.schema, pool_size=4)
        started = time.perf_counter()
        split = await asyncio.gather(run_scheduler_pass(two, OWED, practices=practice_ids),
                                     run_scheduler_pass(second, OWED, practices=practice_ids))
        concurrent = time.perf_counter() - started
        await second.dispose()
        assert sum(r.sent for r in split) == args.plans == await count_outbox(two)

        baseline = await bare_insert(floor, practice_ids, args.plans)
    finally:
        async with one.engine.begin() as conn:
            await conn.execute(delete(practices).where(practices.c.id.in_(practice_ids)))
        for db in (one, two, floor):
            await drop(db)

    print(f"plans={args.plans} practices={args.practices}")
    print(f"owed pass (1 replica):   {owed:7.2f} s  {args.plans / owed:9.0f} steps/s")
    print(f"owed pass (2 replicas):  {concurrent:7.2f} s  split {[r.sent for r in split]}")
    print(f"quiet pass (nothing owed): {quiet:5.2f} s")
    print(f"bare SQL insert of the same rows (baseline): {baseline:.2f} s")
    print(f"ratio owed pass / baseline: {owed / baseline:.1f}x; "
          f"2 replicas / 1 replica: {concurrent / owed:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
