"""Composition root of the careplan service (the `ccm.services` entry point)."""

from ccm_careplan.adapters.orm import metadata
from ccm_careplan.entrypoints.api import routers
from ccm_careplan.entrypoints.cli import app as cli
from ccm_careplan.entrypoints.jobs import background, consumers
from ccm_careplan.settings import CareplanSettings
from ccm_shared.service import ServiceDefinition

PRODUCES = (
    "careplan.review.due.v1",
    "careplan.review.reminder.v1",
    "careplan.review.overdue.v1",
    "careplan.review.escalated.v1",
    "careplan.review.resolved.v1",
    "careplan.review.completed.v1",
    "careplan.plan.distributed.v1",
)

SERVICE = ServiceDefinition(
    name="careplan",
    port=8083,
    description=(
        "Master tracker of care-plan reviews, reminders and escalation to clinical supervisors."
    ),
    metadata=metadata,
    migrations_package="ccm_careplan.migrations",
    routers=routers,
    consumers=consumers,
    background=background,
    produces=PRODUCES,
    settings_model=CareplanSettings,
    cli=cli,
)
