"""Composition root of the careplan service (the `ccm.services` entry point)."""

from ccm_shared.service import ServiceDefinition

from ccm_careplan.adapters.orm import metadata

SERVICE = ServiceDefinition(
    name="careplan",
    port=8083,
    description="Master tracker of care-plan reviews, reminders and escalation to clinical supervisors.",
    metadata=metadata,
    migrations_package="ccm_careplan.migrations",
)
