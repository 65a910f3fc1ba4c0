"""Consumers and background jobs of the careplan service."""

from __future__ import annotations

from ccm_careplan.service_layer.scheduler import run_scheduler
from ccm_careplan.service_layer.tracking import CONSUMED_TOPICS, make_handler
from ccm_shared.service import BackgroundJob, ConsumerSpec

CONSUMER_GROUP = "careplan-tracker"


def consumers(runtime) -> list[ConsumerSpec]:  # noqa: ANN001
    return [ConsumerSpec(CONSUMER_GROUP, CONSUMED_TOPICS, make_handler(runtime.clock))]


def background(runtime) -> list[BackgroundJob]:  # noqa: ANN001
    settings = runtime.service_settings()
    if not settings.scheduler_enabled:
        return []

    async def run(stopping) -> None:  # noqa: ANN001
        await run_scheduler(
            runtime.db, runtime.clock, stopping,
            interval=settings.scheduler_interval_seconds,
            batch_size=settings.scheduler_batch_size,
            on_sent=runtime.relay.notify if runtime.relay is not None else None,
        )

    return [BackgroundJob("review-scheduler", run)]
