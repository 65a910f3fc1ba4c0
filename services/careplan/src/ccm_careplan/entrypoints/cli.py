"""`ccm careplan …`: operator commands for the review tracker."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated

import typer

app = typer.Typer(help="Care-plan review tracker: scheduler and rules.", no_args_is_help=True)


def _database():  # noqa: ANN202
    from ccm_shared.db import Database
    from ccm_shared.settings import load_settings

    settings = load_settings()
    if not settings.database_url:
        raise typer.BadParameter("set CCM_DATABASE_URL")
    return Database(settings.database_url, schema="careplan", pool_size=2)


@app.command("scheduler-pass")
def scheduler_pass(
    at: Annotated[str | None, typer.Option(
        help="Pretend it is this ISO-8601 instant (e.g. 2027-01-15T09:00:00Z); default: now")]
    = None,
    practice: Annotated[list[str] | None, typer.Option(
        help="Only this practice (repeatable); default: every practice")] = None,
) -> None:
    """Run one scheduler pass now: send every reminder, overdue notice and escalation owed."""
    from ccm_careplan.service_layer.scheduler import run_scheduler_pass

    now = datetime.fromisoformat(at.replace("Z", "+00:00")) if at else datetime.now(UTC)
    if now.tzinfo is None:
        raise typer.BadParameter("--at needs a time zone, e.g. 2027-01-15T09:00:00Z")

    async def run() -> dict:
        db = _database()
        try:
            result = await run_scheduler_pass(db, now, practices=practice or None)
        finally:
            await db.dispose()
        return {"trackers": result.trackers, "sent": result.sent,
                "superseded": result.superseded, "caught_up": result.caught_up,
                "held": result.held}

    typer.echo(json.dumps(asyncio.run(run())))


@app.command("rules")
def show_rules(practice: Annotated[str, typer.Argument(help="Practice id")]) -> None:
    """Print a practice's effective review rules (its own, or the defaults); exit 2 for a
    practice that does not exist."""
    from ccm_careplan.service_layer.common import load_rules
    from ccm_shared.errors import AppError
    from ccm_shared.tenancy import get_practice

    async def run() -> dict:
        db = _database()
        try:
            await get_practice(db.engine, practice)  # not one with the default rules
            async with db.unit_of_work() as uow:
                return (await load_rules(uow.session, practice)).to_dict()
        finally:
            await db.dispose()

    try:
        rules = asyncio.run(run())
    except AppError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(rules, indent=2))
