"""Consumed events → notification intents (care plan, billing) and directory updates (ingest)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, or_, select, tuple_, update

from ccm_notification.adapters.orm import invoice_cancellations, messages, practice_contacts
from ccm_notification.adapters.sql import insert_for, practice_row
from ccm_notification.domain import practice_messages as pm
from ccm_notification.service_layer import directory
from ccm_notification.service_layer.notify import Intent, Notifier, held_messages
from ccm_shared.db import UnitOfWork, xact_lock
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
# A consent that ends this way makes a held expiry notice of it obsolete (what each is called).
CONSENT_ENDED = {
    "ingest.consent.revoked.v1": "revoked",
    "ingest.consent.declined.v1": "declined",
    "ingest.consent.voided.v1": "voided",
}
CONSENT_GRANTED = "ingest.consent.granted.v1"
ALERT_TOPICS = (
    *REVIEW_KINDS,
    *REVIEW_CLOSERS,
    "billing.threshold.at-risk.v1",
    "billing.invoice.issued.v1",
    "billing.invoice.cancelled.v1",
    "billing.period.closed.v1",
    "ingest.consent.expiring.v1",
    CONSENT_GRANTED,
    *CONSENT_ENDED,
)
SWEEP_BATCH = 500  # held messages (reviews, practice-level) one sweep reads, oldest first
PRACTICE_HELD_REASON = (
    "no recipient yet: the practice has no summary recipients or clinical supervisor "
    "configured; this message is held and sent as soon as one is (PUT …/contacts)"
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
            await invoice_issued(notifier, event, uow)
        elif event.type == "billing.invoice.cancelled.v1":
            await invoice_cancelled(notifier, event, uow)
        elif event.type == CONSENT_GRANTED or event.type in CONSENT_ENDED:
            await consent_changed(notifier, event, uow)
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
                tracker=consent_tracker(d["consent"]),
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
    amount_due, owed_back = pm.owed(balance)
    return {
        "invoice_id": d["invoiceId"],
        "month": d["month"],
        "revision": d["revision"],
        "total_net": d["totalNet"],
        "total_gross": d["totalGross"],
        "replaces": d.get("replaces"),
        "paid": d.get("paid"),
        "balance": balance,
        "amount_due": amount_due,
        "owed_back": owed_back,
        "refund_owed": pm.refund_owed(d.get("paid")),
    }


def invoice_tracker(invoice_id: str) -> str:
    return f"invoice:{invoice_id}"


async def _lock_invoice(uow: UnitOfWork, practice: str, invoice_id: str) -> None:
    """An invoice's ``issued`` and ``cancelled`` are applied one after the other (they come on
    topics of their own, possibly at once): whichever commits second sees the first."""
    await xact_lock(uow.session, f"notification:invoice:{practice}:{invoice_id}")


async def invoice_issued(notifier: Notifier, event: CloudEvent, uow: UnitOfWork) -> None:
    """The practice's contacts are told of an issued invoice, unless its cancellation was
    consumed first (billing publishes the two on topics of their own): the practice must not
    be asked to pay a cancelled invoice. The message is then recorded as not sent (failed,
    with the reason), once."""
    d = event.data
    key = f"invoice:{d['invoiceId']}:{d['revision']}"
    await _lock_invoice(uow, event.tenant, d["invoiceId"])
    cancelled = (await uow.session.execute(select(invoice_cancellations).where(
        invoice_cancellations.c.practice == event.tenant,
        invoice_cancellations.c.invoice_id == d["invoiceId"]))).first()
    if cancelled is None:
        await to_practice_contacts(
            notifier, event, uow, "invoice-issued", key, invoice_values(d),
            # what a cancellation of the invoice finds it by, while it is held
            tracker=invoice_tracker(d["invoiceId"]))
        return
    if (await uow.session.execute(select(messages.c.id).where(
            messages.c.practice == event.tenant, messages.c.kind == "invoice-issued",
            messages.c.tracker == invoice_tracker(d["invoiceId"])).limit(1))).first():
        return  # recorded before the cancellation came (sent, or withdrawn while held)
    await notifier.record_not_sent(
        uow,
        Intent(practice=event.tenant, kind="invoice-issued", values=invoice_values(d),
               idempotency_key=f"{event.tenant}:{key}:{pm.CANCELLED_FIRST}",
               tracker=invoice_tracker(d["invoiceId"])),
        f"not sent: invoice {d['invoiceId']} was cancelled"
        f"{pm.cancelled_why(cancelled.replaced_by)} before its issue was processed",
    )


def consent_tracker(consent: str) -> str:
    return f"consent:{consent}"


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
    sweep (a message held while such a change committed is caught there).

    Read in batches of ``SWEEP_BATCH``, oldest first, each after the last one read (keyset on
    ``created_at, id``) until none is left: messages nobody can receive yet (a practice without
    a supervisor collects an escalation each pass) stay held, and once a batch's worth of them
    were the oldest, a single batch read only them and released nothing behind them."""
    stmt = select(messages).where(held_messages(), messages.c.kind.in_(set(REVIEW_KINDS.values())))
    if practice is not None:
        stmt = stmt.where(messages.c.practice == practice)
    if reference is not None:  # only the messages naming it are read (and locked)
        stmt = stmt.where(or_(
            messages.c.fields["responsible_provider"].as_string() == reference,
            messages.c.fields["supervisor"].as_string() == reference))
    stmt = stmt.order_by(messages.c.created_at, messages.c.id)
    found: dict[tuple, str | None] = {}  # held messages share a few recipients: look up once
    released = 0
    after: tuple | None = None
    while True:
        batch = stmt if after is None else stmt.where(
            tuple_(messages.c.created_at, messages.c.id) > tuple_(*after))
        rows = (await uow.session.execute(
            batch.limit(SWEEP_BATCH).with_for_update(skip_locked=True))).all()
        for row in rows:
            fields = row.fields or {}
            refs = (fields.get("responsible_provider"), fields.get("supervisor"))
            wanted = (row.practice, row.kind, *refs)
            if wanted not in found:
                found[wanted] = await review_recipient(
                    notifier, uow, row.practice, row.kind, *refs)
            if found[wanted] is not None and await notifier.deliver_held(uow, row, found[wanted]):
                released += 1
        if len(rows) < SWEEP_BATCH:
            return released
        after = (rows[-1].created_at, rows[-1].id)


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


