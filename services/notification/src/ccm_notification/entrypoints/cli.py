"""``ccm notification …`` subcommands."""

from __future__ import annotations

import typer

from ccm_notification.domain.kinds import KINDS

cli = typer.Typer(help="Notification service: templates, webhook signatures.", no_args_is_help=True)


@cli.command("kinds")
def list_kinds() -> None:
    """List notification kinds, the template fields each needs, and time-sensitive defaults."""
    for kind in KINDS.values():
        optional = f" [optional: {', '.join(kind.optional)}]" if kind.optional else ""
        ack = " (acknowledgement by default)" if kind.time_sensitive else ""
        typer.echo(f"{kind.name}: {', '.join(kind.required)}{optional}{ack}")


@cli.command("template")
def show_template(
    kind: str = typer.Argument(..., help="A kind from `ccm notification kinds`"),
) -> None:
    """Print the default template of a kind (start of a practice override)."""
    from ccm_notification.adapters.rendering import default_source

    if kind not in KINDS:
        typer.secho(f"unknown kind {kind!r}; see `ccm notification kinds`", err=True, fg="red")
        raise typer.Exit(2)
    typer.echo(default_source(kind))


@cli.command("webhook-secret")
def show_webhook_secret(practice: str = typer.Argument(..., help="Practice id")) -> None:
    """Print a practice's webhook signing secret (derived from CCM_SECRET_KEY)."""
    from ccm_notification.domain.signing import webhook_secret
    from ccm_shared.settings import get_settings

    typer.echo(webhook_secret(get_settings().secret_key, practice))
