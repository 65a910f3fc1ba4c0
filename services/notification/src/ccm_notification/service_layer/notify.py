"""Notification intents become rendered, idempotently recorded messages (the delivery outbox).

A message row is written in the caller's unit of work (a consumed event's, with its inbox row,
or an API request's), keyed by a unique idempotency key: a redelivered event or a retried
request finds the key taken and records nothing. The dispatcher delivers the row later.
An intent that cannot be delivered (unknown provider, no channel, a missing template field)
is recorded as a failed message and raises ``notification.message.failed.v1``, never dropped.
One whose recipient is found by a rule that finds nobody yet (a care-plan escalation before the
practice configured a supervisor, an invoice email before it configured any contact) is *held*
instead: pending with no attempt time and the reason
in ``last_error``, until a recipient appears (``deliver_held``); it is then sent, once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import and_, select, update

from ccm_notification.adapters.orm import (
    ack_policies,
    messages,
    practice_contacts,
    provider_roles,
    template_overrides,
)
from ccm_notification.adapters.rendering import Renderer, TemplateInvalid
from ccm_notification.adapters.sql import insert_for, practice_row
from ccm_notification.config import NotificationSettings
from ccm_notification.domain.directory import choose_channel, display_name, reference_id
from ccm_notification.domain.kinds import KINDS, MissingFields
from ccm_notification.domain.signing import sign_link
from ccm_notification.service_layer.directory import load_provider
from ccm_shared.db import UnitOfWork
from ccm_shared.events import CloudEvent

log = structlog.get_logger(__name__)

SOURCE = "/ccm/notification"
FAILED = "notification.message.failed.v1"
ACKNOWLEDGED = "notification.message.acknowledged.v1"
NO_RECIPIENT = "no recipient: the practice has no contact configured for this message"
HELD_REASON = (
    "no recipient yet: nobody is configured to receive this message; it is held and sent as "
    "soon as one is (the practice's contacts or clinical supervisor, the provider directory)"
)


def held_messages():  # noqa: ANN201
    """Messages held for a recipient: pending, with no attempt time."""
    return and_(messages.c.status == "pending", messages.c.next_attempt_at.is_(None))


@dataclass(frozen=True)
class Intent:
    """One message someone means to send. ``address`` bypasses the directory (e.g. a requester)."""

    practice: str
    kind: str
    idempotency_key: str
    values: dict[str, Any]
    provider_id: str | None = None
    address: tuple[str, str, str] | None = None  # (channel, address, display name)
    patient: str | None = None
    tracker: str | None = None
    attachments: tuple[dict[str, str], ...] = ()
    requires_ack: bool | None = None  # None: the practice's policy for the kind
    root_id: str | None = None  # an escalation of this alert: its ack link acks the root
    escalation_level: int = 0
    subject_prefix: str = ""
    # No recipient yet (nobody configured): keep the message, unsent, until one is found
    # (``release_held``) instead of failing it. For messages whose recipient a rule finds later.
    hold_without_recipient: bool = False
    held_reason: str = HELD_REASON  # what the held message's last_error says


@dataclass(frozen=True)
class _Prepared:
    channel: str | None
    address: str | None
    subject: str
    text: str
    html: str
    error: str | None
    requires_ack: bool
    sla: int


@dataclass
class Recorded:
    message_id: str
    created: bool
    status: str
    error: str | None = None


@dataclass
class Notifier:
    settings: NotificationSettings
    secret_key: str
    clock: Callable[[], datetime]
    renderer: Renderer = field(default_factory=Renderer)

    # -- links ---------------------------------------------------------------------------------

    def link_expiry(self) -> datetime:
        return self.clock() + timedelta(hours=self.settings.link_ttl_hours)

    def ack_url(self, practice: str, message_id: str) -> str:
        token = sign_link(
            self.secret_key, "ack", {"m": message_id, "p": practice}, self.link_expiry()
        )
        return f"{self.settings.public_base_url.rstrip('/')}/v1/ack/{token}"

    def slot_url(self, practice: str, call_id: str, slot: int) -> str:
        token = sign_link(
            self.secret_key,
            "call-slot",
            {"c": call_id, "p": practice, "s": slot},
            self.link_expiry(),
        )
        return f"{self.settings.public_base_url.rstrip('/')}/v1/calls/choose/{token}"

    # -- policy --------------------------------------------------------------------------------

    async def ack_policy(self, uow: UnitOfWork, practice: str, kind: str) -> tuple[bool, int]:
        """(requires acknowledgement, SLA minutes) for a practice and kind."""
        row = (
            await uow.session.execute(
                select(ack_policies).where(
                    ack_policies.c.practice == practice, ack_policies.c.kind == kind
                )
            )
        ).first()
        if row is not None:
            return row.requires_ack, row.sla_minutes
        return kind in self.settings.ack_kind_set, self.settings.ack_sla_minutes

    async def template_source(self, uow: UnitOfWork, practice: str, kind: str) -> str | None:
        stmt = select(template_overrides.c.source).where(
            template_overrides.c.practice == practice, template_overrides.c.kind == kind
        )
        return (await uow.session.execute(stmt)).scalar()

    # -- recipients ----------------------------------------------------------------------------

    async def provider_for(
        self, uow: UnitOfWork, practice: str, reference: str | None
    ) -> str | None:
        """Practitioner/x → x; PractitionerRole/r → the role's practitioner."""
        if reference is None:
            return None
        if (pid := reference_id(reference, "Practitioner")) is not None:
            return pid
        if (role := reference_id(reference, "PractitionerRole")) is not None:
            stmt = select(provider_roles.c.practitioner).where(
                provider_roles.c.practice == practice, provider_roles.c.id == role
            )
            return (await uow.session.execute(stmt)).scalar()
        return None

    async def contacts(self, uow: UnitOfWork, practice: str):  # noqa: ANN201
        stmt = select(practice_contacts).where(practice_contacts.c.practice == practice)
        return (await uow.session.execute(stmt)).first()

    async def supervisor_of(
        self, uow: UnitOfWork, practice: str, provider_id: str | None
    ) -> str | None:
        """The provider's own supervisor, else the practice's clinical supervisor."""
        if provider_id is not None:
            row = await load_provider(uow, practice, provider_id)
            if row is not None and row.current.get("supervisor"):
                return row.current["supervisor"]
        contacts = await self.contacts(uow, practice)
        return contacts.supervisor if contacts is not None else None

    # -- the intent ----------------------------------------------------------------------------

    async def notify(self, uow: UnitOfWork, intent: Intent, *, strict: bool = False) -> Recorded:
        """Record the message for ``intent`` once. ``strict``: raise on bad fields (API callers).
        The same intent again finds its message; one held for a recipient is sent to the
        recipient the intent now names, if any (e.g. an escalation re-announced with the
        supervisor configured since)."""
        existing = await self.find_by_key(uow, intent.idempotency_key)
        if existing is not None:
            if existing.status == "pending" and existing.next_attempt_at is None \
                    and intent.provider_id is not None \
                    and await self.deliver_held(uow, existing, intent.provider_id, intent.values):
                existing = await self.find_by_key(uow, intent.idempotency_key)  # as released
            return Recorded(existing.id, False, existing.status, existing.last_error)
        kind = KINDS[intent.kind]
        message_id = str(uuid.uuid4())
        now = self.clock()
        held = intent.provider_id is None and intent.address is None \
            and intent.hold_without_recipient
        prepared = await self._prepare(uow, intent, message_id, strict=strict)
        error = prepared.error
        if held and error == NO_RECIPIENT:
            error = None
        status = "failed" if error else "pending"
        requires_ack = prepared.requires_ack
        await uow.session.execute(
            insert_for(uow.session, messages).values(
                id=message_id,
                practice=intent.practice,
                idempotency_key=intent.idempotency_key,
                kind=intent.kind,
                provider_id=intent.provider_id,
                patient=intent.patient,
                channel=prepared.channel,
                recipient=prepared.address,
                subject=prepared.subject or kind.title,
                text_body=prepared.text,
                html_body=prepared.html,
                fields=_jsonable(intent.values),
                attachments=list(intent.attachments),
                status=status,
                attempts=0,
                # Held: pending with no attempt time, so the dispatcher leaves it alone.
                next_attempt_at=now if status == "pending" and not held else None,
                last_error=intent.held_reason if held and status == "pending" else error,
                root_id=intent.root_id,
                ack_state="pending" if requires_ack and not intent.root_id else None,
                # The acknowledgement clock starts when the alert is sent, not while held.
                ack_due_at=now + timedelta(minutes=prepared.sla)
                if requires_ack and not intent.root_id and not held
                else None,
                escalation_level=intent.escalation_level,
                tracker=intent.tracker,
                created_at=now,
            )
        )
        if held and status == "pending":
            log.warning("message held: no recipient configured yet", practice=intent.practice,
                        kind=intent.kind, message=message_id)
        if error:
            await self.raise_failed(
                uow,
                message_id,
                intent.practice,
                intent.kind,
                intent.provider_id,
                prepared.channel,
                0,
                error,
                intent.idempotency_key,
                intent.patient,
            )
        return Recorded(message_id, True, status,
                        intent.held_reason if held and not error else error)

    async def _prepare(
        self, uow: UnitOfWork, intent: Intent, message_id: str, *, strict: bool
    ) -> _Prepared:
        """The intent's channel and address, rendered message and acknowledgement policy, or
        the reason it cannot be sent (``error``)."""
        kind = KINDS[intent.kind]
        practice = await practice_row(uow.session, intent.practice)
        channel = address = None
        name = ""
        error = None
        if intent.address is not None:
            channel, address, name = intent.address
        elif intent.provider_id is None:
            error = NO_RECIPIENT
        else:
            row = await load_provider(uow, intent.practice, intent.provider_id)
            name = display_name(row.current if row else {}, intent.provider_id)
            if row is None:
                error = f"provider {intent.provider_id} is not in the directory"
            elif not row.current.get("active", True):
                error = f"provider {intent.provider_id} is inactive"
            elif (chosen := choose_channel(row.current)) is None:
                error = f"provider {intent.provider_id} has no email, webhook or FHIR endpoint"
            else:
                channel, address = chosen
        requires_ack, sla = await self.ack_policy(uow, intent.practice, intent.kind)
        if intent.requires_ack is not None:
            requires_ack = intent.requires_ack
        ack_target = intent.root_id or message_id
        context = {
            "practice_name": practice.name if practice else intent.practice,
            "provider_name": name,
            "ack_url": self.ack_url(intent.practice, ack_target)
            if (requires_ack or intent.root_id)
            else None,
        }
        subject = text = html = ""
        source = await self.template_source(uow, intent.practice, intent.kind)
        try:
            # Off the event loop: even a bounded render of a practice's template takes time.
            rendered = await asyncio.to_thread(
                self.renderer.render, kind, intent.values, context, source
            )
            subject, text, html = rendered.subject, rendered.text, rendered.html
            subject = intent.subject_prefix + subject
        except (MissingFields, TemplateInvalid) as exc:
            if strict:
                raise
            error = f"template: {exc}"
        return _Prepared(channel, address, subject, text, html, error, requires_ack, sla)

    async def deliver_held(
        self, uow: UnitOfWork, row, provider_id: str, values: dict | None = None  # noqa: ANN001
    ) -> bool:
        """Address a held message (``row``) to ``provider_id`` now that there is one: rendered
        for them (with ``values``, when the intent came again with fresher ones) and due at
        once, or failed with the reason when that provider cannot be reached. Only while it is
        still held (of concurrent releases one does it), so it is sent once. True when this
        call released it."""
        now = self.clock()
        values = dict(values if values is not None else row.fields)
        intent = Intent(
            practice=row.practice,
            kind=row.kind,
            idempotency_key=row.idempotency_key,
            values=values,
            provider_id=provider_id,
            patient=row.patient,
            tracker=row.tracker,
            root_id=row.root_id,
            escalation_level=row.escalation_level,
        )
        prepared = await self._prepare(uow, intent, row.id, strict=False)
        error = prepared.error
        kind = KINDS[row.kind]
        done = await uow.session.execute(
            update(messages)
            .where(messages.c.id == row.id, held_messages())
            .values(
                provider_id=provider_id,
                channel=prepared.channel,
                recipient=prepared.address,
                subject=prepared.subject or kind.title,
                text_body=prepared.text,
                html_body=prepared.html,
                fields=_jsonable(values),
                status="failed" if error else "pending",
                next_attempt_at=None if error else now,
                last_error=error,
                ack_due_at=now + timedelta(minutes=prepared.sla)
                if row.ack_state == "pending" and not error
                else row.ack_due_at,
            )
        )
        if done.rowcount != 1:
            return False
        if error:
            await self.raise_failed(uow, row.id, row.practice, row.kind, provider_id,
                                    prepared.channel, 0, error, row.idempotency_key, row.patient)
        return True

    async def withdraw_held(self, uow: UnitOfWork, row, reason: str) -> None:  # noqa: ANN001
        """A held message that must no longer go out (what it is about was done meanwhile):
        failed with ``reason``, and its failed event raised."""
        done = await uow.session.execute(
            update(messages)
            .where(messages.c.id == row.id, held_messages())
            .values(status="failed", last_error=reason,
                    ack_state="closed" if row.ack_state == "pending" else row.ack_state)
        )
        if done.rowcount == 1:
            await self.raise_failed(uow, row.id, row.practice, row.kind, None, None, 0, reason,
                                    row.idempotency_key, row.patient)

    async def withdraw_unsent(self, uow: UnitOfWork, row, reason: str) -> bool:  # noqa: ANN001
        """A message addressed but not sent yet that must no longer go out (what it announces
        was undone meanwhile): ``row`` as the caller read it under its lock, ``pending`` (due,
        or waiting for a retry after a failed attempt) or ``sending`` with its lease run out (as
        the dispatcher claims it). Failed with ``reason``, its failed event raised. Not if it
        changed since (the dispatcher claimed it: that attempt goes on). True when withdrawn."""
        done = await uow.session.execute(
            update(messages)
            .where(messages.c.id == row.id, messages.c.status == row.status,
                   messages.c.attempts == row.attempts)
            .values(status="failed", next_attempt_at=None, last_error=reason,
                    ack_state="closed" if row.ack_state == "pending" else row.ack_state)
        )
        if done.rowcount != 1:
            return False
        await self.raise_failed(uow, row.id, row.practice, row.kind, row.provider_id,
                                row.channel, row.attempts, reason, row.idempotency_key,
                                row.patient)
        return True

    async def record_not_sent(self, uow: UnitOfWork, intent: Intent, reason: str) -> bool:
        """Record ``intent`` as a message that is not sent, because what it announces was
        undone before it was made: failed with ``reason`` (no recipient, nothing rendered) and
        its failed event raised, like a held message withdrawn. Once per idempotency key; True
        when this call recorded it."""
        message_id = str(uuid.uuid4())
        done = await uow.session.execute(
            insert_for(uow.session, messages).values(
                id=message_id, practice=intent.practice,
                idempotency_key=intent.idempotency_key, kind=intent.kind, provider_id=None,
                patient=intent.patient, channel=None, recipient=None,
                subject=KINDS[intent.kind].title, text_body="", html_body="",
                fields=_jsonable(intent.values), attachments=[], status="failed", attempts=0,
                next_attempt_at=None, last_error=reason, root_id=None, ack_state=None,
                ack_due_at=None, escalation_level=0, tracker=intent.tracker,
                created_at=self.clock(),
            ).on_conflict_do_nothing(index_elements=["idempotency_key"]))
        if done.rowcount != 1:
            return False
        await self.raise_failed(uow, message_id, intent.practice, intent.kind, None, None, 0,
                                reason, intent.idempotency_key, intent.patient)
        return True

    async def find_by_key(self, uow: UnitOfWork, key: str):  # noqa: ANN201
        """The message recorded for an idempotency key (the whole row: one held is released
        from it), or None."""
        stmt = select(messages).where(messages.c.idempotency_key == key)
        return (await uow.session.execute(stmt)).first()

    async def raise_failed(
        self,
        uow: UnitOfWork,
        message_id: str,
        practice: str,
        kind: str,
        provider_id: str | None,
        channel: str | None,
        attempts: int,
        reason: str,
        key: str,
        patient: str | None,
    ) -> None:
        await uow.outbox.add(
            FAILED,
            CloudEvent(
                source=SOURCE,
                type=FAILED,
                tenant=practice,
                time=self.clock(),
                subject=patient or f"Communication/{message_id}",
                data={
                    "message": message_id,
                    "kind": kind,
                    "provider": f"Practitioner/{provider_id}" if provider_id else None,
                    "channel": channel,
                    "attempts": attempts,
                    "reason": reason[:1000],
                    "idempotencyKey": key,
                },
            ),
        )


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """Template values as stored (dates and decimals as strings)."""
    import json

    return json.loads(json.dumps(values, default=str))
