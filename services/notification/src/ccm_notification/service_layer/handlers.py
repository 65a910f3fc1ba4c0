"""Consumed events → notification intents (care plan, billing) and directory updates (ingest)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy import update

from ccm_notification.adapters.orm import messages
from ccm_notification.service_layer import directory
from ccm_notification.service_layer.notify import Intent, Notifier
from ccm_shared.db import UnitOfWork
from ccm_shared.events import CloudEvent

REVIEW_KINDS = {
    "careplan.review.due.v1": "review-due",
    "careplan.review.reminder.v1": "review-due",
    "careplan.review.overdue.v1": "review-overdue",
    "careplan.review.escalated.v1": "review-escalated",
}
REVIEW_CLOSERS = ("careplan.review.resolved.v1", "careplan.review.completed.v1")
DIRECTORY_TOPICS = (
    "ingest.practitioner.upserted.v1",
    "ingest.practitioner-role.upserted.v1",
    "ingest.organization.upserted.v1",
)
ALERT_TOPICS = (
    *REVIEW_KINDS,
    *REVIEW_CLOSERS,
    "billing.threshold.at-risk.v1",
    "billing.invoice.issued.v1",
    "billing.period.closed.v1",
    "ingest.consent.expiring.v1",
)


def directory_handler(clock: Callable[[], datetime]):  # noqa: ANN201
    handlers = {
        "ingest.practitioner.upserted.v1": directory.practitioner_upserted,
        "ingest.practitioner-role.upserted.v1": directory.practitioner_role_upserted,
        "ingest.organization.upserted.v1": directory.organization_upserted,
    }

    async def handle(event: CloudEvent, uow: UnitOfWork) -> None:
        if (handler := handlers.get(event.type)) is not None:
            await handler(event, uow, clock())

    return handle


def alerts_handler(notifier: Notifier) -> Callable[[CloudEvent, UnitOfWork], Awaitable[None]]:
    async def handle(event: CloudEvent, uow: UnitOfWork) -> None:
        if event.type in REVIEW_KINDS:
            await review_notice(notifier, event, uow)
        elif event.type in REVIEW_CLOSERS:
            await close_review_alerts(notifier, event, uow)
        elif event.type == "billing.threshold.at-risk.v1":
            await threshold_at_risk(notifier, event, uow)
        elif event.type == "billing.invoice.issued.v1":
            d = event.data
            await to_practice_contacts(
                notifier,
                event,
                uow,
                "invoice-issued",
                f"invoice:{d['invoiceId']}:{d['revision']}",
                {
                    "invoice_id": d["invoiceId"],
                    "month": d["month"],
                    "revision": d["revision"],
                    "total_net": d["totalNet"],
                    "total_gross": d["totalGross"],
                },
            )
        elif event.type == "ingest.consent.expiring.v1":
            # A renewed consent is the practice's to obtain: its summary recipients (else its
            # clinical supervisor) hear of it, once per consent, end day and patient.
            d = event.data
            await to_practice_contacts(
                notifier,
                event,
                uow,
                "consent-expiring",
                f"consent-expiring:{d['consent']}:{d['expiresOn']}:{d['patient']}",
                {
                    "patient": d["patient"],
                    "consent": d["consent"],
                    "expires_on": d["expiresOn"],
                    "days_left": d["daysLeft"],
                },
                patient=d["patient"],
            )
        elif event.type == "billing.period.closed.v1":
            d = event.data
            await to_practice_contacts(
                notifier,
                event,
                uow,
                "utilization-summary",
                f"summary:{d['month']}",
                {
                    "month": d["month"],
                    "patients_enrolled": d["patientsEnrolled"],
                    "patients_billable": d["patientsBillable"],
                    "patients_blocked": d["patientsBlocked"],
                    "minutes_staff": d["minutes"]["staff"],
                    "minutes_practitioner": d["minutes"]["practitioner"],
                    "codes": d["codes"],
                    "blockers": d["blockers"],
                    "total_net": d["totalNet"],
                    "invoice_id": d.get("invoiceId"),
                },
            )

    return handle


async def review_notice(notifier: Notifier, event: CloudEvent, uow: UnitOfWork) -> None:
    d = event.data
    kind = REVIEW_KINDS[event.type]
    responsible = await notifier.provider_for(uow, event.tenant, d["responsibleProvider"])
    recipient = responsible
    if kind == "review-escalated":
        recipient = await notifier.provider_for(
            uow, event.tenant, d["supervisor"]
        ) or await notifier.supervisor_of(uow, event.tenant, responsible)
    await notifier.notify(
        uow,
        Intent(
            practice=event.tenant,
            kind=kind,
            provider_id=recipient,
            idempotency_key=f"{event.tenant}:careplan:{d['idempotencyKey']}",
            patient=d["patient"],
            tracker=d["tracker"],
            values={
                "patient": d["patient"],
                "care_plan": d["carePlan"],
                "due_date": d["dueDate"],
                "days_overdue": d["daysOverdue"],
                "step": d["step"],
                "responsible_provider": d["responsibleProvider"],
            },
        ),
    )


async def close_review_alerts(notifier: Notifier, event: CloudEvent, uow: UnitOfWork) -> None:
    """The review was done: its alerts no longer wait for acknowledgement or escalate."""
    await uow.session.execute(
        update(messages)
        .where(
            messages.c.practice == event.tenant,
            messages.c.tracker == event.data["tracker"],
            messages.c.ack_state == "pending",
        )
        .values(ack_state="closed", acked_at=notifier.clock(), acked_by=event.type)
    )


async def threshold_at_risk(notifier: Notifier, event: CloudEvent, uow: UnitOfWork) -> None:
    d = event.data
    recipient = await notifier.provider_for(
        uow, event.tenant, d.get("billingPractitioner")
    ) or await notifier.supervisor_of(uow, event.tenant, None)
    await notifier.notify(
        uow,
        Intent(
            practice=event.tenant,
            kind="threshold-at-risk",
            provider_id=recipient,
            idempotency_key=f"{event.tenant}:billing:{d['idempotencyKey']}",
            patient=d["patient"],
            values={
                "patient": d["patient"],
                "month": d["month"],
                "next_code": d["nextCode"],
                "minutes_to_next": d["minutesToNext"],
                "days_left": d["daysLeft"],
            },
        ),
    )


async def to_practice_contacts(
    notifier: Notifier,
    event: CloudEvent,
    uow: UnitOfWork,
    kind: str,
    key: str,
    values: dict,
    patient: str | None = None,
) -> None:
    """Practice-level messages go to its summary recipients, else its clinical supervisor;
    ``patient``: the one a message is about, when it is about one (Communication.subject)."""
    contacts = await notifier.contacts(uow, event.tenant)
    recipients = list(contacts.summary_recipients) if contacts else []
    if not recipients and contacts is not None and contacts.supervisor:
        recipients = [contacts.supervisor]
    for recipient in recipients or [None]:
        await notifier.notify(
            uow,
            Intent(
                practice=event.tenant,
                kind=kind,
                provider_id=recipient,
                values=values,
                idempotency_key=f"{event.tenant}:{key}:{recipient or 'no-recipient'}",
                patient=patient,
            ),
        )
