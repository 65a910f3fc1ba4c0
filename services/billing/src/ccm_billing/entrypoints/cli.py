"""``ccm billing …`` commands."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

app = typer.Typer(help="CMS CCM billing: close months, run the scheduler or the decider once.", no_args_is_help=True)


def _runtime():  # noqa: ANN202
    from ccm_billing.bootstrap import SERVICE
    from ccm_shared.service import ServiceRuntime
    from ccm_shared.settings import load_settings

    settings = load_settings()
    if not settings.database_url:
        typer.secho("error: CCM_DATABASE_URL is not set", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    from ccm_shared.transport import InProcessTransport

    # Events go to the outbox; the running billing service's relay publishes them.
    return ServiceRuntime.build(SERVICE, settings, transport=InProcessTransport())


@app.command()
def close(
    practice: Annotated[str, typer.Option(help="Practice id")],
    month: Annotated[str, typer.Option(help="Month to close, yyyy-mm (the practice's local month)")],
) -> None:
    """Close a practice's month: lock its time, issue ChargeItems and the Invoice (idempotent)."""
    from ccm_billing.domain.model import Month
    from ccm_billing.service_layer.invoicing import close_period
    from ccm_shared.errors import AppError

    try:
        mo = Month.parse(month)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None

    async def run() -> dict:
        runtime = _runtime()
        try:
            async with runtime.db.unit_of_work() as uow:
                result = await close_period(uow, practice, mo, runtime.clock())
                await uow.commit()
            return result
        finally:
            await runtime.db.dispose()

    try:
        result = asyncio.run(run())
    except AppError as exc:
        typer.secho(f"error: {exc.detail}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result, indent=2))


def _once(job) -> None:  # noqa: ANN001
    async def run() -> dict:
        runtime = _runtime()
        try:
            return await job(runtime)
        finally:
            await runtime.db.dispose()

    typer.echo(json.dumps(asyncio.run(run())))


@app.command("run-scheduler")
def run_scheduler() -> None:
    """Send due threshold alerts and flag overdue invoices once, then exit."""
    from ccm_billing.entrypoints.jobs import run_once

    _once(run_once)


@app.command("decide")
def decide() -> None:
    """Bring the decisions of every practice's open months up to date once (what the service's
    decider does every CCM_BILLING_DECIDE_INTERVAL_SECONDS), then exit; prints the counts."""
    from ccm_billing.entrypoints.jobs import decide_open_months

    _once(decide_open_months)
