"""Service layer of practice subscriptions: the fan-out consumer, subscription management and
the ordered, signed, retried webhook delivery.

The fan-out runs in the consumer's unit of work (inbox row, practice-topic outbox row and the
subscriptions' numbered events commit together), so a redelivered billing event changes nothing.
Delivery is the dispatcher's pattern: claim a subscription with a lease in a short transaction,
POST with no transaction open, record each attempt in its own transaction.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog
from sqlalchemy import and_, delete, func, or_, select, update

from ccm_notification.adapters.channels import SIGNATURE_HEADER, DeliveryResult, post_signed
from ccm_notification.adapters.orm import (
    feed_held,
    messages,
    subscription_deliveries,
    subscription_events,
    subscription_secrets,
    subscriptions,
)
from ccm_notification.adapters.sql import practice_row
from ccm_notification.config import NotificationSettings
from ccm_notification.domain.kinds import backoff_seconds
from ccm_notification.service_layer.handlers import to_practice_contacts, withdraw_held
from ccm_notification.service_layer.notify import Notifier
from ccm_notification.subscriptions.domain import (
    FEED_COUNTER,
    FEED_POSITION,
    FEED_TYPES,
    FeedEvent,
    SigningSecret,
    delivery_outcome,
    feed_data,
    new_secret,
    notification,
    ping,
    producer_sequence,
    releasable,
    rotate,
    should_pause,
    signature_header,
    signing_secrets,
    subscription_secret,
    wants,
)
from ccm_notification.subscriptions.topics import PracticeTopics
from ccm_shared.consumer import Handler, PoisonMessage
from ccm_shared.db import Database, UnitOfWork, xact_lock
from ccm_shared.errors import Conflict, NotFound
from ccm_shared.events import CloudEvent, practice_topic

log = structlog.get_logger(__name__)

SOURCE = "/ccm/notification/subscriptions"
PAUSED = "notification.subscription.paused.v1"
RESUMED = "notification.subscription.resumed.v1"
PAUSED_KIND = "subscription-paused"  # the practice-level message telling the practice
NOT_A_PRACTICE = "the event's tenant is not a registered practice (platform.practices)"
Clock = Callable[[], datetime]



# -- fan-out --------------------------------------------------------------------------------------


def feed_topics(
    topics: PracticeTopics, db: Database | None = None
) -> Callable[[CloudEvent], Awaitable[None]]:
    """The feed consumer's ``prepare``: the practice's topics exist before its first event is
    written for them (a Kafka admin call, made before the event's transaction, never in it).
    With ``db``: only a registered practice's (``platform.practices``); an event of any other
    tenant (another deployment's on the same Kafka, one published by hand) is a PoisonMessage
    and creates nothing. Practices found are remembered (the handler checks again, in its
    transaction)."""
    known: set[str] = set()

    async def prepare(event: CloudEvent) -> None:
        if event.type not in FEED_TYPES:
            return
        practice = event.tenant  # a practice id: the consumer's decode refused any other
        if db is not None and practice not in known:
            async with db.unit_of_work() as uow:
                found = await practice_row(uow.session, practice)
            if found is None:
                raise PoisonMessage(NOT_A_PRACTICE)
            known.add(practice)
        await topics.ensure([practice])

    return prepare


def feed_handler(clock: Clock, hold_seconds: float = 30.0) -> Handler:
    """Consumer of billing's practice-facing events: one numbered copy on the practice's topic
    and one numbered notification per matching subscription of that practice (its topics were
    made by ``feed_topics`` before the transaction), numbered in billing's order
    (``feed_in_order``)."""
    hold = timedelta(seconds=hold_seconds)

    async def handle(event: CloudEvent, uow: UnitOfWork) -> None:
        if event.type not in FEED_TYPES:
            return
        practice = event.tenant  # a practice id: the consumer's decode refused any other
        if await practice_row(uow.session, practice) is None:
            # Not one of this deployment's practices: no topic, counter or held row for it.
            raise PoisonMessage(NOT_A_PRACTICE)
        if await already_fanned_out(uow, event.id):
            return  # a replay (group reset, second feed group): the copy is out or held
        await feed_in_order(uow, practice, event, now=clock(), hold=hold)

    return handle


async def already_fanned_out(uow: UnitOfWork, event_id: str) -> bool:
    """The practice-topic copy keeps the billing event's id, which the outbox holds once; an
    event waiting for its turn is in ``feed_held``. Both looked up in one statement."""
    from ccm_shared.tables import outbox_table

    stmt = select(or_(
        select(outbox_table.c.event_id).where(outbox_table.c.event_id == event_id).exists(),
        select(feed_held.c.event_id).where(feed_held.c.event_id == event_id).exists(),
    ))
    return bool((await uow.session.execute(stmt)).scalar())


async def feed_in_order(
    uow: UnitOfWork, practice: str, event: CloudEvent, *, now: datetime, hold: timedelta
) -> int:
    """Fan ``event`` out in billing's order for the practice; return how many events went out.

    Billing numbers a practice's invoice, payment and period events (``practiceSequence``) in
    the transaction that makes them, but publishes each type on a topic of its own, so this
    consumer may apply them in another order (a replacement's ``issued`` before the
    ``cancelled`` billing wrote first). An event billing numbered waits in ``feed_held`` until
    the number before it went out, or until the oldest waiting has waited ``hold``; an event
    billing does not number (at-risk) goes out at once. Under the practice's position lock, so
    the consumer and ``release_waiting`` hand out numbers one at a time."""
    position = await _lock_position(uow, practice)
    sequence = producer_sequence(event.type, event.data)
    if sequence is None:
        await fan_out(uow, practice, event, now=now)
        return 1
    if sequence <= position:
        # Its place went by (it came more than the hold window late, or billing re-numbered):
        # numbered now rather than never.
        log.warning("practice feed: a billing event came after later ones went out; numbered "
                    "on arrival", practice=practice, event_type=event.type,
                    producer_sequence=sequence, position=position)
        await fan_out(uow, practice, event, now=now)
        return 1
    await uow.session.execute(feed_held.insert().values(
        practice=practice, producer_sequence=sequence, event_id=event.id,
        event=event.to_json().decode(), held_at=now))
    return await _release(uow, practice, position, now=now, hold=hold)


async def release_waiting(db: Database, clock: Clock, hold_seconds: float) -> int:
    """Fan out the held events whose wait is over (the gap before them was not filled within
    the hold window); a background job. Returns how many went out."""
    now, hold = clock(), timedelta(seconds=hold_seconds)
    async with db.unit_of_work() as uow:
        waiting = (await uow.session.execute(
            select(feed_held.c.practice).where(feed_held.c.held_at <= now - hold).distinct()
        )).scalars().all()
    released = 0
    for practice in sorted(waiting):
        async with db.unit_of_work() as uow:
            position = await _lock_position(uow, practice)
            released += await _release(uow, practice, position, now=now, hold=hold)
            await uow.commit()
    return released


async def _lock_position(uow: UnitOfWork, practice: str) -> int:
    """The practice's last billing number fanned out (0: none yet), its counter row locked
    until the commit: reserving no number creates the row or locks it as it is, in one
    statement, and answers the number after the last."""
    return await uow.outbox.reserve_sequences(practice, FEED_POSITION, 0) - 1


async def _release(
    uow: UnitOfWork, practice: str, position: int, *, now: datetime, hold: timedelta
) -> int:
    """Fan out, in billing's order, the practice's held events whose turn has come."""
    rows = (await uow.session.execute(
        select(feed_held).where(feed_held.c.practice == practice)
        .order_by(feed_held.c.producer_sequence, feed_held.c.held_at, feed_held.c.event_id)
    )).all()
    count, after = releasable(
        [(r.producer_sequence, r.held_at) for r in rows], position, now, hold)
    if not count:
        return 0
    for row in rows[:count]:
        await fan_out(uow, practice, CloudEvent.from_json(row.event), now=now)
    await uow.session.execute(delete(feed_held).where(
        feed_held.c.event_id.in_([r.event_id for r in rows[:count]])))
    if after > position:  # the counter advanced to the last number fanned out
        await uow.outbox.reserve_sequences(practice, FEED_POSITION, after - position)
    return count


async def fan_out(uow: UnitOfWork, practice: str, event: CloudEvent, *, now: datetime) -> int:
    """Publish ``event`` to ``practice`` only; return its per-practice sequence number."""
    number = await uow.outbox.next_sequence(practice, FEED_COUNTER)
    billing_sequence = producer_sequence(event.type, event.data)  # before the feed's replaces it
    data = feed_data(event.type, event.data, number)
    await uow.outbox.add(
        practice_topic(practice, event.type),
        event.model_copy(update={"sequence": number, "data": data}),
    )
    feed = FeedEvent(
        id=event.id,
        type=event.type,
        time=event.time.isoformat(),
        subject=event.subject,
        practice_sequence=number,
        data=data,
        billing_sequence=billing_sequence,
    )
    await _number_for_subscriptions(uow, practice, feed, now)
    return number


async def _number_for_subscriptions(
    uow: UnitOfWork, practice: str, feed: FeedEvent, now: datetime
) -> None:
    rows = (
        await uow.session.execute(
            select(subscriptions)
            .where(subscriptions.c.practice == practice)
            .order_by(subscriptions.c.id)
            .with_for_update()  # numbers per subscription are handed out one writer at a time
        )
    ).all()
    for row in rows:
        if not wants(row.event_types, feed.type):
            continue
        number = row.last_event_number + 1
        await uow.session.execute(
            update(subscriptions)
            .where(subscriptions.c.id == row.id)
            .values(
                last_event_number=number,
                # a paused subscription is tried again when it is resumed, not now
                next_attempt_at=(row.next_attempt_at or now) if row.status == "active"
                else row.next_attempt_at,
            )
        )
        await uow.session.execute(
            subscription_events.insert().values(
                subscription_id=row.id,
                number=number,
                practice=practice,
                event_id=feed.id,
                event_type=feed.type,
                body=notification(
                    subscription=row.id,
                    practice=practice,
                    number=number,
                    mode=row.payload,
                    event=feed,
                ),
                status="pending",
                attempts=0,
                created_at=now,
            )
        )


# -- management -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewSubscription:
    event_types: list[str]
    endpoint: str
    payload: str
    description: str | None = None


async def create_subscription(
    uow: UnitOfWork, practice: str, spec: NewSubscription, *, secret_key: str, limit: int,
    now: datetime,
) -> tuple[Any, str]:
    """Create a subscription; return its row and its signing secret (shown this once).
    Concurrent creates of one practice count one after the other (a transaction-scoped advisory
    lock per practice on PostgreSQL; SQLite has one writer), so the limit holds."""
    await xact_lock(uow.session, f"notification:subscriptions:{practice}")
    count = (
        await uow.session.execute(
            select(func.count()).where(subscriptions.c.practice == practice)
        )
    ).scalar_one()
    if count >= limit:
        raise Conflict(f"a practice may have at most {limit} subscriptions")
    sub_id, salt = str(uuid.uuid4()), secrets.token_hex(16)
    await uow.session.execute(
        subscriptions.insert().values(
            id=sub_id,
            practice=practice,
            description=spec.description,
            event_types=list(dict.fromkeys(spec.event_types)),
            endpoint=spec.endpoint,
            payload=spec.payload,
            secret_salt=salt,
            status="active",
            last_event_number=0,
            delivered_through=0,
            consecutive_failures=0,
            created_at=now,
            updated_at=now,
        )
    )
    row = await load(uow, practice, sub_id)
    return row, subscription_secret(secret_key, sub_id, salt)


async def load(uow: UnitOfWork, practice: str, sub_id: str, *, lock: bool = False):  # noqa: ANN201
    """The practice's subscription; another practice's (or none) raises NotFound."""
    stmt = select(subscriptions).where(
        and_(subscriptions.c.id == sub_id, subscriptions.c.practice == practice)
    )
    row = (await uow.session.execute(stmt.with_for_update() if lock else stmt)).first()
    if row is None:
        raise NotFound(f"subscription {sub_id!r} not found")
    return row


async def list_subscriptions(uow: UnitOfWork, practice: str) -> list:
    stmt = (
        select(subscriptions)
        .where(subscriptions.c.practice == practice)
        .order_by(subscriptions.c.created_at, subscriptions.c.id)
    )
    return list((await uow.session.execute(stmt)).all())


async def delete_subscription(
    uow: UnitOfWork, practice: str, sub_id: str, notifier: Notifier | None = None
) -> None:
    await load(uow, practice, sub_id, lock=True)
    if notifier is not None:
        await withdraw_pause_notice(notifier, uow, practice, sub_id, "deleted")
    for table in (subscription_deliveries, subscription_events, subscription_secrets):
        await uow.session.execute(delete(table).where(table.c.subscription_id == sub_id))
    await uow.session.execute(delete(subscriptions).where(subscriptions.c.id == sub_id))


@dataclass(frozen=True)
class SubscriptionChange:
    """What a PATCH changes; None leaves it as it is (``description``: ``clear_description``
    sets it to null)."""

    event_types: list[str] | None = None
    endpoint: str | None = None
    description: str | None = None
    clear_description: bool = False


async def update_subscription(
    uow: UnitOfWork, practice: str, sub_id: str, change: SubscriptionChange, *, now: datetime
) -> Any:  # noqa: ANN401
    """Change a subscription's endpoint, event filter or description; return the row.

    The filter applies to events fanned out from the commit on (those numbered before stay
    numbered and are delivered). A new endpoint receives everything still waiting: the
    failures counted so far were the old endpoint's, so the count starts again and an active
    subscription with events waiting is tried at once (a paused one stays paused until it is
    resumed). The row is locked, so the feed numbers each event under one filter or the other."""
    row = await load(uow, practice, sub_id, lock=True)
    values: dict[str, Any] = {}
    if change.event_types is not None:
        values["event_types"] = list(dict.fromkeys(change.event_types))
    if change.description is not None or change.clear_description:
        values["description"] = change.description
    if change.endpoint is not None and change.endpoint != row.endpoint:
        values |= {"endpoint": change.endpoint, "consecutive_failures": 0}
        if row.status == "active" and row.last_event_number > row.delivered_through:
            values["next_attempt_at"] = now
    if values:
        await uow.session.execute(
            update(subscriptions).where(subscriptions.c.id == sub_id)
            .values(**values, updated_at=now))
        log.info("subscription changed", subscription=sub_id, changed=sorted(values))
    return await load(uow, practice, sub_id)


async def _secret_rows(uow: UnitOfWork, sub_ids: list[str]) -> list:
    if not sub_ids:
        return []
    return list((await uow.session.execute(
        select(subscription_secrets).where(subscription_secrets.c.subscription_id.in_(sub_ids))
    )).all())


async def _secrets_of(uow: UnitOfWork, sub_ids: list[str]) -> dict[str, list[SigningSecret]]:
    found: dict[str, list[SigningSecret]] = {}
    for r in await _secret_rows(uow, sub_ids):
        found.setdefault(r.subscription_id, []).append(
            SigningSecret(r.generation, r.secret, r.valid_until))
    return found


async def secrets_for_signing(
    uow: UnitOfWork, sub: Any, *, secret_key: str, now: datetime  # noqa: ANN401
) -> list[str]:
    """The secrets a delivery of ``sub`` at ``now`` is signed with, current first: the stored
    ones of a rotated subscription (earlier ones only during their overlap), else the one
    derived from ``CCM_SECRET_KEY``."""
    stored = (await _secrets_of(uow, [sub.id])).get(sub.id)
    if not stored:
        return [subscription_secret(secret_key, sub.id, sub.secret_salt)]
    return signing_secrets(stored, now)


async def secret_summaries(
    uow: UnitOfWork, sub_ids: list[str], now: datetime
) -> dict[str, dict[str, Any]]:
    """Per subscription: when its secret was last rotated (None: never) and until when each
    earlier secret still signs, newest first (what its view shows; never a secret)."""
    out: dict[str, dict[str, Any]] = {
        sub_id: {"secretRotatedAt": None, "previousSecretsValidUntil": []} for sub_id in sub_ids}
    rows = sorted(await _secret_rows(uow, sub_ids), key=lambda r: r.generation, reverse=True)
    for r in rows:
        summary, until = out[r.subscription_id], r.valid_until
        if until is None:
            summary["secretRotatedAt"] = r.created_at.isoformat()
        elif until > now:
            summary["previousSecretsValidUntil"].append(until.isoformat())
    return out


async def rotate_secret(
    uow: UnitOfWork, practice: str, sub_id: str, *, secret_key: str, overlap: timedelta,
    now: datetime,
) -> tuple[Any, str]:
    """Give the subscription a new signing secret; return its row and the secret (shown this
    once). The secret it replaces keeps signing beside it for ``overlap`` (``domain.rotate``);
    from the first rotation on, the subscription's secrets are stored and no longer derived
    from ``CCM_SECRET_KEY``. Under the subscription's row lock: rotations one at a time."""
    row = await load(uow, practice, sub_id, lock=True)
    stored = (await _secrets_of(uow, [sub_id])).get(sub_id) or []
    before = {s.generation for s in stored}
    if not stored:  # its first rotation: the derived secret becomes generation 0
        stored = [SigningSecret(0, subscription_secret(secret_key, sub_id, row.secret_salt))]
    secret = new_secret()
    after = rotate(stored, secret, now, overlap)
    kept = {s.generation for s in after}
    of_sub = subscription_secrets.c.subscription_id == sub_id
    await uow.session.execute(delete(subscription_secrets).where(
        and_(of_sub, subscription_secrets.c.generation.not_in(kept))))
    for s in after:
        if s.generation in before:
            await uow.session.execute(update(subscription_secrets).where(
                and_(of_sub, subscription_secrets.c.generation == s.generation))
                .values(valid_until=s.valid_until))
        else:
            await uow.session.execute(subscription_secrets.insert().values(
                subscription_id=sub_id, generation=s.generation, practice=practice,
                secret=s.secret, valid_until=s.valid_until,
                # generation 0 is the secret the subscription was created with
                created_at=row.created_at if s.generation == 0 else now))
    log.info("subscription secret rotated", subscription=sub_id,
             overlap_seconds=int(overlap.total_seconds()), still_signing=len(after) - 1)
    return row, secret


async def resume(
    uow: UnitOfWork, practice: str, sub_id: str, *, now: datetime,
    notifier: Notifier | None = None,
) -> bool:
    """Resume a paused subscription (deliveries restart at the oldest undelivered event);
    return False when it was not paused. A notice of the pause still held for a contact is
    withdrawn (it would announce a pause that is over)."""
    row = await load(uow, practice, sub_id, lock=True)
    if row.status != "paused":
        return False
    if notifier is not None:
        await withdraw_pause_notice(notifier, uow, practice, sub_id, "resumed")
    await uow.session.execute(
        update(subscriptions)
        .where(subscriptions.c.id == sub_id)
        .values(
            status="active",
            consecutive_failures=0,
            paused_at=None,
            paused_reason=None,
            next_attempt_at=now,
            lease_token=None,
            leased_until=None,
            updated_at=now,
        )
    )
    await uow.outbox.add(
        RESUMED,
        _event(RESUMED, practice, sub_id, now, {
            "subscription": sub_id,
            "pendingEvents": row.last_event_number - row.delivered_through,
            "lastEventNumber": row.last_event_number,
            "deliveredThrough": row.delivered_through,
        }),
    )
    return True


def pause_tracker(sub_id: str) -> str:
    return f"subscription:{sub_id}"


async def withdraw_pause_notice(
    notifier: Notifier, uow: UnitOfWork, practice: str, sub_id: str, what: str
) -> int:
    """The subscription's pause notices still held for a contact, withdrawn: it was resumed or
    deleted before anyone was configured to receive them."""
    return await withdraw_held(
        notifier, uow, practice,
        f"not sent: the subscription was {what} before anyone was configured to receive this "
        "message",
        messages.c.kind == PAUSED_KIND, messages.c.tracker == pause_tracker(sub_id))


async def tell_practice_paused(
    notifier: Notifier, uow: UnitOfWork, sub: Any, paused: CloudEvent, *, now: datetime
) -> None:
    """The practice's contacts hear that its subscription paused (a practice-level message;
    held until the practice has a contact, like the others), once per pause."""
    d = paused.data
    await to_practice_contacts(
        notifier, paused, uow, PAUSED_KIND, f"{PAUSED_KIND}:{sub.id}:{now.isoformat()}",
        {
            "practice": sub.practice,
            "subscription": sub.id,
            "description": sub.description,
            "endpoint": sub.endpoint,
            "reason": d["reason"][:300],
            "consecutive_failures": d["consecutiveFailures"],
            "pending_events": d["lastEventNumber"] - d["deliveredThrough"],
            "delivered_through": d["deliveredThrough"],
            "paused_at": now.isoformat(timespec="seconds"),
        },
        tracker=pause_tracker(sub.id),
    )


def _event(kind: str, practice: str, sub_id: str, now: datetime, data: dict) -> CloudEvent:
    return CloudEvent(
        source=SOURCE, type=kind, tenant=practice, subject=f"Subscription/{sub_id}", time=now,
        data=data,
    )


async def events_since(
    uow: UnitOfWork, practice: str, sub_id: str, since: int, limit: int
) -> list[dict]:
    """Notifications numbered above ``since``, in order (replay after downtime)."""
    await load(uow, practice, sub_id)
    stmt = (
        select(subscription_events.c.body)
        .where(
            and_(
                subscription_events.c.subscription_id == sub_id,
                subscription_events.c.number > since,
            )
        )
        .order_by(subscription_events.c.number)
        .limit(limit)
    )
    return [r.body for r in (await uow.session.execute(stmt)).all()]


async def delivery_log(uow: UnitOfWork, practice: str, sub_id: str, limit: int) -> list[dict]:
    await load(uow, practice, sub_id)
    stmt = (
        select(subscription_deliveries)
        .where(subscription_deliveries.c.subscription_id == sub_id)
        .order_by(subscription_deliveries.c.id.desc())
        .limit(limit)
    )
    return [_delivery_view(r) for r in (await uow.session.execute(stmt)).all()]


def _delivery_view(r) -> dict:  # noqa: ANN001
    return {
        "eventNumber": r.number,
        "attempt": r.attempt,
        "outcome": r.outcome,
        "response": r.response,
        "latencyMs": r.latency_ms,
        "at": r.at.isoformat(),
    }


async def status_of(uow: UnitOfWork, practice: str, sub_id: str, now: datetime) -> dict:
    """Lag and health: events waiting, age of the oldest, failures, last delivery."""
    row = await load(uow, practice, sub_id)
    oldest = (
        await uow.session.execute(
            select(func.min(subscription_events.c.created_at)).where(_pending(sub_id))
        )
    ).scalar_one()
    last = (
        await uow.session.execute(
            select(subscription_deliveries)
            .where(subscription_deliveries.c.subscription_id == sub_id)
            .order_by(subscription_deliveries.c.id.desc())
            .limit(1)
        )
    ).first()
    if oldest is not None and oldest.tzinfo is None:  # SQLite returns naive UTC
        oldest = oldest.replace(tzinfo=now.tzinfo)
    return {
        "id": row.id,
        "status": row.status,
        "lastEventNumber": row.last_event_number,
        "deliveredThrough": row.delivered_through,
        "lagEvents": row.last_event_number - row.delivered_through,
        "oldestPendingAt": oldest.isoformat() if oldest else None,
        "lagSeconds": max(0, int((now - oldest).total_seconds())) if oldest else 0,
        "consecutiveFailures": row.consecutive_failures,
        # paused: nothing is attempted until it is resumed
        "nextAttemptAt": row.next_attempt_at.isoformat()
        if row.next_attempt_at and row.status == "active" else None,
        "pausedAt": row.paused_at.isoformat() if row.paused_at else None,
        "pausedReason": row.paused_reason,
        "lastDelivery": _delivery_view(last) if last else None,
    }


# -- delivery -------------------------------------------------------------------------------------


def _pending(sub_id: str):  # noqa: ANN202
    return and_(
        subscription_events.c.subscription_id == sub_id, subscription_events.c.status == "pending"
    )


def _one_event(sub_id: str, number: int):  # noqa: ANN202
    return and_(
        subscription_events.c.subscription_id == sub_id, subscription_events.c.number == number
    )


async def post_with_secrets(
    client: httpx.AsyncClient, url: str, body: bytes, signing: list[str], timestamp: int,
    headers: dict[str, str], timeout: float,
) -> DeliveryResult:
    """``post_signed`` with ``X-CCM-Signature`` carrying one ``v1`` per secret of ``signing``
    (current first): the header given replaces the one ``post_signed`` computes for the first
    secret alone (its extra headers are applied after its own)."""
    return await post_signed(
        client, url, body, signing[0], timestamp,
        {SIGNATURE_HEADER: signature_header(signing, timestamp, body), **headers}, timeout)


@dataclass(frozen=True)
class PingResult:
    """What a test delivery got: the receiver's status (None: no answer), its answer or the
    error, the latency, and how many secrets signed it (2 or more during a rotation's
    overlap)."""

    ping_id: str
    delivered: bool
    status: int | None
    response: str
    latency_ms: int
    signatures: int


async def send_ping(
    db: Database, practice: str, sub_id: str, *, secret_key: str, client: httpx.AsyncClient,
    clock: Clock, timeout: float,
) -> PingResult:
    """POST a signed ``ping`` to the subscription's endpoint now (paused or not) and report
    what the receiver answered. Nothing is numbered or recorded: the feed, ``eventNumber``,
    ``deliveredThrough`` and the delivery log stay as they were. The request is made with no
    transaction open."""
    now = clock()
    async with db.unit_of_work() as uow:
        sub = await load(uow, practice, sub_id)
        signing = await secrets_for_signing(uow, sub, secret_key=secret_key, now=now)
    ping_id = str(uuid.uuid4())
    body = json.dumps(ping(subscription=sub.id, practice=practice, ping_id=ping_id,
                           time=now.isoformat()), separators=(",", ":")).encode()
    started = time.perf_counter()
    try:
        result = await post_with_secrets(
            client, sub.endpoint, body, signing, int(now.timestamp()),
            {"X-CCM-Subscription-Id": sub.id}, timeout)
    except Exception as exc:  # noqa: BLE001 - reported to the caller, as a delivery's would be
        result = DeliveryResult(False, f"{type(exc).__name__}: {exc}"[:500])
    latency_ms = int((time.perf_counter() - started) * 1000)
    log.info("subscription ping", delivered=result.ok, status=result.status,
             latency_ms=latency_ms)
    return PingResult(ping_id, result.ok, result.status, result.response, latency_ms,
                      len(signing))


@dataclass
class SubscriptionDeliverer:
    """Delivers each active subscription's pending notifications in number order, one at a time;
    a failure stops that subscription's pass and backs off, N failures in a row pause it."""

    db: Database
    settings: NotificationSettings
    secret_key: str
    clock: Clock
    client: httpx.AsyncClient
    notifier: Notifier | None = None  # tells the practice's contacts when one pauses

    async def run_once(self) -> int:
        """One pass over every subscription due now; return how many deliveries were tried."""
        claimed = await self._claim()
        done = await asyncio.gather(*(self._drain(row, token) for row, token in claimed))
        return sum(done)

    async def _claim(self) -> list[tuple[Any, str]]:
        now, token = self.clock(), str(uuid.uuid4())
        async with self.db.unit_of_work() as uow:
            rows = (
                await uow.session.execute(
                    select(subscriptions)
                    .where(
                        and_(
                            subscriptions.c.status == "active",
                            subscriptions.c.next_attempt_at <= now,
                            or_(
                                subscriptions.c.leased_until.is_(None),
                                subscriptions.c.leased_until < now,
                            ),
                        )
                    )
                    .order_by(subscriptions.c.next_attempt_at)
                    .limit(self.settings.dispatch_batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            lease = now + timedelta(seconds=self.settings.sending_lease_seconds)
            for row in rows:
                await uow.session.execute(
                    update(subscriptions)
                    .where(subscriptions.c.id == row.id)
                    .values(lease_token=token, leased_until=lease)
                )
            await uow.commit()
        return [(row, token) for row in rows]

    async def _drain(self, sub, token: str) -> int:  # noqa: ANN001
        async with self.db.unit_of_work() as uow:
            pending = (
                await uow.session.execute(
                    select(subscription_events)
                    .where(_pending(sub.id))
                    .order_by(subscription_events.c.number)
                    .limit(self.settings.subscription_batch_size)
                )
            ).all()
            signing = await secrets_for_signing(uow, sub, secret_key=self.secret_key,
                                                now=self.clock())
        tried = 0
        for event in pending:
            body = json.dumps(event.body, separators=(",", ":")).encode()
            started = time.perf_counter()
            try:
                result = await post_with_secrets(
                    self.client, sub.endpoint, body, signing, int(self.clock().timestamp()),
                    {
                        "X-CCM-Subscription-Id": sub.id,
                        "X-CCM-Event-Number": str(event.number),
                        "X-CCM-Event-Id": event.event_id,
                    },
                    self.settings.webhook_timeout_seconds,
                )
            except Exception as exc:  # noqa: BLE001 - a sender bug must not lose the event
                result = DeliveryResult(False, f"{type(exc).__name__}: {exc}"[:500])
            latency_ms = int((time.perf_counter() - started) * 1000)
            tried += 1
            recorded = await self._record(sub.id, token, event, result, latency_ms)
            if not recorded or delivery_outcome(result.ok, result.status,
                                                event.attempts + 1) is None:
                return tried
        await self._release(sub.id, token)
        return tried

    async def _record(
        self, sub_id: str, token: str, event, result: DeliveryResult, latency_ms: int  # noqa: ANN001
    ) -> bool:
        """Record one attempt; False when the lease is no longer ours (deleted, taken over)."""
        s, now = self.settings, self.clock()
        async with self.db.unit_of_work() as uow:
            sub = (
                await uow.session.execute(
                    select(subscriptions)
                    .where(and_(subscriptions.c.id == sub_id, subscriptions.c.lease_token == token))
                    .with_for_update()
                )
            ).first()
            if sub is None:
                return False
            attempt = event.attempts + 1
            values: dict[str, Any] = {"updated_at": now}
            acknowledged = delivery_outcome(result.ok, result.status, attempt)
            if acknowledged is not None:  # 2xx, or a 409 to a redelivery: it already has it
                outcome = acknowledged
                values |= {"delivered_through": event.number, "consecutive_failures": 0}
                await uow.session.execute(
                    update(subscription_events).where(_one_event(sub_id, event.number))
                    .values(status="delivered", attempts=attempt, delivered_at=now)
                )
            else:
                failures = sub.consecutive_failures + 1
                values |= {"consecutive_failures": failures, "lease_token": None,
                           "leased_until": None}
                if should_pause(failures, s.subscription_pause_after_failures):
                    outcome = "paused"
                    values |= {"status": "paused", "paused_at": now, "next_attempt_at": None,
                               "paused_reason": result.response}
                    paused = _event(PAUSED, sub.practice, sub_id, now, {
                        "subscription": sub_id,
                        "consecutiveFailures": failures,
                        "reason": result.response[:1000],
                        "lastEventNumber": sub.last_event_number,
                        "deliveredThrough": sub.delivered_through,
                    })
                    await uow.outbox.add(PAUSED, paused)
                    if self.notifier is not None:
                        await tell_practice_paused(self.notifier, uow, sub, paused, now=now)
                else:
                    outcome = "retry"
                    delay = backoff_seconds(
                        failures, s.retry_backoff_seconds, s.retry_backoff_max_seconds
                    )
                    values["next_attempt_at"] = now + timedelta(seconds=delay)
                await uow.session.execute(
                    update(subscription_events).where(_one_event(sub_id, event.number))
                    .values(attempts=attempt)
                )
            await uow.session.execute(
                update(subscriptions).where(subscriptions.c.id == sub_id).values(**values)
            )
            await uow.session.execute(
                subscription_deliveries.insert().values(
                    subscription_id=sub_id,
                    practice=sub.practice,
                    number=event.number,
                    attempt=attempt,
                    outcome=outcome,
                    response=result.response,
                    latency_ms=latency_ms,
                    at=now,
                )
            )
            await uow.commit()
        log.info("subscription delivery", outcome=outcome, attempt=attempt, latency_ms=latency_ms)
        return True

    async def _release(self, sub_id: str, token: str) -> None:
        """End the lease; due again at once if events are still waiting (batch limit, new)."""
        now = self.clock()
        async with self.db.unit_of_work() as uow:
            sub = (
                await uow.session.execute(
                    select(subscriptions.c.id)
                    .where(and_(subscriptions.c.id == sub_id, subscriptions.c.lease_token == token))
                    .with_for_update()
                )
            ).first()
            if sub is None:
                return
            waiting = (
                await uow.session.execute(
                    select(func.count()).where(_pending(sub_id))
                )
            ).scalar_one()
            await uow.session.execute(
                update(subscriptions)
                .where(subscriptions.c.id == sub_id)
                .values(lease_token=None, leased_until=None,
                        next_attempt_at=now if waiting else None)
            )
            await uow.commit()