async def practice_recipients(notifier: Notifier, uow: UnitOfWork, practice: str) -> list[str]:
    contacts = await notifier.contacts(uow, practice)
    if contacts is None:
        return []
    return pm.practice_recipients(contacts.summary_recipients, contacts.supervisor)


async def to_practice_contacts(
    notifier: Notifier,
    event: CloudEvent,
    uow: UnitOfWork,
    kind: str,
    key: str,
    values: dict,
    patient: str | None = None,
    tracker: str | None = None,
) -> None:
    """Practice-level messages go to its summary recipients, else its clinical supervisor, one
    message each (key ``{practice}:{key}:{recipient}``); ``patient``: the one a message is
    about, when it is about one (Communication.subject). With neither configured the message is
    held (key ``…:no-recipient``) until a contact is: ``release_practice_message`` then sends it
    to every contact configured, once. The same intent again (a re-published event) finds what
    was recorded: a held message is released if it can be now, and is never recorded twice."""
    base = f"{event.tenant}:{key}"
    held = await notifier.find_by_key(uow, f"{base}:{pm.NO_CONTACT}")
    if held is not None:  # this intent came before any contact: its release sends it to them
        if held.status == "pending" and held.next_attempt_at is None:
            await release_practice_message(notifier, uow, held, values)
        return
    recipients = await practice_recipients(notifier, uow, event.tenant)
    if not recipients and (await uow.session.execute(
            select(messages.c.id).where(
                messages.c.practice == event.tenant,
                messages.c.idempotency_key.startswith(f"{base}:", autoescape=True))
            .limit(1))).first() is not None:
        return  # sent before to contacts since removed: the intent is done, nothing is held
    for recipient in recipients or [None]:
        await notifier.notify(
            uow,
            Intent(
                practice=event.tenant,
                kind=kind,
                provider_id=recipient,
                values=values,
                idempotency_key=f"{base}:{recipient or pm.NO_CONTACT}",
                patient=patient,
                tracker=tracker,
                hold_without_recipient=True,
                held_reason=PRACTICE_HELD_REASON,
            ),
        )


