"""The dispatcher: delivers due messages from the ``messages`` table, retrying per channel.

One pass: claim due rows in a short transaction (status ``sending`` plus a lease, FOR UPDATE SKIP
LOCKED so replicas share the work), deliver them with no transaction open, then record each
outcome — the delivery log row, the new status, and on final failure the failed event — in one
transaction. A crash mid-send leaves the row ``sending``; when the lease runs out it is retried.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import structlog
from sqlalchemy import and_, select, update

from ccm_notification.adapters.channels import DeliveryResult, Outgoing
from ccm_notification.adapters.orm import deliveries, messages
from ccm_notification.domain.kinds import backoff_seconds
from ccm_notification.service_layer.notify import Notifier
from ccm_shared.db import Database

log = structlog.get_logger(__name__)


class Channel(Protocol):
    async def send(self, out: Outgoing) -> DeliveryResult: ...


@dataclass
class Dispatcher:
    db: Database
    notifier: Notifier
    channels: dict[str, Channel]

    async def claim(self) -> list:
        s = self.notifier.settings
        now = self.notifier.clock()
        async with self.db.unit_of_work() as uow:
            stmt = (
                select(messages)
                .where(
                    messages.c.status.in_(("pending", "sending")), messages.c.next_attempt_at <= now
                )
                .order_by(messages.c.next_attempt_at)
                .limit(s.dispatch_batch_size)
                .with_for_update(skip_locked=True)
            )
            rows = (await uow.session.execute(stmt)).all()
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
