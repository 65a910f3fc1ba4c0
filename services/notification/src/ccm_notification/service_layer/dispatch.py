"""The dispatcher: delivers due messages from the ``messages`` table, retrying per channel.

One pass: claim due rows in a short transaction (status ``sending`` plus a lease, FOR UPDATE SKIP
LOCKED so replicas share the work), deliver them with no transaction open, then record each
outcome — the delivery log row, the new status, and on final failure the failed event — in one
transaction. A crash mid-send leaves the row ``sending``; when the lease runs out it is retried.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from sqlalchemy import Select, and_, or_, select, update

from ccm_notification.adapters.channels import DeliveryResult, Outgoing
from ccm_notification.adapters.orm import deliveries, invoice_cancellations, messages
from ccm_notification.domain.kinds import backoff_seconds
from ccm_notification.domain.practice_messages import cancelled_before_sent, cancelled_why
from ccm_notification.service_layer.notify import Notifier
from ccm_shared.db import Database, UnitOfWork

log = structlog.get_logger(__name__)


class Channel(Protocol):
    async def send(self, out: Outgoing) -> DeliveryResult: ...


@dataclass
class Dispatcher:
    db: Database
    notifier: Notifier
    channels: dict[str, Channel]

    def due(self, now: datetime) -> Select:
        """The messages due at ``now``: pending, or sending with the lease run out."""
        return select(messages).where(
            messages.c.status.in_(("pending", "sending")), messages.c.next_attempt_at <= now
        )

    async def claim(self) -> list:
        """Claim a batch of due messages (status ``sending``, a lease) and return them. An
        ``invoice-issued`` message whose invoice was cancelled meanwhile is withdrawn instead:
        the cancellation withdraws one waiting to be sent, but one being sent at that moment
        (claimed) comes back here if its attempt failed or its lease ran out."""
        s = self.notifier.settings
        now = self.notifier.clock()
        async with self.db.unit_of_work() as uow:
            stmt = (
                self.due(now)
                .order_by(messages.c.next_attempt_at)
                .limit(s.dispatch_batch_size)
                .with_for_update(skip_locked=True)
            )
            rows = (await uow.session.execute(stmt)).all()
            withdrawn = await self._withdraw_cancelled_invoices(uow, rows)
            rows = [row for row in rows if row.id not in withdrawn]
            for row in rows:
                await uow.session.execute(
                    update(messages)
                    .where(messages.c.id == row.id)
                    .values(
                        status="sending",
                        attempts=row.attempts + 1,
                        next_attempt_at=now + timedelta(seconds=s.sending_lease_seconds),
                    )
                )
            await uow.commit()
        return rows

    async def _withdraw_cancelled_invoices(self, uow: UnitOfWork, rows: list) -> set[str]:
        """Withdraw the ``invoice-issued`` messages of ``rows`` (locked) whose invoice has a
        cancellation recorded; return their ids."""
        invoices = {(r.practice, r.fields["invoice_id"]) for r in rows
                    if r.kind == "invoice-issued" and (r.fields or {}).get("invoice_id")}
        if not invoices:
            return set()
        c = invoice_cancellations.c
        cancelled = {(p, i): replaced_by for p, i, replaced_by in (await uow.session.execute(
            select(c.practice, c.invoice_id, c.replaced_by).where(or_(*(
                and_(c.practice == p, c.invoice_id == i) for p, i in invoices))))).all()}
        withdrawn: set[str] = set()
        for row in rows:
            invoice = (row.practice, (row.fields or {}).get("invoice_id"))
            if row.kind != "invoice-issued" or invoice not in cancelled:
                continue
            reason = cancelled_before_sent(invoice[1], cancelled_why(cancelled[invoice]))
            if await self.notifier.withdraw_unsent(uow, row, reason):
                withdrawn.add(row.id)
        return withdrawn

    async def run_once(self) -> int:
        """Deliver everything due now; return how many deliveries were attempted."""
        rows = await self.claim()
        await asyncio.gather(*(self.deliver(row) for row in rows))
        return len(rows)

    async def deliver(self, row) -> None:  # noqa: ANN001
        attempt = row.attempts + 1
        out = Outgoing(
            message_id=row.id,
            practice=row.practice,
            idempotency_key=row.idempotency_key,
            kind=row.kind,
            provider_id=row.provider_id,
            patient=row.patient,
            recipient=row.recipient,
            subject=row.subject,
            text=row.text_body,
            html=row.html_body,
            fields=row.fields,
            attachments=row.attachments,
            requires_ack=row.ack_state is not None or row.root_id is not None,
        )
        try:
            result = await self.channels[row.channel].send(out)
        except Exception as exc:  # noqa: BLE001 - a channel bug must not lose the message
            result = DeliveryResult(False, f"{type(exc).__name__}: {exc}"[:500])
        await self.record(row, attempt, result)

    async def record(self, row, attempt: int, result: DeliveryResult) -> None:  # noqa: ANN001
        s = self.notifier.settings
        now = self.notifier.clock()
        final = not result.ok and (result.permanent or attempt >= s.max_attempts(row.channel))
        outcome = "delivered" if result.ok else ("failed" if final else "retry")
        values: dict = {"last_error": None if result.ok else result.response}
        if result.ok:
            values |= {"status": "sent", "sent_at": now, "next_attempt_at": None}
        elif final:
            values |= {"status": "failed", "next_attempt_at": None}
        else:
            delay = backoff_seconds(attempt, s.retry_backoff_seconds, s.retry_backoff_max_seconds)
            values |= {"status": "pending", "next_attempt_at": now + timedelta(seconds=delay)}
        async with self.db.unit_of_work() as uow:
            # Only the claimant of this attempt may record it (a lease taken over is not ours).
            done = await uow.session.execute(
                update(messages)
                .where(
                    and_(
                        messages.c.id == row.id,
                        messages.c.status == "sending",
                        messages.c.attempts == attempt,
                    )
                )
                .values(**values)
            )
            if done.rowcount != 1:
                return
            await uow.session.execute(
                deliveries.insert().values(
                    message_id=row.id,
                    practice=row.practice,
                    attempt=attempt,
                    channel=row.channel,
                    outcome=outcome,
                    response=result.response,
                    at=now,
                )
            )
            if final:
                await self.notifier.raise_failed(
                    uow,
                    row.id,
                    row.practice,
                    row.kind,
                    row.provider_id,
                    row.channel,
                    attempt,
                    result.response,
                    row.idempotency_key,
                    row.patient,
                )
            await uow.commit()
        log.info("delivery", channel=row.channel, kind=row.kind, attempt=attempt, outcome=outcome)
