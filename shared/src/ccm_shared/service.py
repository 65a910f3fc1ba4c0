"""Composition of one service: its definition (what it is) and runtime (what runs).

A service package exposes ``SERVICE: ServiceDefinition`` in its ``bootstrap.py`` and registers it
under the ``ccm.services`` entry-point group; the platform library never imports a service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path

import structlog
from fastapi import APIRouter, FastAPI
from pydantic_settings import BaseSettings
from sqlalchemy import MetaData

from ccm_shared.consumer import ConsumerRuntime, Handler, error_reason
from ccm_shared.db import Database
from ccm_shared.events import CloudEvent
from ccm_shared.outbox import OutboxRelay
from ccm_shared.settings import Settings
from ccm_shared.transport import InProcessTransport, KafkaTransport, Transport

log = structlog.get_logger(__name__)

# A failed background task is started again after this long, doubling while it keeps failing.
TASK_RESTART_INITIAL_SECONDS = 1.0
TASK_RESTART_MAX_SECONDS = 30.0
# /readyz waits at most this long for the database and for Kafka, asked at once (a probe's
# timeout must outwait it: deploy/tools/render.py).
READINESS_PING_SECONDS = 4.0


@dataclass(frozen=True)
class ConsumerSpec:
    """A consumer group: its name (also the inbox key), topics and handler."""

    name: str
    topics: tuple[str, ...]
    handler: Handler
    # Idempotent set-up an event needs outside any database transaction (e.g. creating the
    # Kafka topics its effect will be published on): runs before the event's unit of work.
    prepare: Callable[[CloudEvent], Awaitable[None]] | None = None


@dataclass(frozen=True)
class BackgroundJob:
    """A long-running coroutine started with the service (schedulers, pollers).

    ``run`` must return when ``stopping`` is set; the runtime waits for it on shutdown.
    """

    name: str
    run: Callable[[asyncio.Event], Awaitable[None]]


async def sleep_unless_stopped(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stopping`` is set, whichever comes first; True if stopping."""
    try:
        await asyncio.wait_for(stopping.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def every(stopping: asyncio.Event, interval: float, one_pass: Callable[[], Awaitable[object]],
                *, failed: str, level: str = "error") -> None:
    """Run ``one_pass`` now and then every ``interval`` seconds until ``stopping`` is set. A pass
    that raises is logged (``failed``, with the error's type) and the next one runs as usual: the
    loop of every periodic job (schedulers, the audit sealer, retention)."""
    while not stopping.is_set():
        try:
            await one_pass()
        except Exception as exc:  # noqa: BLE001 - the job lives on; the next pass retries
            getattr(log, level)(failed, error=type(exc).__name__)
        await sleep_unless_stopped(stopping, interval)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service is. Hooks receive the runtime so they can reach its db, transport, clock.

    - ``routers``: its HTTP routes; ``configure_app``: anything else on the FastAPI app (e.g.
      ingest's OperationOutcome error mapping for /fhir).
    - ``consumers``: its consumer groups; ``background``: its schedulers.
    - ``produces``: the topics it publishes (= event types; each has a schema in contracts/);
      ``produces_per_practice``: event types it also publishes to each practice's own topic.
    - ``settings_model``: its own CCM_* settings class, if any (listed by `ccm config`, wired in
      docker-compose and k8s).
    - ``cli``: a Typer app mounted as ``ccm <name> …``.
    """

    name: str
    port: int
    description: str
    metadata: MetaData
    migrations_package: str
    routers: Callable[[ServiceRuntime], Sequence[APIRouter]] = lambda _rt: ()
    consumers: Callable[[ServiceRuntime], Sequence[ConsumerSpec]] = lambda _rt: ()
    background: Callable[[ServiceRuntime], Sequence[BackgroundJob]] = lambda _rt: ()
    configure_app: Callable[[FastAPI, ServiceRuntime], None] | None = None
    produces: tuple[str, ...] = ()
    # Event types also fanned out to per-practice topics (events.practice_topic).
    produces_per_practice: tuple[str, ...] = ()
    settings_model: type[BaseSettings] | None = None
    cli: object | None = None  # typer.Typer; typed loosely so services need not import typer

    @property
    def schema(self) -> str:
        return self.name

    def migrations_dir(self) -> Path:
        return Path(str(resources.files(self.migrations_package)))


def service_names() -> list[str]:
    """The installed services' names, without importing them."""
    return sorted(entry_points(group="ccm.services").names)


def discover_services(only: str | None = None) -> dict[str, ServiceDefinition]:
    """Every installed service, by name, in port order; with ``only``, that one alone, so a
    process serving one service imports no other service's code (for ingest: ~34 MB less
    memory and ~1.5 s less start-up than importing billing's PDF fonts and notification)."""
    found = {}
    for ep in entry_points(group="ccm.services"):
        if only is not None and ep.name != only:
            continue
        definition = ep.load()
        found[definition.name] = definition
    return dict(sorted(found.items(), key=lambda kv: kv[1].port))


def build_transport(settings: Settings) -> Transport:
    """Kafka when configured; else, in the embedded mode (SQLite), the durable embedded log;
    else the in-process bus (one process, nothing survives a restart)."""
    if settings.kafka_bootstrap_servers:
        return KafkaTransport(
            settings.kafka_bootstrap_servers,
            client_id=settings.kafka_client_id_prefix,
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username,
            sasl_password=settings.kafka_sasl_password,
            ssl_cafile=settings.kafka_ssl_cafile,
            compression=settings.kafka_compression,
        )
    if settings.database_url and settings.database_url.startswith("sqlite"):
        from ccm_shared.embedded import EmbeddedLogTransport

        return EmbeddedLogTransport(settings.database_url)
    return InProcessTransport()


@dataclass
class ServiceRuntime:
    """Everything one running service holds: database, transport, relay, consumers, app."""

    definition: ServiceDefinition
    settings: Settings
    transport: Transport
    db: Database
    consumers: list[ConsumerRuntime] = field(default_factory=list)
    relay: OutboxRelay | None = None
    clock: Callable[[], datetime] = utc_now
    state: dict = field(default_factory=dict)  # the service's own long-lived objects
    run_audit_sealer: bool = True  # one per process is enough (see ccm_shared.audit)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Tasks waiting to be started again after a failure: name → the error's type.
    _restarting: dict[str, str] = field(default_factory=dict)
    _uses_broker: bool = False  # this process runs the relay or consumers (not only the API)

    @classmethod
    def build(
        cls,
        definition: ServiceDefinition,
        settings: Settings,
        *,
        transport: Transport | None = None,
        db: Database | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> ServiceRuntime:
        if not settings.database_url:
            raise ValueError("CCM_DATABASE_URL is required")
        runtime = cls(
            definition=definition,
            settings=settings,
            transport=transport or build_transport(settings),
            db=db
            or Database(
                settings.database_url, schema=definition.schema, pool_size=settings.db_pool_size
            ),
            clock=clock or utc_now,
        )
        runtime.relay = OutboxRelay(
            runtime.db,
            runtime.transport,
            batch_size=settings.outbox_batch_size,
            poll_interval=settings.outbox_poll_interval_seconds,
            service=definition.name,
        )
        for spec in definition.consumers(runtime):
            runtime.consumers.append(
                ConsumerRuntime(
                    name=spec.name,
                    topics=spec.topics,
                    handler=spec.handler,
                    prepare=spec.prepare,
                    db=runtime.db,
                    transport=runtime.transport,
                    max_retries=settings.consumer_max_retries,
                    backoff_initial=settings.consumer_retry_backoff_seconds,
                    backoff_max=settings.consumer_retry_backoff_max_seconds,
                    batch_size=settings.consumer_batch_size,
                )
            )
        return runtime

    def app(self, *, operations_only: bool = False) -> FastAPI:
        from ccm_shared.http import create_app

        return create_app(self, operations_only=operations_only)

    def service_settings(self) -> BaseSettings | None:
        """The service's own settings (read once from the environment)."""
        model = self.definition.settings_model
        if model is None:
            return None
        if "settings" not in self.state:
            self.state["settings"] = model()
        return self.state["settings"]

    async def start(
        self, *, consumers: bool = True, relay: bool = True, background: bool = True
    ) -> None:
        """Start the transport and the background tasks (the API is served separately).

        Only a process that runs the relay or consumers starts the broker's transport: the API
        writes its events to the outbox in PostgreSQL, so an API process starts, and stays
        ready, while Kafka is away. Each background task is supervised: one that fails (a
        database or broker outage the task did not ride out itself, a refused topic) is logged
        at once and started again after a backoff, never left dead behind a live process."""
        self._stopping.clear()
        self._uses_broker = bool((relay and self.relay is not None)
                                 or (consumers and self.consumers))
        if self._uses_broker:
            await self.transport.start()
            if self.definition.produces:
                await self.transport.ensure_topics(self.definition.produces)
        if relay and self.relay is not None:
            self._supervise("outbox-relay", self.relay.run)
        if consumers:
            for c in self.consumers:
                self._supervise(f"consumer-{c.name}", c.run)
        if background and self.run_audit_sealer:
            from ccm_shared.audit import run_sealer

            self._supervise("audit-sealer", lambda: run_sealer(self.db.engine, self._stopping))
        if background:
            from ccm_shared.retention import run_retention

            keep = (self.settings.outbox_retention_days, self.settings.inbox_retention_days)
            if any(days > 0 for days in keep):  # both 0: everything is kept, nothing to run
                self._supervise("messaging-retention", lambda: run_retention(
                    self.db, self._stopping, outbox_days=keep[0], inbox_days=keep[1]))
            for job in self.definition.background(self):
                self._supervise(f"job-{job.name}", lambda job=job: job.run(self._stopping))

    def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self._tasks.append(asyncio.create_task(self._supervised(name, run), name=name))

    async def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """``run()`` until the process stops; after a failure, logged when it happens, run
        again: after 1 s, doubling to 30 s while it keeps failing within 30 s of starting."""
        loop = asyncio.get_running_loop()
        delay = TASK_RESTART_INITIAL_SECONDS
        while not self._stopping.is_set():
            started = loop.time()
            try:
                await run()
                return  # it ends when the process stops
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged, and the task started again
                if self._stopping.is_set():
                    log.warning("background task failed while stopping", task=name,
                                error=type(exc).__name__)
                    return
                if loop.time() - started > TASK_RESTART_MAX_SECONDS:
                    delay = TASK_RESTART_INITIAL_SECONDS  # it had been running: a new outage
                self._restarting[name] = type(exc).__name__
                log.error("background task failed; starting it again", task=name,
                          error=type(exc).__name__, reason=error_reason(exc), retry_in=delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, TASK_RESTART_MAX_SECONDS)
                self._restarting.pop(name, None)

    async def stop(self) -> None:
        self._stopping.set()
        if self.relay is not None:
            self.relay.stop()
        for c in self.consumers:
            c.stop()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception as exc:  # noqa: BLE001 - report, keep shutting down
                log.error("background task failed", task=task.get_name(), error=repr(exc))
        self._tasks.clear()
        await self.transport.stop()
        await self.db.dispose()

    def failed_tasks(self) -> list[str]:
        return [t.get_name() for t in self._tasks if t.done() and not t.cancelled()]

    async def readiness(self) -> dict[str, str]:
        # The database and Kafka are asked at once, each for at most READINESS_PING_SECONDS:
        # one after the other they took up to twice that, past the probe's timeout.
        pings = {"database": self.db.ping}
        ping = getattr(self.transport, "ping", None) if self._uses_broker else None
        if ping is not None:
            pings["kafka"] = ping
        answers = await asyncio.gather(*(
            asyncio.wait_for(check(), timeout=READINESS_PING_SECONDS) for check in pings.values()
        ), return_exceptions=True)
        checks: dict[str, str] = {
            name: "ok" if not isinstance(answer, BaseException)
            else f"unavailable: {type(answer).__name__}"
            for name, answer in zip(pings, answers, strict=True)}
        now = asyncio.get_running_loop().time()
        running = {t.get_name() for t in self._tasks}
        for c in self.consumers:
            if f"consumer-{c.name}" not in running:
                continue  # not run by this process (an API-only one)
            stalled = c.is_stalled(now, self.settings.consumer_stall_seconds)
            checks[f"consumer:{c.name}"] = "stalled" if stalled else "ok"
        for name, error in self._restarting.items():
            checks[name] = f"restarting after {error}"
        for name in self.failed_tasks():
            checks[name] = "stopped"
        return checks

    async def refresh_metrics(self) -> None:
        from ccm_shared.observability import metrics

        if self.relay is not None:
            try:
                metrics.outbox_backlog.labels(self.definition.name).set(await self.relay.backlog())
            except Exception:  # noqa: BLE001 - metrics never fail the scrape
                pass
        for c in self.consumers:
            try:
                await c.update_lag()
            except Exception:  # noqa: BLE001
                pass
