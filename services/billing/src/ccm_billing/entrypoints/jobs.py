"""Scheduled work: mid-month threshold alerts and overdue invoices, per practice; decisions of
open months kept current; EHR pushes."""

from __future__ import annotations

from datetime import timedelta

import structlog
from sqlalchemy.exc import DataError, IntegrityError

from ccm_billing.domain.model import Month
from ccm_billing.domain.rules.ruleset import RulesetMissing
from ccm_billing.service_layer import corrections, decision_cache
from ccm_billing.service_layer.common import all_practices
from ccm_billing.service_layer.ehr import deliver_due
from ccm_billing.service_layer.invoicing import mark_overdue
from ccm_billing.service_layer.worklist import send_threshold_alerts
from ccm_shared.errors import AppError
from ccm_shared.service import BackgroundJob, every

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


async def decide_open_months(runtime) -> dict[str, int]:  # noqa: ANN001
    """Keep the decisions of every practice's open months current (this month and, until it is
    closed, the last), so that a close only files and invoices; drop the cached decisions of other
    months (a month closed later than that decides its patients at close).
    Each practice-month in its own transaction; one being refreshed elsewhere (another replica,
    a close) is skipped; a practice that cannot be priced, or whose rows the database refuses,
    is logged and skipped (its close will say why)."""
    now = runtime.clock()
    async with runtime.db.unit_of_work() as uow:
        practices = await all_practices(uow.session)
    decided = failed = 0
    for info in practices:
        d, f = await decide_practice(runtime.db, info, now)
        decided, failed = decided + d, failed + f
    return {"decided": decided, "failed": failed}


async def decide_practice(db, info, now) -> tuple[int, int]:  # noqa: ANN001
    """``decide_open_months`` for one practice: (patients decided, months that failed)."""
    this = Month.of(info.today(now))
    months = [str(Month.of(this.first_day - timedelta(days=1))), str(this)]
    async with db.unit_of_work() as uow:
        months = [m for m in months if not await corrections.is_closed(uow.session, info.id, m)]
        await decision_cache.forget_months_except(uow, info.id, months)
        await uow.commit()
    decided = failed = 0
    for month in months:
        try:
            async with db.unit_of_work() as uow:
                decided += await decision_cache.refresh(uow, info, Month.parse(month), now,
                                                        wait=False)
                await uow.commit()
        except (AppError, RulesetMissing, IntegrityError, DataError) as exc:
            # This practice's data or contract (the database refusing a row is one practice's
            # problem too): the others are still decided. Connection errors end the pass.
            failed += 1
            log.warning("practice-month not decided", practice=info.id, month=month,
                        error=type(exc).__name__)
    return decided, failed


def background(runtime) -> list[BackgroundJob]:  # noqa: ANN001
    settings = runtime.service_settings()

    async def scheduler_pass() -> None:
        log.info("billing scheduler pass", **await run_once(runtime))

    async def ehr_push_pass() -> None:  # a failed pass leaves deliveries pending: retried next
        await deliver_due(
            runtime.db, runtime.clock(), allow_private=runtime.settings.outbound_private_allowed,
            max_attempts=settings.ehr_push_max_attempts,
            backoff=settings.ehr_push_backoff_seconds,
            backoff_max=settings.ehr_push_backoff_max_seconds,
            timeout=settings.ehr_push_timeout_seconds,
        )

    async def decider_pass() -> None:  # a failed pass is no loss: the close decides what is left
        counts = await decide_open_months(runtime)
        if counts["decided"] or counts["failed"]:
            log.info("billing decider pass", **counts)

    def job(name: str, interval: float, one_pass, failed: str) -> BackgroundJob:  # noqa: ANN001
        return BackgroundJob(name, lambda stopping: every(stopping, interval, one_pass,
                                                          failed=failed))

    return [
        job("billing-scheduler", settings.scheduler_interval_seconds, scheduler_pass,
            "billing scheduler pass failed"),
        job("billing-ehr-push", settings.ehr_push_interval_seconds, ehr_push_pass,
            "ehr push pass failed"),
        job("billing-decider", settings.decide_interval_seconds, decider_pass,
            "billing decider pass failed"),
    ]
