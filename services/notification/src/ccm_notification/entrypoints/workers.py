"""Consumers and background jobs of the notification service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import structlog
from sqlalchemy import select

from ccm_notification.adapters.channels import EmailChannel, FhirChannel, WebhookChannel
from ccm_notification.config import NotificationSettings
from ccm_notification.service_layer import acks
from ccm_notification.service_layer.dispatch import Dispatcher
from ccm_notification.service_layer.handlers import (
    ALERT_TOPICS,
    DIRECTORY_TOPICS,
    alerts_handler,
    directory_handler,
    release_held,
)
from ccm_notification.service_layer.notify import Notifier
from ccm_notification.subscriptions.domain import FEED_TYPES
from ccm_notification.subscriptions.retention import run_subscription_retention
from ccm_notification.subscriptions.service import (
    SubscriptionDeliverer,
    feed_handler,
    feed_topics,
    release_waiting,
)
from ccm_notification.subscriptions.topics import PracticeTopics
from ccm_shared.outbound import outbound_client
from ccm_shared.service import BackgroundJob, ConsumerSpec, ServiceRuntime, sleep_unless_stopped
from ccm_shared.tables import practices

log = structlog.get_logger(__name__)


def notifier_of(runtime: ServiceRuntime) -> Notifier:
    """The runtime's Notifier, built on first use (nothing is created at import time)."""
    if "notifier" not in runtime.state:
        settings = runtime.service_settings()
        assert isinstance(settings, NotificationSettings)
        runtime.state["notifier"] = Notifier(
            settings, runtime.settings.secret_key, lambda: runtime.clock()
        )
    return runtime.state["notifier"]


def http_client_of(runtime: ServiceRuntime) -> httpx.AsyncClient:
    """One HTTP client for every outgoing webhook and FHIR request (closed with the dispatcher)."""
    if "http_client" not in runtime.state:
        runtime.state["http_client"] = outbound_client(
            allow_private=runtime.settings.outbound_private_allowed, follow_redirects=False)
    return runtime.state["http_client"]


def dispatcher_of(runtime: ServiceRuntime) -> Dispatcher:
    if "dispatcher" not in runtime.state:
        notifier = notifier_of(runtime)
        client = http_client_of(runtime)
        runtime.state["dispatcher"] = Dispatcher(
            runtime.db,
            notifier,
            {
                "email": EmailChannel(notifier.settings),
                "webhook": WebhookChannel(
                    notifier.settings, notifier.secret_key, notifier.clock, client
                ),
                "fhir": FhirChannel(notifier.settings, notifier.clock, client),
            },
        )
    return runtime.state["dispatcher"]


def deliverer_of(runtime: ServiceRuntime) -> SubscriptionDeliverer:
    """Delivers practice subscriptions' webhooks (same client, backoff and signature scheme)."""
    if "subscription_deliverer" not in runtime.state:
        notifier = notifier_of(runtime)
        runtime.state["subscription_deliverer"] = SubscriptionDeliverer(
            runtime.db, notifier.settings, notifier.secret_key, notifier.clock,
            http_client_of(runtime), notifier,
        )
    return runtime.state["subscription_deliverer"]


def practice_topics_of(runtime: ServiceRuntime) -> PracticeTopics:
    if "practice_topics" not in runtime.state:
        s = notifier_of(runtime).settings
        runtime.state["practice_topics"] = PracticeTopics(
            runtime.transport,
            partitions=s.practice_topic_partitions,
            replication=s.practice_topic_replication,
        )
    return runtime.state["practice_topics"]


async def ensure_all_practice_topics(runtime: ServiceRuntime) -> int:
    """Create the topics of every registered practice (new practices get theirs within the
    refresh interval, before their first event)."""
    async with runtime.db.engine.connect() as conn:
        ids = [r.id for r in (await conn.execute(select(practices.c.id))).all()]
    await practice_topics_of(runtime).ensure(ids)
    return 0  # never "busy": the job sleeps its interval


def consumers(runtime: ServiceRuntime) -> list[ConsumerSpec]:
    return [
        ConsumerSpec(
            "notification-directory",
            DIRECTORY_TOPICS,
            directory_handler(lambda: runtime.clock(), notifier_of(runtime)),
        ),
        ConsumerSpec("notification-alerts", ALERT_TOPICS, alerts_handler(notifier_of(runtime))),
        ConsumerSpec(
            "notification-practice-feed",
            FEED_TYPES,
            feed_handler(
                lambda: runtime.clock(), notifier_of(runtime).settings.practice_feed_hold_seconds
            ),
            prepare=feed_topics(practice_topics_of(runtime), runtime.db),
        ),
    ]


def _every(name: str, interval: float, step: Callable[[], Awaitable[int]]):  # noqa: ANN202
    async def run(stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                busy = await step()
            except Exception as exc:  # noqa: BLE001 - keep the job alive; the row is retried
                log.warning("job pass failed", job=name, error=type(exc).__name__)
                busy = 0
            if not busy:
                await sleep_unless_stopped(stopping, interval)

    return run


async def sweep_and_release(runtime: ServiceRuntime, notifier: Notifier) -> int:
    """The acknowledgement sweep, then the held messages whose recipient can now be found
    (care-plan reviews, practice-level messages: contacts and directory changes release them
    at once; this catches the rest)."""
    moved = await acks.sweep(runtime.db, notifier)
    async with runtime.db.unit_of_work() as uow:
        released = await release_held(notifier, uow)
        await uow.commit()
    return moved + released


def background(runtime: ServiceRuntime) -> list[BackgroundJob]:
    notifier = notifier_of(runtime)
    dispatcher = dispatcher_of(runtime)
    deliverer = deliverer_of(runtime)

    async def dispatch_pass() -> int:
        return await dispatcher.run_once() + await deliverer.run_once()

    async def dispatch_and_close(stopping: asyncio.Event) -> None:
        try:
            await _every(
                "dispatch", notifier.settings.dispatch_interval_seconds, dispatch_pass
            )(stopping)
        finally:
            await runtime.state.pop("http_client").aclose()
            runtime.state.pop("dispatcher", None)
            runtime.state.pop("subscription_deliverer", None)

    jobs = [
        BackgroundJob("notification-dispatcher", dispatch_and_close),
        BackgroundJob(
            "notification-ack-sweeper",
            _every(
                "ack-sweep",
                notifier.settings.ack_sweep_interval_seconds,
                lambda: sweep_and_release(runtime, notifier),
            ),
        ),
        BackgroundJob(
            "notification-practice-feed-order",
            _every(
                "practice-feed-order",
                notifier.settings.dispatch_interval_seconds,
                lambda: release_waiting(
                    runtime.db, notifier.clock, notifier.settings.practice_feed_hold_seconds
                ),
            ),
        ),
    ]
    if notifier.settings.subscription_retention_days > 0:
        jobs.append(
            BackgroundJob(
                "notification-subscription-retention",
                lambda stopping: run_subscription_retention(
                    runtime.db, stopping, days=notifier.settings.subscription_retention_days,
                    clock=notifier.clock),
            )
        )
    if notifier.settings.practice_topic_refresh_seconds > 0:
        jobs.append(
            BackgroundJob(
                "notification-practice-topics",
                _every(
                    "practice-topics",
                    notifier.settings.practice_topic_refresh_seconds,
                    lambda: ensure_all_practice_topics(runtime),
                ),
            )
        )
    return jobs
