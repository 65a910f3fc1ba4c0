"""Billing month close: N patients with M time entries across P practices, closed and published
(ChargeItems, Invoices, period-closed and invoice-issued events through the outbox to Kafka),
against the same run's bare SQL aggregation of the same entries plus a bare publish of the same
events. Also projection throughput (time-entry events consumed from Kafka) and peak memory.

Needs real PostgreSQL and Kafka: `deploy/local/up.sh && source .ccm-local/env` first.
Usage: uv run python benchmarks/billing_close.py [--patients 100000] [--entries-per-patient 6]
       [--practices 100] [--concurrency 4] [--projection-events 20000] [--relay-in-api]

The closes run in this process, the outbox relay in one of its own (as deployed: billing-relay
is its own Deployment, polling the outbox at the configured interval); --relay-in-api runs it in
this process instead, as `ccm up` does. Runs in a throwaway schema (dropped afterwards) and publishes to bench.* topics; the bench
practices it registers in platform.practices are deleted at the end. Targets (issue 4): close ≤ 15 s for 100,000 patients /
600,000 entries including publishing, and ≤ 1.5 × (bare SQL aggregation + bare publish). The
close runs once (a month closes once); the baseline runs three times after it and its medians
are used (one run of the aggregation ranged 0.9–1.75 s on the same machine in one evening).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import multiprocessing
import os
import random
import resource
import statistics
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta

from aiokafka import AIOKafkaProducer
from sqlalchemy import func, select, text

from ccm_billing.adapters import filed
from ccm_billing.domain.model import Month
from ccm_billing.entrypoints.consumers import consumers
from ccm_billing.service_layer import decision_cache
from ccm_billing.service_layer.common import practice_info
from ccm_billing.service_layer.invoicing import close_period
from ccm_billing.service_layer.projections import RECORDED
from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.db import Database
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.migrate import upgrade, upgrade_platform
from ccm_shared.outbox import OutboxRelay
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice
from ccm_shared.transport import KafkaTransport

MONTH = Month(2025, 3)
NOW = datetime(2025, 4, 2, 12, tzinfo=UTC)
PRICING = Pricing(model="percent-of-medicare", percent=__import__("decimal").Decimal("45"))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss, not inherited
    from the parent that started it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def load(db: Database, practices: list[str], per_practice: int, entries: int) -> int:
    """Projection rows written straight with COPY (setup, not timed)."""
    rng = random.Random(42)
    start = datetime(2025, 3, 1, 14, tzinfo=UTC)
    version = "2025-01-01T00:00:00.000000|00000000000000000001"
    rows = {k: [] for k in ("patients", "consents", "care_plans", "conditions", "time_entries",
                            "practitioner_roles")}
    n_entries = 0
    for practice in practices:
        rows["practitioner_roles"] += [
            (practice, "nurse", version, "Practitioner/nurse", "clinical-staff", True),
            (practice, "doc", version, "Practitioner/doc", "billing-practitioner", True)]
        for p in range(per_practice):
            pid = f"p{p}"
            rows["patients"].append((practice, pid, version, None, True))
            rows["consents"].append((practice, f"c{p}", pid, version, "active",
                                     datetime(2024, 6, 1, tzinfo=UTC), "permit", None, None))
            rows["care_plans"].append((practice, f"cp{p}", pid, version, "active", "plan",
                                       date(2024, 6, 1), date(2025, 1, 5)))
            rows["conditions"] += [(practice, f"k{p}a", pid, version, True),
                                   (practice, f"k{p}b", pid, version, True)]
            for e in range(entries):
                doc = rng.random() < 0.1
                rows["time_entries"].append((
                    practice, f"e{p}-{e}", pid, version + RECORDED, version + RECORDED, "finished",
                    rng.randint(60, 900),
                    start + timedelta(days=rng.randint(0, 27), minutes=e), "2025-03", False,
                    "Practitioner/doc" if doc else "Practitioner/nurse",
                    "PractitionerRole/doc" if doc else "PractitionerRole/nurse", "[]", "[]",
                    False))
                n_entries += 1
    columns = {
        "patients": ["practice", "patient_id", "version", "mbi", "active"],
        "consents": ["practice", "consent_id", "patient", "version", "status", "obtained_at",
                     "provision", "effective_until", "practitioner"],
        "care_plans": ["practice", "care_plan_id", "patient", "version", "status", "intent",
                       "created", "last_review"],
        "conditions": ["practice", "condition_id", "patient", "version", "counts"],
        "time_entries": ["practice", "entry_id", "patient", "version", "data_version", "status",
                         "seconds", "start", "month", "complex", "practitioner",
                         "practitioner_role", "role_codes", "warnings", "late"],
        "practitioner_roles": ["practice", "role_id", "version", "practitioner",
                               "classification", "active"],
    }
    async with db.engine.begin() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        for table, records in rows.items():
            await raw.copy_records_to_table(table, records=records, columns=columns[table],
                                            schema_name=db.schema)
    # A month's rows as autovacuum leaves them: it vacuums and analyzes a table after its
    # inserts (autovacuum_vacuum_insert_threshold, PostgreSQL 13+), many times over a month.
    # Rows just copied and never vacuumed make the close's reads of them ~20 % slower.
    async with db.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        for table in ("time_entries", "patients", "consents", "care_plans", "conditions",
                      "practitioner_roles", "source_versions", "fact_generations", "inbox",
                      "billing_periods"):
            await conn.execute(text(f'VACUUM ANALYZE "{db.schema}".{table}'))
    return n_entries


class BenchTopics(KafkaTransport):
    """Publishes billing.* events to bench-only topics: the shared broker's real billing topics
    (which other services consume) never see benchmark invoices."""

    def __init__(self, bootstrap: str, tag: str) -> None:
        super().__init__(bootstrap, client_id="bench-billing")
        self.tag = tag

    def bench_topic(self, topic: str) -> str:
        return f"bench.{topic}.{self.tag}"

    async def send_batch(self, messages) -> None:  # noqa: ANN001
        await super().send_batch([
            dataclasses.replace(m, topic=self.bench_topic(m.topic)) if m.topic.startswith("billing.")
            else m for m in messages])


async def decide_during_month(db: Database, practices: list[str], concurrency: int) -> float:
    """What the billing scheduler does as facts arrive: keep every patient's decision current
    (decision_cache.refresh). Timed and reported on its own, not part of the close."""
    gate = asyncio.Semaphore(concurrency)

    async def refresh_one(practice: str) -> None:
        async with gate, db.unit_of_work() as uow:
            await decision_cache.refresh(uow, await practice_info(uow.session, practice), MONTH, NOW)
            await uow.commit()

    started = time.perf_counter()
    await asyncio.gather(*(refresh_one(p) for p in practices))
    return time.perf_counter() - started


async def close_all(db: Database, transport: KafkaTransport, practices: list[str],
                    concurrency: int, relay_process: RelayProcess | None,
                    ) -> tuple[float, float, int]:
    """Close every practice, ``concurrency`` at a time, until the outbox has reached Kafka. The
    relay runs in ``relay_process`` (as deployed: billing-relay is a Deployment of its own), or
    in this process when None (``--relay-in-api``)."""
    relay = OutboxRelay(db, transport, batch_size=1000, poll_interval=0.05)
    relay_task = asyncio.create_task(relay.run()) if relay_process is None else None
    gate = asyncio.Semaphore(concurrency)

    async def close_one(practice: str) -> None:
        async with gate:
            async with db.unit_of_work() as uow:
                await close_period(uow, practice, MONTH, NOW)
                await uow.commit()
            relay.notify()

    gc.freeze()  # as `ccm serve` does once started
    started = time.perf_counter()
    await asyncio.gather(*(close_one(p) for p in practices))
    closed = time.perf_counter() - started
    while await relay.backlog():
        if relay_process is not None:
            relay_process.check()
        elif relay_task.done():
            relay_task.result()  # the in-process relay failed: raise its error
        if time.perf_counter() - started > 600:
            raise RuntimeError("the outbox did not reach Kafka in 10 minutes")
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    if relay_task is not None:
        relay.stop()
        await relay_task
    async with db.engine.connect() as conn:
        sent = (await conn.execute(text(f'SELECT count(*) FROM "{db.schema}".outbox'))).scalar()
    return elapsed, closed, sent


def _relay_process(url: str, schema: str, bootstrap: str, tag: str, ready, stop) -> None:  # noqa: ANN001
    """The outbox relay as billing-relay runs it: a process of its own, polling the outbox at
    the configured interval (no wake-up from the closes: they run in another process)."""

    async def run() -> None:
        db = Database(url, schema=schema, pool_size=2)
        transport = BenchTopics(bootstrap, tag)
        await transport.start()
        settings = load_settings(database_url=url)
        relay = OutboxRelay(db, transport, batch_size=settings.outbox_batch_size,
                            poll_interval=settings.outbox_poll_interval_seconds)
        task = asyncio.create_task(relay.run())
        try:
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
                if task.done():
                    task.result()
        finally:
            relay.stop()
            await task
            await transport.stop()
            await db.dispose()

    asyncio.run(run())


class RelayProcess:
    """``_relay_process`` started and stopped."""

    def __init__(self, url: str, schema: str, bootstrap: str, tag: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.stop_event = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_relay_process, args=(
            url, schema, bootstrap, tag, self.ready, self.stop_event))

    async def start(self) -> None:
        self.proc.start()
        deadline = time.monotonic() + 120
        while not await asyncio.to_thread(self.ready.wait, 0.5):
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError("the relay process did not start in 2 minutes")

    def check(self) -> None:
        """Raise when the relay process has died (its error is in its own output)."""
        if self.proc.exitcode is not None:
            raise RuntimeError(f"the relay process exited ({self.proc.exitcode})")

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.to_thread(self.proc.join, 60)
        if self.proc.is_alive():
            self.proc.terminate()
            await asyncio.to_thread(self.proc.join, 10)


async def bare_baseline(db: Database, transport: KafkaTransport, topic: str,
                        projected: str, runs: int = 3) -> tuple[list[float], list[float]]:
    """The same aggregation in one SQL statement (of the closed practices' entries, not those
    the projection phase added), and the same event payloads published bare: each ``runs``
    times (a single run of either varied by up to 2x on a busy machine; the median is used)."""
    sql, publish = [], []
    for _ in range(runs):
        started = time.perf_counter()
        async with db.engine.connect() as conn:
            rows = (await conn.execute(text(
                f'SELECT practice, patient, practitioner_role, sum(seconds) FROM "{db.schema}".time_entries '
                "WHERE month = '2025-03' AND status = 'finished' AND practice <> :projected "
                "GROUP BY practice, patient, practitioner_role"), {"projected": projected})).all()
        sql.append(time.perf_counter() - started)
        assert rows
    async with db.engine.connect() as conn:
        payloads = (await conn.execute(text(
            f'SELECT key, payload FROM "{db.schema}".outbox ORDER BY id'))).all()
    producer = AIOKafkaProducer(**transport.producer_options())
    await producer.start()
    try:
        for _ in range(runs):
            started = time.perf_counter()
            futures = [await producer.send(topic, value=p.payload.encode(),
                                           key=(p.key or "").encode()) for p in payloads]
            await asyncio.gather(*futures)
            publish.append(time.perf_counter() - started)
    finally:
        await producer.stop()
    return sql, publish


async def bare_writes(db: Database) -> float:
    """What a close wrote before it filed in place (billing_0009): the ChargeItems and the filings
    copied with INSERT … SELECT into tables shaped and indexed like the real ones. Not the issue's
    baseline (that one only aggregates): the copy a close no longer makes, for comparison."""
    q = f'"{db.schema}"'
    async with db.engine.begin() as conn:
        for table in ("charge_items", "decision_filings"):
            await conn.execute(text(f"CREATE TABLE {q}.bare_{table} (LIKE {q}.{table} INCLUDING ALL)"))
    started = time.perf_counter()
    async with db.engine.begin() as conn:
        await conn.execute(text(
            f"INSERT INTO {q}.bare_charge_items SELECT charge_item_id, practice, 'inv', patient, "
            f"month, code, 'billable', amount, resource FROM {q}.month_decision_lines"))
        await conn.execute(text(
            f"INSERT INTO {q}.bare_decision_filings SELECT practice, patient, month, 0, now(), "
            f"'closed', decision, entries FROM {q}.month_decisions"))
    return time.perf_counter() - started


class _Runtime:
    def __init__(self, db: Database) -> None:
        self.db = db

    def clock(self) -> datetime:
        return NOW


async def projection_throughput(db: Database, transport: KafkaTransport, practice: str,
                                n: int) -> tuple[float, float]:
    topic = f"bench.billing-projection.{uuid.uuid4().hex[:6]}.v1"
    await transport.ensure_topics([topic])
    src = {"resourceType": "Encounter", "versionId": "1", "lastUpdated": "2025-03-01T00:00:00Z",
           "sha256": "0" * 64, "receivedAt": "2025-03-01T00:00:00Z"}
    messages = []
    for i in range(n):
        pid = f"q{i % (n // 6 or 1)}"
        start = f"2025-03-{1 + i % 28:02d}T15:00:00Z"
        event = CloudEvent(source="/bench", type="ingest.time-entry.logged.v1", tenant=practice,
                           subject=f"Patient/{pid}", data={
            "source": {**src, "id": f"b{i}"}, "entry": f"Encounter/b{i}", "patient": f"Patient/{pid}",
            "seconds": 600, "start": start, "end": None, "serviceDate": start[:10],
            "serviceMonth": "2025-03", "activityCodes": ["99490"], "complex": False, "warnings": [],
            "performers": [{"practitioner": "Practitioner/nurse",
                            "practitionerRole": "PractitionerRole/nurse", "roleCodes": []}]})
        messages.append(to_message(topic, event))
    for i in range(0, n, 5000):
        await transport.send_batch(messages[i : i + 5000])
    spec = consumers(_Runtime(db))[0]
    consumer = ConsumerRuntime(name=f"bench-{uuid.uuid4().hex[:6]}", topics=[topic],
                               handler=spec.handler, db=db, transport=transport)
    gc.freeze()  # as `ccm serve` does once started: set-up objects out of the collector's way
    started = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    while consumer.stats.applied < n:
        await asyncio.sleep(0.05)
        if task.done():
            task.result()
    elapsed = time.perf_counter() - started
    consumer.stop()
    await task
    return n / elapsed, peak_rss_mb()


def _projection_process(url: str, schema: str, bootstrap: str, tag: str, practice: str, n: int,
                        results) -> None:  # noqa: ANN001
    """The projection phase in a process of its own, as the consumer runs in production: its
    peak memory is the consumer's, not this load generator's (which held the loaded rows)."""

    async def run() -> tuple[float, float]:
        db = Database(url, schema=schema, pool_size=2)
        transport = BenchTopics(bootstrap, tag)
        await transport.start()
        try:
            return await projection_throughput(db, transport, practice, n)
        finally:
            await transport.stop()
            await db.dispose()

    results.put(asyncio.run(run()))


async def projection_in_own_process(url: str, schema: str, bootstrap: str, tag: str,
                                    practice: str, n: int) -> tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_projection_process,
                       args=(url, schema, bootstrap, tag, practice, n, results))
    proc.start()
    try:
        return await asyncio.to_thread(results.get, True, 3600)
    finally:
        await asyncio.to_thread(proc.join, 60)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--entries-per-patient", type=int, default=6)
    parser.add_argument("--practices", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4, help="practices closed at once")
    parser.add_argument("--projection-events", type=int, default=20_000)
    parser.add_argument("--relay-in-api", action="store_true",
                        help="run the outbox relay in the closing process (as `ccm up` does) "
                        "instead of in a process of its own (as deployed: billing-relay)")
    parser.add_argument("--cold", action="store_true",
                        help="close without the decisions the scheduler keeps current during the "
                        "month: the close decides every patient itself")
    args = parser.parse_args()
    url, bootstrap = os.environ.get("CCM_DATABASE_URL"), os.environ.get("CCM_KAFKA_BOOTSTRAP_SERVERS")
    if not (url and url.startswith("postgresql") and bootstrap):
        print("set CCM_DATABASE_URL (PostgreSQL) and CCM_KAFKA_BOOTSTRAP_SERVERS: "
              "deploy/local/up.sh && source .ccm-local/env", file=sys.stderr)
        return 2
    await asyncio.to_thread(upgrade_platform, url)
    tag = uuid.uuid4().hex[:6]
    schema = f"bench_billing_{tag}"
    db = Database(url, schema=schema, pool_size=args.concurrency + 2)
    # The service's own migrations, as deployed (e.g. billing_0010's lz4 documents).
    await asyncio.to_thread(upgrade, url, schema, "ccm_billing.migrations")
    practices = [f"bench-{tag}-{i}" for i in range(args.practices)]
    proj_practice = practices[0] + "-proj"  # a registered practice, as events' tenants are
    for p in [*practices, proj_practice]:
        await create_practice(db.engine, practice_id=p, name=p, timezone="America/New_York",
                              pricing=PRICING)
    transport = BenchTopics(bootstrap, tag)
    await transport.start()
    await transport.ensure_topics([transport.bench_topic(t) for t in
                                   ("billing.period.closed.v1", "billing.invoice.issued.v1")])
    bare_topic = f"bench.billing-bare.{tag}.v1"
    await transport.ensure_topics([bare_topic])
    try:
        per = args.patients // args.practices
        t0 = time.perf_counter()
        n_entries = await load(db, practices, per, args.entries_per_patient)
        print(f"loaded {per * args.practices:,} patients, {n_entries:,} entries in "
              f"{time.perf_counter() - t0:.1f} s (setup, not timed)", file=sys.stderr)
        # Steady state: the projection goes into tables that hold a month of data and have
        # statistics, as a running system's do (autovacuum analyzes them). Into empty tables
        # never analyzed, PostgreSQL's first plans look entries up by the wrong index until
        # autovacuum's first ANALYZE (within a minute): a fresh install's first minute.
        rate, rss_after_projection = await projection_in_own_process(
            url, schema, bootstrap, tag, proj_practice, args.projection_events)
        print(f"projection: {args.projection_events:,} time-entry events consumed at {rate:,.0f} "
              f"events/s; peak RSS {rss_after_projection:.0f} MB", file=sys.stderr)
        during = None
        if not args.cold:
            during = await decide_during_month(db, practices, args.concurrency)
        relay_process = None if args.relay_in_api else RelayProcess(url, schema, bootstrap, tag)
        try:
            if relay_process is not None:
                await relay_process.start()
            close, closed, events = await close_all(db, transport, practices, args.concurrency,
                                            relay_process)
        finally:
            if relay_process is not None:
                await relay_process.stop()
        sql_runs, publish_runs = await bare_baseline(db, transport, bare_topic, proj_practice)
        sql, publish = statistics.median(sql_runs), statistics.median(publish_runs)
        writes = await bare_writes(db)
        async with db.engine.connect() as conn:
            items = (await conn.execute(select(func.count()).select_from(filed.charge_items))).scalar()
            totals = (await conn.execute(text(
                f'SELECT sum(total_net::numeric) FROM "{schema}".invoices'))).scalar()
    finally:
        await transport.stop()
        async with db.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            await conn.execute(text("DELETE FROM platform.practices WHERE id LIKE :p"),
                               {"p": f"bench-{tag}-%"})
        await db.dispose()
    baseline = sql + publish

    def runs(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    print(f"patients / entries / practices: {per * args.practices:,} / {n_entries:,} / {args.practices}")
    if during is not None:
        print(f"decided during the month:       {during:.2f} s  (scheduler's refresh of every "
              f"patient, before the close; not part of it)")
    print(f"outbox relay:                   "
          f"{'in the closing process' if args.relay_in_api else 'a process of its own (as deployed)'}")
    print(f"month close incl. publishing:   {close:.2f} s{' (cold: deciding every patient)' if args.cold else ''}  ({items:,} ChargeItems, {events} events, "
          f"invoices total ${totals:,.2f})")
    print(f"  of which the closes:          {closed:.2f} s; the outbox reached Kafka "
          f"{close - closed:.2f} s after the last one")
    print(f"bare SQL aggregation:           {sql:.2f} s  (median of {runs(sql_runs)})")
    print(f"bare publish of same events:    {publish:.2f} s  (median of {runs(publish_runs)})")
    print(f"(copy no longer made:           {writes:.2f} s — ChargeItems and filings by INSERT … "
          f"SELECT, what a close wrote before it filed in place)")
    print(f"ratio close / (sql + publish):  {close / baseline:.2f}   (target <= 1.5)")
    print(f"close target 15 s:              {'met' if close <= 15 else 'NOT met'}"
          + ("" if args.patients == 100_000 else f" (at {args.patients:,} patients)"))
    print(f"projection throughput:          {rate:,.0f} events/s; consumer peak RSS {rss_after_projection:.0f} MB")
    print(f"process peak RSS:               {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
