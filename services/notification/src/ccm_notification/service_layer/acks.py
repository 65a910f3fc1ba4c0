"""Acknowledgements: record them, and re-notify then escalate alerts nobody acknowledged."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from ccm_notification.adapters.orm import messages
from ccm_notification.domain.directory import display_name
from ccm_notification.domain.kinds import KINDS
from ccm_notification.service_layer.directory import load_provider
from ccm_notification.service_layer.notify import ACKNOWLEDGED, SOURCE, Intent, Notifier
from ccm_shared.db import Database, UnitOfWork
from ccm_shared.errors import Conflict, NotFound
from ccm_shared.events import CloudEvent


async def acknowledge(
    uow: UnitOfWork,
    notifier: Notifier,
    practice: str,
    message_id: str,
    *,
    via: str,
    actor: str,
) -> dict:
    """Acknowledge the alert a message belongs to (a reminder or escalation acks its root)."""
    row = (
        await uow.session.execute(
            select(messages).where(messages.c.practice == practice, messages.c.id == message_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"notification {message_id} not found")
    if row.root_id is not None:
        row = (
            await uow.session.execute(select(messages).where(messages.c.id == row.root_id))
        ).first()
    if row.ack_state is None:
        raise Conflict(f"notification {message_id} does not ask for acknowledgement")
    if row.ack_state == "pending":
        now = notifier.clock()
        # Conditional on still pending: of concurrent acks (a row lock makes the others wait
        # and then match nothing) one records the acknowledgement and its event; the others
        # answer with the acknowledgement recorded.
        done = await uow.session.execute(
            update(messages)
            .where(messages.c.id == row.id, messages.c.ack_state == "pending")
            .values(ack_state="acknowledged", acked_at=now, acked_by=actor)
        )
        if done.rowcount != 1:
            row = (
                await uow.session.execute(select(messages).where(messages.c.id == row.id))
            ).first()
            return _ack_view(row)
        await uow.outbox.add(
            ACKNOWLEDGED,
            CloudEvent(
                source=SOURCE,
                type=ACKNOWLEDGED,
                tenant=practice,
                time=now,
                subject=row.patient or f"Communication/{row.id}",
                data={
                    "message": row.id,
                    "kind": row.kind,
                    "provider": f"Practitioner/{row.provider_id}" if row.provider_id else None,
                    "acknowledgedAt": now.isoformat(),
                    "via": via,
                    "escalationLevel": row.escalation_level,
                },
            ),
        )
        return {"id": row.id, "ack_state": "acknowledged", "acked_at": now.isoformat()}
    return _ack_view(row)


def _ack_view(row) -> dict:  # noqa: ANN001
    return {
        "id": row.id,
        "ack_state": row.ack_state,
        "acked_at": row.acked_at.isoformat() if row.acked_at else None,
    }


async def sweep(db: Database, notifier: Notifier) -> int:
    """Alerts past their SLA: level 0 → remind the provider; level 1 → escalate to the
    supervisor (no further automatic step). Returns how many alerts moved on."""
    now = notifier.clock()
    async with db.unit_of_work() as uow:
        due = (
            await uow.session.execute(
                select(messages)
                .where(messages.c.ack_state == "pending", messages.c.ack_due_at <= now)
                .order_by(messages.c.ack_due_at)
                .limit(200)
                .with_for_update(skip_locked=True)
            )
        ).all()
        for alert in due:
            await escalate(uow, notifier, alert)
        await uow.commit()
    return len(due)


async def escalate(uow: UnitOfWork, notifier: Notifier, alert) -> None:  # noqa: ANN001
    now = notifier.clock()
    _, sla = await notifier.ack_policy(uow, alert.practice, alert.kind)
    if alert.escalation_level == 0:
        await notifier.notify(
            uow,
            Intent(
                practice=alert.practice,
                kind=alert.kind,
                provider_id=alert.provider_id,
                values=alert.fields,
                patient=alert.patient,
                tracker=alert.tracker,
                idempotency_key=f"{alert.idempotency_key}:renotify",
                root_id=alert.id,
                escalation_level=1,
                subject_prefix="[Reminder] ",
            ),
        )
        await uow.session.execute(
            update(messages)
            .where(messages.c.id == alert.id)
            .values(escalation_level=1, ack_due_at=now + timedelta(minutes=sla))
        )
        return
    supervisor = await notifier.supervisor_of(uow, alert.practice, alert.provider_id)
    name = await _provider_name(uow, alert) if alert.provider_id else None
    await notifier.notify(
        uow,
        Intent(
            practice=alert.practice,
            kind="ack-escalation",
            provider_id=supervisor,
            values={
                "alert_title": KINDS[alert.kind].title,
                "alert_subject": alert.subject,
                "unacknowledged_by": name or "the provider",
                "sent_at": (alert.sent_at or alert.created_at).isoformat(timespec="minutes"),
                "patient": alert.patient,
            },
            patient=alert.patient,
            tracker=alert.tracker,
            idempotency_key=f"{alert.idempotency_key}:escalate",
            root_id=alert.id,
            escalation_level=2,
        ),
    )
    await uow.session.execute(
        update(messages)
        .where(messages.c.id == alert.id)
        .values(escalation_level=2, ack_due_at=None)
    )


async def _provider_name(uow: UnitOfWork, alert) -> str:  # noqa: ANN001
    row = await load_provider(uow, alert.practice, alert.provider_id)
    return display_name(row.current if row else {}, alert.provider_id)
