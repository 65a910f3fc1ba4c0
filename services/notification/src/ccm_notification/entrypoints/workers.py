"""Consumers and background jobs of the notification service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import structlog

from ccm_notification.adapters.channels import EmailChannel, FhirChannel, WebhookChannel
from ccm_notification.config import NotificationSettings
from ccm_notification.service_layer import acks
from ccm_notification.service_layer.dispatch import Dispatcher
from ccm_notification.service_layer.handlers import (
    ALERT_TOPICS,
    DIRECTORY_TOPICS,
    alerts_handler,
    directory_handler,
)
from ccm_notification.service_layer.notify import Notifier
from ccm_shared.service import BackgroundJob, ConsumerSpec, ServiceRuntime

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


def dispatcher_of(runtime: ServiceRuntime) -> Dispatcher:
    if "dispatcher" not in runtime.state:
        notifier = notifier_of(runtime)
        client = httpx.AsyncClient(follow_redirects=False)
        runtime.state["http_client"] = client
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


def consumers(runtime: ServiceRuntime) -> list[ConsumerSpec]:
    return [
        ConsumerSpec(
            "notification-directory", DIRECTORY_TOPICS, directory_handler(lambda: runtime.clock())
        ),
        ConsumerSpec("notification-alerts", ALERT_TOPICS, alerts_handler(notifier_of(runtime))),
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
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=interval)
                except TimeoutError:
                    pass

    return run


def background(runtime: ServiceRuntime) -> list[BackgroundJob]:
    notifier = notifier_of(runtime)
    dispatcher = dispatcher_of(runtime)

    async def dispatch_and_close(stopping: asyncio.Event) -> None:
        try:
            await _every(
                "dispatch", notifier.settings.dispatch_interval_seconds, dispatcher.run_once
            )(stopping)
        finally:
            await runtime.state.pop("http_client").aclose()
            runtime.state.pop("dispatcher", None)

    return [
        BackgroundJob("notification-dispatcher", dispatch_and_close),
        BackgroundJob(
            "notification-ack-sweeper",
            _every(
                "ack-sweep",
                notifier.settings.ack_sweep_interval_seconds,
                lambda: acks.sweep(runtime.db, notifier),
            ),
        ),
    ]