async def release_practice_message(
    notifier: Notifier, uow: UnitOfWork, row, values: dict | None = None  # noqa: ANN001
) -> bool:
    """Send a practice-level message held for a contact (``row``) to the practice's contacts
    now configured: the held message goes to the first, a message of its own (key
    ``{practice}:{key}:{recipient}``) to each other one. Only the call that releases the held
    row adds the others, so concurrent releases send each once. True when this call did."""
    recipients = await practice_recipients(notifier, uow, row.practice)
    if not recipients:
        return False
    first, *others = recipients
    if not await notifier.deliver_held(uow, row, first, values):
        return False
    base = row.idempotency_key.removesuffix(f":{pm.NO_CONTACT}")
    for recipient in others:
        await notifier.notify(uow, Intent(
            practice=row.practice, kind=row.kind, provider_id=recipient,
            values=dict(values if values is not None else row.fields),
            idempotency_key=f"{base}:{recipient}", patient=row.patient, tracker=row.tracker))
    return True


async def release_held_practice_messages(
    notifier: Notifier, uow: UnitOfWork, practice: str | None = None
) -> int:
    """Send the held practice-level messages (of ``practice``, or of every practice that has
    contacts) to the contacts now configured; return how many were released. Called when the
    contacts are saved, and by the periodic sweep."""
    stmt = select(messages).where(held_messages(), messages.c.kind.in_(pm.PRACTICE_KINDS))
    if practice is not None:
        stmt = stmt.where(messages.c.practice == practice)
    else:  # practices without contacts keep theirs held: not read (nor locked) every pass
        # (a contacts row naming no one counts as none: 500 held messages of such practices,
        # the oldest, filled every pass, and no other practice's were ever released)
        c = practice_contacts.c
        stmt = stmt.where(messages.c.practice.in_(select(c.practice).where(or_(
            c.supervisor.is_not(None), func.json_array_length(c.summary_recipients) > 0))))
    rows = (await uow.session.execute(
        stmt.order_by(messages.c.created_at).limit(SWEEP_BATCH).with_for_update(skip_locked=True)
    )).all()
    released = 0
    for row in rows:
        if await release_practice_message(notifier, uow, row):
            released += 1
    return released


async def release_held(notifier: Notifier, uow: UnitOfWork, practice: str | None = None) -> int:
    """Every held message whose recipient can now be found: care-plan reviews and
    practice-level messages."""
    return (await release_held_reviews(notifier, uow, practice)
            + await release_held_practice_messages(notifier, uow, practice))


async def withdraw_held(
    notifier: Notifier, uow: UnitOfWork, practice: str, reason: str, *where  # noqa: ANN002
) -> int:
    """Withdraw the practice's held messages matching ``where`` (what they announce is no
    longer so): failed with ``reason``, never sent. Returns how many."""
    rows = (await uow.session.execute(select(messages).where(
        messages.c.practice == practice, held_messages(), *where).with_for_update())).all()
    for row in rows:
        await notifier.withdraw_held(uow, row, reason)
    return len(rows)


