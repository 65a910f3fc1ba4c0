"""Kafka consumers of the billing service."""

from __future__ import annotations

from ccm_billing.service_layer.projections import TOPICS, apply_event
from ccm_shared.db import UnitOfWork
from ccm_shared.events import CloudEvent
from ccm_shared.service import ConsumerSpec

CONSUMER = "billing-projections"


def consumers(runtime) -> list[ConsumerSpec]:  # noqa: ANN001
    async def handle(event: CloudEvent, uow: UnitOfWork) -> None:
        await apply_event(event, uow, now=runtime.clock())

    return [ConsumerSpec(name=CONSUMER, topics=TOPICS, handler=handle)]
