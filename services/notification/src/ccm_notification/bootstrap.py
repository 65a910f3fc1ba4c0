"""Composition root of the notification service (the `ccm.services` entry point)."""

from ccm_shared.service import ServiceDefinition

from ccm_notification.adapters.orm import metadata

SERVICE = ServiceDefinition(
    name="notification",
    port=8084,
    description="Provider directory, templated communications and acknowledgement tracking.",
    metadata=metadata,
    migrations_package="ccm_notification.migrations",
)
