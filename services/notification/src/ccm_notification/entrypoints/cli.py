"""``ccm notification …`` subcommands."""

from __future__ import annotations

from typing import Annotated

import typer

from ccm_notification.domain.kinds import KINDS

cli = typer.Typer(
    help="Notification service: templates, webhook signatures, per-practice topics.",
    no_args_is_help=True,
)


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


@cli.command("practice-topics")
def create_practice_topics(
    practices: Annotated[list[str], typer.Argument(help="Practice ids whose topics to create")],
) -> None:
    """Create a practice's Kafka topics (ccm.practice.<id>.<event type>) now, e.g. when its
    KafkaUser is created, so its system can subscribe before the first event."""
    import asyncio

    from ccm_notification.config import NotificationSettings
    from ccm_notification.subscriptions.domain import UnsafeTenant, target_practice
    from ccm_notification.subscriptions.topics import PracticeTopics, topics_of
    from ccm_shared.service import build_transport
    from ccm_shared.settings import get_settings

    try:
        ids = [target_practice(p) for p in practices]
    except UnsafeTenant:
        typer.secho("practice ids are lowercase letters, digits and '-'", err=True, fg="red")
        raise typer.Exit(2) from None
    settings = get_settings()
    if not settings.kafka_bootstrap_servers:
        typer.secho("CCM_KAFKA_BOOTSTRAP_SERVERS is not set", err=True, fg="red")
        raise typer.Exit(2)
    own = NotificationSettings()

    async def run() -> None:
        transport = build_transport(settings)
        topics = PracticeTopics(transport, partitions=own.practice_topic_partitions,
                                replication=own.practice_topic_replication)
        await topics.ensure(ids)

    asyncio.run(run())
    for p in ids:
        for topic in topics_of(p):
            typer.echo(topic)