async def withdraw_unsent(
    notifier: Notifier, uow: UnitOfWork, practice: str, reason: str, *where  # noqa: ANN002
) -> int:
    """Withdraw the practice's messages matching ``where`` that are addressed and waiting to be
    sent (due, or waiting for a retry): failed with ``reason``, never sent. One the dispatcher
    has claimed (``sending``) is left to that attempt: its row lock is waited for, and the row
    read again, so a claim committing meanwhile is seen. Returns how many."""
    rows = (await uow.session.execute(select(messages).where(
        messages.c.practice == practice, messages.c.status == "pending",
        messages.c.next_attempt_at.is_not(None), *where).with_for_update())).all()
    withdrawn = 0
    for row in rows:
        withdrawn += await notifier.withdraw_unsent(uow, row, reason)
    return withdrawn


async def invoice_cancelled(notifier: Notifier, event: CloudEvent, uow: UnitOfWork) -> None:
    """An invoice was cancelled: its announcement, if still held or waiting to be sent (due, or
    for an SMTP retry), is withdrawn, and if not made yet, never will be (``invoice_issued``);
    one being sent goes on (and if that attempt fails, the dispatcher withdraws it instead of
    retrying). Replaced, the replacement's own message says so; with nothing in its place (a
    correction left nothing to bill), the practice is told what was cancelled, what was paid
    and is owed back."""
    d = event.data
    replaced = not pm.cancelled_without_replacement(d)
    why = (pm.cancelled_why(d.get("replacedBy"))
           or ("" if replaced else " (a correction left nothing to bill)"))
    await _lock_invoice(uow, event.tenant, d["invoiceId"])
    # Remembered for an ``issued`` of it consumed later (the two travel on separate topics).
    await uow.session.execute(
        insert_for(uow.session, invoice_cancellations).values(
            practice=event.tenant, invoice_id=d["invoiceId"], replaced_by=d.get("replacedBy"),
            event_id=event.id, recorded_at=notifier.clock(),
        ).on_conflict_do_nothing(index_elements=["practice", "invoice_id"]))
    await withdraw_held(
        notifier, uow, event.tenant,
        f"not sent: invoice {d['invoiceId']} was cancelled{why} before anyone was "
        "configured to receive this message",
        messages.c.kind == "invoice-issued", messages.c.tracker == invoice_tracker(d["invoiceId"]))
    await withdraw_unsent(
        notifier, uow, event.tenant, pm.cancelled_before_sent(d["invoiceId"], why),
        messages.c.kind == "invoice-issued", messages.c.tracker == invoice_tracker(d["invoiceId"]))
    if not replaced:
        await to_practice_contacts(notifier, event, uow, "invoice-cancelled",
                                   f"invoice-cancelled:{d['invoiceId']}", pm.cancelled_values(d))


async def consent_changed(notifier: Notifier, event: CloudEvent, uow: UnitOfWork) -> None:
    """A consent revoked, declined or voided, or a consent granted that renews one, makes a held
    expiry notice obsolete: it is withdrawn rather than sent late."""
    d = event.data
    expiring = messages.c.kind == "consent-expiring"
    if event.type in CONSENT_ENDED:
        await withdraw_held(
            notifier, uow, event.tenant,
            f"not sent: the consent was {CONSENT_ENDED[event.type]} before anyone was "
            "configured to receive this message",
            expiring, messages.c.tracker == consent_tracker(d["consent"]))
        return
    held = (await uow.session.execute(select(messages).where(
        messages.c.practice == event.tenant, held_messages(), expiring,
        messages.c.patient == d["patient"]))).all()
    if not held:
        return
    practice = await practice_row(uow.session, event.tenant)
    try:
        tz = ZoneInfo(practice.timezone) if practice is not None else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        tz = ZoneInfo("UTC")
    end = (d.get("period") or {}).get("end")
    renewed = [row.id for row in held
               if pm.renews((row.fields or {}).get("expires_on", ""), d.get("provision"), end, tz)]
    if renewed:
        await withdraw_held(
            notifier, uow, event.tenant,
            "not sent: a consent of the patient covering days after this one was granted "
            "before anyone was configured to receive this message",
            messages.c.id.in_(renewed))
