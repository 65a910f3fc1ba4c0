"""Consumer runtime: at-least-once delivery made exactly-once in effect by an inbox.

For each message: open a unit of work, insert the inbox row (consumer, event id) — a conflict
means the event was already applied, so the message is skipped — run the handler, commit. Only
after the commit is the Kafka offset committed, and only for partitions still assigned. A handler
that keeps failing is retried with exponential backoff a bounded number of times; then the
message goes to ``<topic>.dlq`` with the error in its headers and the partition moves on.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from pydantic import ValidationError
from sqlalchemy import bindparam

from ccm_shared import audit
from ccm_shared.db import Database, UnitOfWork, described, dialect_insert, loggable
from ccm_shared.event_contracts import contract_violations
from ccm_shared.events import CloudEvent, Message
from ccm_shared.observability import (
    metrics,
    reset_correlation_id,
    set_correlation_id,
)
from ccm_shared.tables import inbox_table
from ccm_shared.transport import MessageSource, Partition, Transport

log = structlog.get_logger(__name__)

Handler = Callable[[CloudEvent, UnitOfWork], Awaitable[None]]
DLQ_SUFFIX = ".dlq"


def is_transient(exc: BaseException) -> bool:
    """Infrastructure trouble (the database, the network or Kafka down or too busy to answer) is
    waited out, never dead-lettered. Kafka's errors are RuntimeErrors, not OSErrors: those it
    calls retriable (a request timed out, a broker not ready or unreachable, no leader yet) are
    transient; a handler that creates topics (notification's practice feed) met them when the
    broker was slow, and its event was dead-lettered after six tries."""
    from aiokafka.errors import KafkaError, KafkaTimeoutError
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, OperationalError | ConnectionError | OSError | TimeoutError
                  | KafkaTimeoutError):
        return True
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def is_sqlite_lock(exc: BaseException) -> bool:
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


class PoisonMessage(Exception):
    """A message that can never be processed (not a CloudEvent, wrong shape, an impossible
    tenant): no retries, straight to the dead-letter topic. Handlers may raise it too; its
    message becomes the ``dlq-reason`` header, so it must name no data of the event (PHI)."""


def error_reason(error: BaseException) -> str:
    """Why an event failed, without its data: the ``dlq-reason`` header (Kafka headers carry no
    PHI) and the consumer's log lines (nor do logs). A PoisonMessage's own words; a validation
    error's places and rules, not its input values; a database error's SQLSTATE (the driver's
    text repeats the value it refused); any other error's type alone (its message may quote
    the event: a date of birth in a ValueError)."""
    if isinstance(error, PoisonMessage):
        return str(error)[:500]
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(event)'}: {e['type']}"
                         for e in error.errors(include_url=False, include_input=False)[:10])[:500]
    return described(error)


@dataclass
class ConsumerHooks:
    """Observation points, used by failure-injection tests and by metrics."""

    after_db_commit: Callable[[Message], Awaitable[None] | None] | None = None


@dataclass
class ConsumerStats:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retries: int = 0
    last_poll: float | None = None
    partitions: set[Partition] = field(default_factory=set)


def message_tenant(message: Message) -> str | None:
    """The practice a message says it is for, without reading its body (which may be no
    event at all): its ``ce_tenant`` header, else its key's ``{tenant}[:{patient}]``; None when
    neither names one. A dead-lettered message's inbox row carries it, so a practice's set-aside
    events can be found."""
    from ccm_shared.tenancy import PRACTICE_ID

    header = message.header("ce_tenant")
    for candidate in (header, (message.key or b"").split(b":", 1)[0]):
        if candidate:
            text = candidate.decode("utf-8", errors="replace")
            if PRACTICE_ID.match(text):
                return text
    return None


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def decode(message: Message) -> CloudEvent:
    """The message's event, its data checked against its contract (``event_contracts``);
    PoisonMessage for one that is no CloudEvent or breaks its contract."""
    try:
        event = CloudEvent.from_json(message.value)
    except (ValidationError, ValueError, UnicodeDecodeError) as exc:
        raise PoisonMessage(f"not a valid CloudEvent: {type(exc).__name__}") from exc
    from ccm_shared.tenancy import PRACTICE_ID

    # What every consumer stores of any event, in its inbox: an id or tenant no row holds
    # failed that insert at every retry, before any handler ran.
    if len(event.id) > _INBOX_EVENT_ID:
        raise PoisonMessage(f"the event id has {len(event.id)} characters; an inbox holds "
                            f"{_INBOX_EVENT_ID} at most")
    if not PRACTICE_ID.match(event.tenant):
        raise PoisonMessage("the event's tenant is no practice id")
    if (broken := contract_violations(event.type, event.data)) is not None:
        raise PoisonMessage(f"{event.type} breaks its contract: {broken}"[:500])
    return event


_INBOX_EVENT_ID = inbox_table.c.event_id.type.length


class ConsumerRuntime:
    """Runs one handler for a consumer group over a set of topics."""

    def __init__(
        self,
        *,
        name: str,
        topics: Sequence[str],
        handler: Handler,
        db: Database,
        transport: Transport,
        max_retries: int = 5,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        poll_timeout: float = 0.5,
        max_records: int = 500,
        batch_size: int = 100,
        hooks: ConsumerHooks | None = None,
        prepare: Callable[[CloudEvent], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.topics = list(topics)
        self.handler = handler
        # Set-up an event needs outside the database transaction (e.g. creating a topic): it
        # runs before the event's unit of work, never inside it; it must be idempotent.
        self.prepare = prepare
        self.db = db
        self.transport = transport
        self.max_retries = max_retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.poll_timeout = poll_timeout
        self.max_records = max_records
        # Many messages per transaction (one savepoint each) on PostgreSQL; SQLite's driver
        # does not do savepoints reliably, and the embedded mode has no volume to batch.
        self.batch_size = max(1, batch_size) if db.is_postgres else 1
        self.hooks = hooks or ConsumerHooks()
        self.stats = ConsumerStats()
        self.source: MessageSource | None = None
        self._stopping = asyncio.Event()
        self._insert = dialect_insert(db.engine.dialect.name)
        # Built once: it runs for every message (constructing it cost more than the round trip).
        self._inbox_insert = (
            self._insert(inbox_table)
            .values({c.name: bindparam(c.name, type_=c.type) for c in inbox_table.c})
            .on_conflict_do_nothing(index_elements=["consumer", "event_id"])
            .returning(inbox_table.c.event_id)
        )

    # -- one message ---------------------------------------------------------------------------

    async def _apply_in(self, uow: UnitOfWork, message: Message, event: CloudEvent,
                        audits: list[audit.AuditRecord]) -> bool:
        """Inbox row and effect in ``uow``; False when already applied. The audit entry is added
        to ``audits``, for the caller to write (``audit.record_many``) before it commits."""
        inserted = await uow.session.execute(self._inbox_insert, {
            "consumer": self.name,
            "event_id": event.id,
            "tenant": event.tenant,
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "outcome": "applied",
            "processed_at": datetime.now(UTC),
        })
        if inserted.first() is None:
            return False
        await self.handler(event, uow)
        if event.patient is not None:  # the system wrote patient data: audit it, atomically
            audits.append(audit.AuditRecord(
                practice=event.tenant,
                service=self.db.schema,
                actor_type="system",
                actor=self.name,
                action="U",
                what=event.type,
                entity=event.subject,
                patient=event.patient,
                correlation_id=event.correlationid,
            ))
        return True

    async def _prepare_batch(
        self, run: list[tuple[Message, CloudEvent]]
    ) -> list[tuple[Message, CloudEvent]]:
        """Run ``prepare`` (outside any transaction) for the batch's events; the batch ends
        before the first event it fails for, which then goes through ``process`` (retries)."""
        if self.prepare is None:
            return run
        for i, (_, event) in enumerate(run):
            try:
                await self.prepare(event)
            except Exception as exc:  # noqa: BLE001 - retried alone by process()
                log.info("prepare failed inside a batch; retrying it alone", consumer=self.name,
                         error=type(exc).__name__, reason=error_reason(exc))
                return run[:i]
        return run

    async def _apply(self, message: Message, event: CloudEvent) -> bool:
        """Apply once in a transaction of its own (after ``prepare``, outside it)."""
        if self.prepare is not None:
            await self.prepare(event)
        async with self.db.unit_of_work() as uow:
            audits: list[audit.AuditRecord] = []
            applied = await self._apply_in(uow, message, event, audits)
            if applied:
                await audit.record_many(uow.session, audits)
                await uow.commit()
        return applied

    async def _apply_batch(self, messages: list[Message]) -> int:
        """Apply a run of one partition's messages in ONE transaction.

        Returns how many from the start were handled. The message at that index, if any,
        failed (or is not a CloudEvent) and must go through ``process`` — retries, dead
        letter — before the ones after it, so order per partition holds.

        The run is first applied without savepoints (two statements fewer per event), its audit
        entries written together before the commit. If an event fails, that transaction is
        rolled back whole and the run applied again with a savepoint per event: the events
        before the failing one commit, and it stops there.
        """
        run: list[tuple[Message, CloudEvent]] = []
        for message in messages:
            try:
                run.append((message, decode(message)))
            except PoisonMessage:
                break  # the run ends before it
        run = await self._prepare_batch(run)
        if len(run) > 1:
            try:
                return await self._commit_run(run, isolate=False)
            except Exception as exc:  # noqa: BLE001 - rolled back: again, one savepoint each
                log.info("event failed inside a batch; applying the batch again, each event in "
                         "a savepoint", consumer=self.name, error=type(exc).__name__,
                         reason=error_reason(exc))
        return await self._commit_run(run, isolate=True)

    async def _commit_run(self, run: list[tuple[Message, CloudEvent]], *, isolate: bool) -> int:
        """Apply ``run`` in one transaction and commit it; how many were handled. Without
        ``isolate`` a failing event raises (nothing commits); with it, each event goes in a
        savepoint and the run stops before the first that fails."""
        done: list[tuple[Message, bool]] = []
        handled = len(run)
        audits: list[audit.AuditRecord] = []
        async with self.db.unit_of_work() as uow:
            for i, (message, event) in enumerate(run):
                token = set_correlation_id(event.correlationid)
                try:
                    if not isolate:
                        applied = await self._apply_in(uow, message, event, audits)
                    else:  # an event that fails adds no entry: it fails before adding one
                        async with uow.session.begin_nested():
                            applied = await self._apply_in(uow, message, event, audits)
                except Exception as exc:
                    if not isolate:
                        raise
                    log.info("event failed inside a batch; retrying it alone",
                             consumer=self.name, error=type(exc).__name__,
                             reason=error_reason(exc))
                    handled = i
                    break
                finally:
                    reset_correlation_id(token)
                done.append((message, applied))
            await audit.record_many(uow.session, audits)
            await uow.commit()
        for message, applied in done:
            await self._after_commit(message, applied)
        return handled

    async def _after_commit(self, message: Message, applied: bool) -> None:
        if applied:
            self.stats.applied += 1
            metrics.consumed.labels(self.name, "applied").inc()
        else:
            self.stats.duplicates += 1
            metrics.consumed.labels(self.name, "duplicate").inc()
        if self.hooks.after_db_commit is not None:
            result = self.hooks.after_db_commit(message)
            if asyncio.iscoroutine(result):
                await result

    async def _record_dead_letter(self, message: Message, event_id: str) -> None:
        async with self.db.unit_of_work() as uow:
            await uow.session.execute(
                self._insert(inbox_table)
                .values(
                    consumer=self.name,
                    event_id=event_id,
                    tenant=message_tenant(message),
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    outcome="dead-lettered",
                    processed_at=datetime.now(UTC),
                )
                .on_conflict_do_nothing(index_elements=["consumer", "event_id"])
            )
            await uow.commit()

    async def _dead_letter(self, message: Message, error: BaseException, attempts: int) -> None:
        headers = tuple((k, v) for k, v in message.headers if not k.startswith("dlq-")) + (
            ("dlq-error", type(error).__name__.encode()),
            ("dlq-reason", error_reason(error).encode()),
            ("dlq-consumer", self.name.encode()),
            ("dlq-source", f"{message.topic}/{message.partition}/{message.offset}".encode()),
            ("dlq-attempts", str(attempts).encode()),
        )
        dead = Message(
            topic=dlq_topic(message.topic), key=message.key, value=message.value, headers=headers
        )
        delay = self.backoff_initial
        while True:  # the DLQ write must succeed before the offset may move past the message
            try:
                await self.transport.send_batch([dead])
                break
            except Exception as exc:  # noqa: BLE001
                log.warning("dead-letter publish failed; retrying", error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
        event_id = f"dlq:{message.topic}/{message.partition}/{message.offset}"
        await self._record_dead_letter(message, event_id)
        self.stats.dead_lettered += 1
        metrics.dlq.labels(self.name, message.topic).inc()
        metrics.consumed.labels(self.name, "dead-lettered").inc()
        log.error(
            "event sent to dead-letter topic",
            consumer=self.name,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            error=type(error).__name__,
            attempts=attempts,
        )

    async def process(self, message: Message) -> None:
        """Apply one message exactly once in effect, or dead-letter it."""
        try:
            event = decode(message)
        except PoisonMessage as exc:
            await self._dead_letter(message, exc, attempts=1)
            return
        token = set_correlation_id(event.correlationid)
        try:
            delay = self.backoff_initial
            failures = 0
            while True:
                try:
                    applied = await self._apply(message, event)
                except PoisonMessage as exc:  # the handler says it can never succeed
                    await self._dead_letter(message, exc, attempts=1)
                    return
                except Exception as exc:  # noqa: BLE001 - handler errors are retried, then DLQ
                    if is_transient(exc):
                        lock = is_sqlite_lock(exc)
                        if not lock:
                            log.warning(
                                "infrastructure unavailable; waiting",
                                consumer=self.name,
                                error=type(exc).__name__,
                                detail=loggable(exc),
                            )
                        # Embedded mode: another writer holds SQLite's lock (or committed after
                        # our read began); try again shortly, with jitter so writers interleave.
                        await asyncio.sleep(random.uniform(0.02, 0.3) if lock else self.backoff_max)
                        continue
                    failures += 1
                    if failures > self.max_retries:
                        await self._dead_letter(message, exc, attempts=failures)
                        return
                    self.stats.retries += 1
                    log.warning(
                        "handler failed; retrying",
                        consumer=self.name,
                        event_type=event.type,
                        event_id=event.id,
                        attempt=failures,
                        error=type(exc).__name__,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                await self._after_commit(message, applied)
                return
        finally:
            reset_correlation_id(token)

    # -- the loop ------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Poll once, process what came, commit offsets after the effects. Return the count."""
        assert self.source is not None
        batches = await self.source.poll(self.poll_timeout, self.max_records)
        self.stats.last_poll = asyncio.get_running_loop().time()
        count = 0
        for partition, messages in batches.items():
            i = 0
            while i < len(messages):
                chunk = messages[i : i + self.batch_size]
                handled = 0
                if len(chunk) > 1:
                    try:
                        handled = await self._apply_batch(chunk)
                    except Exception as exc:  # noqa: BLE001 - e.g. the commit failed: go one by one
                        log.warning("batch failed; applying one by one", error=type(exc).__name__)
                i += handled
                if handled < len(chunk):
                    await self.process(messages[i])
                    i += 1
            count += len(messages)
            await self.source.commit({partition: messages[-1].offset + 1})
        return count

    async def start(self) -> None:
        # The dead-letter topics too: auto-created by a broker, they would take its defaults
        # (1 MB), and a large poison message could then never be set aside.
        await self.transport.ensure_topics([*self.topics, *map(dlq_topic, self.topics)])
        self.source = self.transport.source(self.topics, self.name)
        await self.source.start()

    async def stop_source(self) -> None:
        if self.source is not None:
            await self.source.stop()
            self.source = None

    async def update_lag(self) -> None:
        if self.source is None:
            return
        for p, lag in (await self.source.lag()).items():
            metrics.consumer_lag.labels(self.name, p.topic, str(p.partition)).set(lag)

    async def run(self) -> None:
        """Consume until ``stop()``; a lost broker connection is retried, never fatal."""
        await self.start()
        lag_every = 0
        try:
            while not self._stopping.is_set():
                await self.run_once()
                lag_every += 1
                if lag_every % 20 == 0:
                    await self.update_lag()
        finally:
            await self.stop_source()

    def stop(self) -> None:
        self._stopping.set()

    def is_stalled(self, now: float, stall_seconds: float) -> bool:
        return self.stats.last_poll is not None and now - self.stats.last_poll > stall_seconds
