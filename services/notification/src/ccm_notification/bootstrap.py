"""Composition root of the notification service (the `ccm.services` entry point)."""

from ccm_notification.adapters.orm import metadata
from ccm_notification.config import NotificationSettings
from ccm_notification.entrypoints.api import build_router
from ccm_notification.entrypoints.cli import cli
from ccm_notification.entrypoints.workers import background, consumers, notifier_of
from ccm_notification.service_layer.notify import ACKNOWLEDGED, FAILED
from ccm_notification.subscriptions.api import build_subscriptions_router
from ccm_notification.subscriptions.domain import FEED_TYPES
from ccm_notification.subscriptions.service import PAUSED, RESUMED
from ccm_shared.service import ServiceDefinition


def _routers(runtime):  # noqa: ANN001, ANN202
    notifier_of(runtime)
    return (build_router(runtime), build_subscriptions_router(runtime))


SERVICE = ServiceDefinition(
    name="notification",
    port=8084,
    description="Provider directory, templated communications (email, signed webhooks, FHIR "
    "Communication), acknowledgement tracking and re-escalation, call scheduling; practice-system "
    "subscriptions to billing events (per-practice Kafka topics, signed webhooks).",
    metadata=metadata,
    migrations_package="ccm_notification.migrations",
    routers=_routers,
    consumers=consumers,
    background=background,
    produces=(FAILED, ACKNOWLEDGED, PAUSED, RESUMED),
    produces_per_practice=FEED_TYPES,
    settings_model=NotificationSettings,
    cli=cli,
)
