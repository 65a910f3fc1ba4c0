"""Consumed events → notification intents (care plan, billing) and directory updates (ingest)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select, update

from ccm_notification.adapters.orm import messages
from ccm_notification.service_layer import directory
from ccm_notification.service_layer.notify import Intent, Notifier, held_messages
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


def directory_handler(clock: Callable[[], datetime], notifier: Notifier | None = None):  # noqa: ANN201
    handlers = {
        "ingest.practitioner.upserted.v1": directory.practitioner_upserted,
        "ingest.practitioner-role.upserted.v1": directory.practitioner_role_upserted,
        "ingest.organization.upserted.v1": directory.organization_upserted,
    }

    async def handle(event: CloudEvent, uow: UnitOfWork) -> None:
        if (handler := handlers.get(event.type)) is not None:
            await handler(event, uow, clock())
            if notifier is not None and event.type == "ingest.practitioner-role.upserted.v1":
                # A role a held message names (as responsible provider or supervisor) now
                # resolves to its practitioner. (The EHR sets no supervisor: a provider's
                # supervisor is set by hand, which releases at once.)
                await release_held_reviews(
                    notifier, uow, event.tenant, event.data.get("practitionerRole"))

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
                invoice_values(d),
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


def invoice_values(d: dict) -> dict:
    """The invoice-issued fields of a ``billing.invoice.issued.v1`` event: a replacement says
    which invoice it replaces, what was already paid (carried from it) and what is owed either
    way, so a practice that paid the replaced invoice does not pay again."""
    balance = d.get("balance")
    owed = Decimal(balance) if balance is not None else None
    return {
        "invoice_id": d["invoiceId"],
        "month": d["month"],
        "revision": d["revision"],
        "total_net": d["totalNet"],
        "total_gross": d["totalGross"],
        "replaces": d.get("replaces"),
        "paid": d.get("paid"),
        "balance": balance,
        "amount_due": f"{owed:.2f}" if owed is not None and owed > 0 else None,
        "owed_back": f"{-owed:.2f}" if owed is not None and owed < 0 else None,
    }


async def review_recipient(
    notifier: Notifier, uow: UnitOfWork, practice: str, kind: str, responsible_ref: str | None,
    supervisor_ref: str | None,
) -> str | None:
    """Who gets a care-plan review message: the responsible provider; for an escalation the
    supervisor careplan names, else the provider's own supervisor, else the practice's."""
    responsible = await notifier.provider_for(uow, practice, responsible_ref)
    if kind != "review-escalated":
        return responsible
    return await notifier.provider_for(
        uow, practice, supervisor_ref
    ) or await notifier.supervisor_of(uow, practice, responsible)


async def review_notice(notifier: Notifier, event: CloudEvent, uow: UnitOfWork) -> None:
    d = event.data
    kind = REVIEW_KINDS[event.type]
    recipient = await review_recipient(
        notifier, uow, event.tenant, kind, d["responsibleProvider"], d["supervisor"]
    )
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
                # Not a template field: who careplan named, to find the recipient again when
                # the message is held for one (release_held_reviews).
                "supervisor": d["supervisor"],
            },
            # A new practice's first pass may run before anyone is configured: the message
            # waits for a recipient rather than failing (careplan recorded the step as sent).
            hold_without_recipient=True,
        ),
    )


async def release_held_reviews(
    notifier: Notifier, uow: UnitOfWork, practice: str | None = None,
    reference: str | None = None,
) -> int:
    """Send the held care-plan review messages (of ``practice``, or of every practice; only
    those naming ``reference`` when given) whose recipient can now be found; return how many
    were released. Called when contacts, a provider or a role change, and by the periodic
    sweep (a message held while such a change committed is caught there)."""
    stmt = select(messages).where(held_messages(), messages.c.kind.in_(set(REVIEW_KINDS.values())))
    if practice is not None:
        stmt = stmt.where(messages.c.practice == practice)
    rows = (await uow.session.execute(
        stmt.order_by(messages.c.created_at).limit(500).with_for_update(skip_locked=True)
    )).all()
    found: dict[tuple, str | None] = {}  # held messages share a few recipients: look up once
    released = 0
    for row in rows:
        fields = row.fields or {}
        refs = (fields.get("responsible_provider"), fields.get("supervisor"))
        if reference is not None and reference not in refs:
            continue
        wanted = (row.practice, row.kind, *refs)
        if wanted not in found:
            found[wanted] = await review_recipient(notifier, uow, row.practice, row.kind, *refs)
        if found[wanted] is not None and await notifier.deliver_held(uow, row, found[wanted]):
            released += 1
    return released


async def close_review_alerts(notifier: Notifier, event: CloudEvent, uow: UnitOfWork) -> None:
    """The review was done: its alerts no longer wait for acknowledgement or escalate, and its
    messages still held for a recipient are not sent (they would report a review as missing)."""
    for row in (await uow.session.execute(select(messages).where(
            messages.c.practice == event.tenant, messages.c.tracker == event.data["tracker"],
            held_messages()).with_for_update())).all():
        await notifier.withdraw_held(
            uow, row, "not sent: the review was recorded before anyone was configured to "
            "receive this message")
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
