"""Scheduled work: mid-month threshold alerts and overdue invoices, per practice."""

from __future__ import annotations

import asyncio

import structlog

from ccm_billing.service_layer.common import all_practices
from ccm_billing.service_layer.ehr import deliver_due
from ccm_billing.service_layer.invoicing import mark_overdue
from ccm_billing.service_layer.worklist import send_threshold_alerts
from ccm_shared.service import BackgroundJob, sleep_unless_stopped

log = structlog.get_logger(__name__)


async def run_once(runtime) -> dict[str, int]:  # noqa: ANN001
    """One pass over every practice, each in its own transaction."""
    settings = runtime.service_settings()
    now = runtime.clock()
    async with runtime.db.unit_of_work() as uow:
        practices = await all_practices(uow.session)
    alerts = overdue = 0
    for info in practices:
        async with runtime.db.unit_of_work() as uow:
            alerts += await send_threshold_alerts(uow, info, now, settings.alert_days)
            overdue += await mark_overdue(uow, info, now)
            await uow.commit()
    return {"alerts": alerts, "overdue": overdue}


def background(runtime) -> list[BackgroundJob]:  # noqa: ANN001
    async def scheduler(stopping: asyncio.Event) -> None:
        interval = runtime.service_settings().scheduler_interval_seconds
        while not stopping.is_set():
            try:
                counts = await run_once(runtime)
                log.info("billing scheduler pass", **counts)
            except Exception as exc:  # noqa: BLE001 - a failed pass is retried next interval
                log.error("billing scheduler pass failed", error=type(exc).__name__)
            await sleep_unless_stopped(stopping, interval)

    async def ehr_push(stopping: asyncio.Event) -> None:
        settings = runtime.service_settings()
        while not stopping.is_set():
            try:
                await deliver_due(
                    runtime.db, runtime.clock(), transport=runtime.state.get("ehr_transport"),
                    max_attempts=settings.ehr_push_max_attempts,
                    backoff=settings.ehr_push_backoff_seconds,
                    backoff_max=settings.ehr_push_backoff_max_seconds,
                    timeout=settings.ehr_push_timeout_seconds,
                )
            except Exception as exc:  # noqa: BLE001 - deliveries stay pending; retried next pass
                log.error("ehr push pass failed", error=type(exc).__name__)
            await sleep_unless_stopped(stopping, settings.ehr_push_interval_seconds)

    return [BackgroundJob("billing-scheduler", scheduler), BackgroundJob("billing-ehr-push", ehr_push)]
