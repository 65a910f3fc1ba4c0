"""Transactional outbox: events are rows written in the state change's own transaction; a relay
publishes them afterwards, in order, and marks them sent.

The relay never holds a database transaction open while it talks to Kafka: it reads a batch,
publishes it (idempotent producer, acks=all), then marks the batch sent in a second short
transaction. A crash between the two republishes the batch; consumers' inboxes make that a no-op.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog
from sqlalchemy import (
    BigInteger,
    LargeBinary,
    any_,
    cast,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ccm_shared.db import (
    Database,
    autocommit_engine,
    dialect_insert,
    loggable,
    qualified,
    schema_of,
)
from ccm_shared.errors import EventTooLarge
from ccm_shared.events import CloudEvent, EventDraft, Message, routing_headers
from ccm_shared.observability import current_correlation_id, metrics
from ccm_shared.tables import outbox_table, sequences_table
from ccm_shared.transport import MAX_MESSAGE_BYTES, Transport

log = structlog.get_logger(__name__)


# What an event's JSON may take of a Kafka record: the rest is room for its key and headers.
MAX_EVENT_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
# What one relay batch may hold of events' JSON, besides its count (CCM_OUTBOX_BATCH_SIZE):
# a thousand multi-megabyte events (a month-close burst of large practices' Invoices) would
# not fit the relay's memory. A batch always holds at least one event, however large.
MAX_BATCH_BYTES = 16 * 1024 * 1024


class Outbox:
    """Adds events to the current unit of work."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def reserve_sequences(self, tenant: str, subject: str, count: int = 1) -> int:
        """Reserve ``count`` consecutive per-(tenant, subject) numbers; return the first.

        The row lock serialises writers for one patient until this unit of work ends.
        """
        ins = dialect_insert(self.session.bind.dialect.name)
        stmt = (
            ins(sequences_table)
            .values(tenant=tenant, subject=subject, last=count)
            .on_conflict_do_update(
                index_elements=["tenant", "subject"],
                set_={"last": sequences_table.c["last"] + count},
            )
            .returning(sequences_table.c["last"])
        )
        return (await self.session.execute(stmt)).scalar_one() - count + 1

    async def next_sequence(self, tenant: str, subject: str) -> int:
        return await self.reserve_sequences(tenant, subject, 1)

    async def add(self, topic: str, event: CloudEvent) -> CloudEvent:
        """Record ``event`` for publication on ``topic`` when this unit of work commits.

        A patient-scoped event without a sequence gets the next one for its patient.
        """
        return (await self.add_many([(topic, event)]))[0]

    async def add_many(self, items: Sequence[tuple[str, CloudEvent]]) -> list[CloudEvent]:
        """``add`` for many events at once: one sequence reservation statement and one multi-row
        insert, in the given order (per patient, sequences follow that order)."""
        stored, rows = await self.stage_many(items)
        if rows:
            await self.session.execute(insert(outbox_table), rows)
        return stored

    async def stage_many(
        self, items: Sequence[tuple[str, CloudEvent | EventDraft]], *, events: bool = True
    ) -> tuple[list[CloudEvent | EventDraft], list[dict]]:
        """What ``add_many`` writes, without writing the rows: the events with their patients'
        next sequence numbers reserved (in this unit of work) and correlation ids set, and the
        outbox rows, for a caller that inserts them its own bulk way (e.g. COPY). The rows must
        be inserted in this unit of work, in this order. ``events=False``: the rows only (no
        copy of each event with its sequence: the rows' payloads have them)."""
        if not items:
            return [], []
        wanted: dict[tuple[str, str], int] = {}
        # Each event's counter (tenant, subject), None for an event that gets no number.
        counters: list[tuple[str, str] | None] = []
        for _, event in items:
            key = None
            if event.sequence is None and event.patient is not None:
                key = (event.tenant, event.subject or "")
                wanted[key] = wanted.get(key, 0) + 1
            counters.append(key)
        next_number = await self.reserve_many(wanted)
        cid = current_correlation_id()
        now = datetime.now(UTC)
        stored: list[CloudEvent] = []
        rows = []
        for (topic, event), key in zip(items, counters, strict=True):
            updates: dict[str, object] = {}
            if key is not None:
                updates["sequence"] = next_number[key]
                next_number[key] += 1
            if event.correlationid is None and cid:
                updates["correlationid"] = cid
            payload = event.to_json(updates)
            if len(payload) > MAX_EVENT_BYTES:
                raise EventTooLarge(
                    f"{event.type}: {len(payload):,} bytes of JSON, over the {MAX_EVENT_BYTES:,} "
                    "an event may have on Kafka; nothing was written")
            if events:
                stored.append(event if not updates else event.model_copy(update=updates)
                              if isinstance(event, CloudEvent) else replace(event, **updates))
            rows.append(
                {
                    "event_id": event.id,
                    "tenant": event.tenant,
                    "topic": topic,
                    "key": event.kafka_key(),
                    "event_type": event.type,
                    "payload": payload.decode(),
                    "correlation_id": updates.get("correlationid", event.correlationid),
                    "created_at": now,
                }
            )
        return stored, rows

    async def reserve_many(self, wanted: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
        """``reserve_sequences`` for many (tenant, subject) counters: the first reserved number
        of each. Upserted in sorted order, so writers touching the same patients lock their
        counters in the same order (no deadlock)."""
        keys = sorted(wanted)
        if not keys:
            return {}
        if self.session.bind.dialect.name == "postgresql":
            # One statement whatever the number of counters: three array parameters.
            conn = await self.session.connection()
            table = qualified(schema_of(conn), sequences_table.name)
            rows = (await conn.exec_driver_sql(
                f"INSERT INTO {table} AS s (tenant, subject, last) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) "
                "ON CONFLICT (tenant, subject) DO UPDATE SET last = s.last + excluded.last "
                "RETURNING s.tenant, s.subject, s.last",
                ([t for t, _ in keys], [s for _, s in keys], [wanted[k] for k in keys]))).all()
        else:
            stmt = sqlite.insert(sequences_table).values(
                [{"tenant": t, "subject": s, "last": wanted[(t, s)]} for t, s in keys])
            stmt = stmt.on_conflict_do_update(
                index_elements=["tenant", "subject"],
                set_={"last": sequences_table.c["last"] + stmt.excluded["last"]},
            ).returning(sequences_table.c.tenant, sequences_table.c.subject,
                        sequences_table.c["last"])
            rows = (await self.session.execute(stmt)).all()
        return {(t, s): last - wanted[(t, s)] + 1 for t, s, last in rows}


# How often the active relay checks that its session still holds the relay's lock.
LEADERSHIP_CHECK_SECONDS = 5.0


class LeadershipLost(RuntimeError):
    """The relay's lock session ended: it stops publishing (and is started again)."""


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    failures: int = 0


def _row_to_message(row) -> Message:  # noqa: ANN001
    return Message(
        topic=row.topic,
        key=row.key.encode() if row.key is not None else None,
        value=row.payload.encode(),
        headers=routing_headers(row.event_type, row.tenant, row.correlation_id),
    )


class OutboxRelay:
    """Publishes a service's outbox to the transport, in id order, surviving broker outages.

    With several replicas, a PostgreSQL advisory lock elects one active relay per schema so that
    per-key order holds; the others wait and take over if it dies.
    """

    def __init__(
        self,
        db: Database,
        transport: Transport,
        *,
        batch_size: int = 1000,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        poll_interval: float = 0.2,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        service: str | None = None,
    ) -> None:
        self.db = db
        self.transport = transport
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.service = service or db.schema
        self.stats = RelayStats()
        # On PostgreSQL the relay's reads and its marking are single statements in autocommit
        # mode: no BEGIN, ROLLBACK or COMMIT round trips around them (each round trip costs
        # the relay process ~50 µs of CPU, and a pass made eight of them); not behind a
        # transaction-mode pooler (``db.autocommit_engine``).
        self._autocommit = autocommit_engine(db.engine)
        self.last_success: float | None = None
        self._stopping = asyncio.Event()
        self._wakeup = asyncio.Event()

    def notify(self) -> None:
        """Wake the relay now (called after a local commit that wrote outbox rows)."""
        self._wakeup.set()

    async def backlog(self) -> int:
        async with self.db.engine.connect() as conn:
            stmt = (
                select(func.count())
                .select_from(outbox_table)
                .where(outbox_table.c.sent_at.is_(None))
            )
            return (await conn.execute(stmt)).scalar_one()

    async def _fetch(self, after_id: int | None) -> list:
        """The next batch: the first unsent rows in id order (after ``after_id``), at most
        ``batch_size`` of them and no more than ``max_batch_bytes`` of payload (the first row
        always, however large). Each row also says how many rows the count alone allowed
        (``fetched``), so ``_more`` knows whether the outbox may hold more. One statement: the
        byte bound is a running sum over the counted rows, computed by the database."""
        counted = (
            select(
                outbox_table.c.id,
                outbox_table.c.topic,
                outbox_table.c.key,
                outbox_table.c.payload,
                outbox_table.c.event_type,
                outbox_table.c.tenant,
                outbox_table.c.correlation_id,
            )
            .where(outbox_table.c.sent_at.is_(None))
            .order_by(outbox_table.c.id)
            .limit(self.batch_size)
        )
        if after_id is not None:
            counted = counted.where(outbox_table.c.id > after_id)
        counted = counted.subquery("counted")
        size = (func.octet_length(counted.c.payload) if self.db.is_postgres
                else func.length(cast(counted.c.payload, LargeBinary)))  # bytes, not characters
        sized = select(
            *counted.c,
            func.sum(size).over(order_by=counted.c.id).label("upto"),
            func.row_number().over(order_by=counted.c.id).label("position"),
            func.count().over().label("fetched"),
        ).subquery("sized")
        # A prefix of the counted rows (the running sum only grows): nothing is skipped.
        stmt = (
            select(*(c for c in sized.c if c.name not in ("upto", "position")))
            .where(or_(sized.c.upto <= self.max_batch_bytes, sized.c.position == 1))
            .order_by(sized.c.id)
        )
        if self._autocommit is not None:  # no transaction at all
            async with self._autocommit.connect() as conn:
                return (await conn.execute(stmt)).all()
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
            await conn.rollback()  # no transaction stays open while we talk to Kafka
        return rows

    async def _mark_sent(self, ids: list[int]) -> None:
        # One array parameter on PostgreSQL instead of a thousand bound values.
        where = (
            outbox_table.c.id == any_(cast(ids, ARRAY(BigInteger)))
            if self.db.is_postgres
            else outbox_table.c.id.in_(ids)
        )
        stmt = update(outbox_table).where(where).values(sent_at=datetime.now(UTC))
        if self._autocommit is not None:  # one statement: atomic, and committed, on its own
            async with self._autocommit.connect() as conn:
                await conn.execute(stmt)
            return
        async with self.db.engine.begin() as conn:
            await conn.execute(stmt)

    def _more(self, rows: list) -> bool:
        """Whether the outbox may hold unsent rows after this batch: it was cut by its count or
        by its bytes."""
        return rows[0].fetched == self.batch_size or len(rows) < rows[0].fetched

    async def publish_pass(self) -> int:
        """Publish everything unsent right now; return how many events were published.

        Pipelined: while batch N is being acknowledged, batch N+1 is read and batch N-1 marked
        sent. Batch N+1 is only sent after all of batch N is acknowledged, so order per key holds.
        A row that commits late with a lower id than the pass has reached is picked up by the
        next pass, which starts again from the lowest unsent id.
        """
        total = 0
        marking: asyncio.Task | None = None
        rows = await self._fetch(None)
        try:
            while rows:
                following = (
                    asyncio.create_task(self._fetch(rows[-1].id))
                    if self._more(rows)
                    else None
                )
                try:
                    await self.transport.send_batch([_row_to_message(r) for r in rows])
                except BaseException:
                    if following is not None:
                        following.cancel()
                    raise
                if marking is not None:
                    await marking
                marking = asyncio.create_task(self._mark_sent([r.id for r in rows]))
                total += len(rows)
                self.stats.published += len(rows)
                self.stats.batches += 1
                metrics.outbox_published.labels(self.service).inc(len(rows))
                rows = await following if following is not None else []
        finally:
            if marking is not None:
                await marking
        return total

    async def drain(self) -> int:
        """Publish until the outbox is empty (tests and the embedded mode use it)."""
        total = 0
        while n := await self.publish_pass():
            total += n
        return total

    def _leadership_key(self) -> int:
        return zlib.crc32(f"ccm-outbox-relay:{self.db.schema}".encode())

    async def _hold_leadership(self, conn: AsyncConnection) -> None:
        key = self._leadership_key()
        while not self._stopping.is_set():
            got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar()
            await conn.commit()
            if got:
                log.info("outbox relay is the active replica", service=self.service)
                return
            await self._sleep(2.0)

    async def _sleep(self, seconds: float) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _still_leader(self, conn: AsyncConnection) -> None:
        """Raise ``LeadershipLost`` unless the session holding the relay's lock still holds it
        (a database restart or failover ends the session, and its lock with it: another
        replica may be the active one by now)."""
        try:
            held = (await conn.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = :k"),
                {"k": self._leadership_key()})).scalar()
            await conn.commit()
        except Exception as exc:  # noqa: BLE001 - the session is gone, and its lock with it
            raise LeadershipLost(f"the session holding the relay's lock failed: "
                                 f"{type(exc).__name__}") from exc
        if not held:
            raise LeadershipLost("the relay's lock is no longer held by its session")

    async def run(self) -> None:
        """Relay until ``stop()``; errors back off exponentially and never lose an event.

        On PostgreSQL one replica per service publishes: the one holding an advisory lock on a
        session of its own. It checks every ``LEADERSHIP_CHECK_SECONDS`` that the session still
        holds it, and raises ``LeadershipLost`` when not (the service's supervisor starts the
        relay again, which waits for the lock anew), so after a failover two replicas publish
        for at most that long (consumers' inboxes drop what both sent)."""
        lock_conn: AsyncConnection | None = None
        loop = asyncio.get_running_loop()
        delay = self.backoff_initial
        try:
            if self.db.is_postgres:
                lock_conn = await self.db.engine.connect()
                await self._hold_leadership(lock_conn)
            checked = loop.time()
            while not self._stopping.is_set():
                if lock_conn is not None and loop.time() - checked >= LEADERSHIP_CHECK_SECONDS:
                    await self._still_leader(lock_conn)  # raises out of run() when lost
                    checked = loop.time()
                try:
                    published = await self.publish_pass()
                    self.last_success = asyncio.get_running_loop().time()
                    delay = self.backoff_initial
                    # The backlog gauge is counted when /metrics is scraped
                    # (ServiceRuntime.refresh_metrics), not after every pass.
                    if not published:
                        await self._sleep(self.poll_interval)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure: retry, never drop
                    self.stats.failures += 1
                    metrics.outbox_failures.labels(self.service).inc()
                    log.warning(
                        "outbox publish failed; retrying",
                        service=self.service,
                        error=type(exc).__name__,
                        detail=loggable(exc, 200),
                        retry_in=delay,
                    )
                    await self._sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
        finally:
            if lock_conn is not None:
                try:
                    await lock_conn.close()
                except Exception:  # noqa: BLE001 - a dead session: nothing to give back
                    log.info("the relay's lock session was already gone", service=self.service)

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()
