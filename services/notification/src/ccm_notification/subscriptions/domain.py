"""Pure rules of practice subscriptions: which events a practice sees, how they are numbered,
what a webhook notification looks like, and how a receiver verifies one.

Tenant safety lives here: the target practice of a fanned-out event is the event's ``tenant``
and nothing else; no subscriber-controlled value takes part in choosing it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from ccm_notification.domain.signing import derive_key, verify_webhook

# billing's practice-facing events (the "feed"); topic name == event type.
FEED_TYPES: tuple[str, ...] = (
    "billing.invoice.issued.v1",
    "billing.invoice.cancelled.v1",
    "billing.invoice.paid.v1",
    "billing.invoice.overdue.v1",
    "billing.payment.recorded.v1",
    "billing.payment.voided.v1",
    "billing.payment.refunded.v1",
    "billing.period.closed.v1",
    "billing.threshold.at-risk.v1",
)
# Contracts without a ``practiceSequence`` data property: the number is in the envelope only.
NO_DATA_SEQUENCE = frozenset({"billing.threshold.at-risk.v1"})
FEED_COUNTER = "practice-feed"  # the outbox sequence counter (tenant, subject) of the feed
# The event_sequences counter (practice, subject) holding the last billing number fanned out
FEED_POSITION = "practice-feed-position"
PAYLOAD_MODES = ("id-only", "full-resource")

# The same rule as the practice registry, and no dots: ``ccm.practice.<id>.`` must stay a prefix
# that matches exactly one practice.
_PRACTICE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class UnsafeTenant(Exception):
    """An event whose tenant is not a well-formed practice id: it is never fanned out."""


def target_practice(tenant: str) -> str:
    """The one practice an event is delivered to: its tenant, checked to be a practice id."""
    if not _PRACTICE.fullmatch(tenant or ""):
        raise UnsafeTenant("event tenant is not a practice id")
    return tenant


def feed_data(event_type: str, data: dict[str, Any], practice_sequence: int) -> dict[str, Any]:
    """The event's data as published to the practice: the contract's data with the feed number
    as ``practiceSequence`` and billing's own (the ``practiceSequence`` billing gave it) as
    ``billingSequence``, so a reader of the Kafka copy sees an event lost before the feed as a
    gap in it. An event billing did not number carries no ``billingSequence``."""
    if event_type in NO_DATA_SEQUENCE:
        return dict(data)
    out = {k: v for k, v in data.items() if k != "billingSequence"}  # only billing's, below
    billing = producer_sequence(event_type, data)
    if billing is not None:
        out["billingSequence"] = billing
    return {**out, "practiceSequence": practice_sequence}


def producer_sequence(event_type: str, data: dict[str, Any]) -> int | None:
    """Billing's own per-practice number of an event (``practiceSequence``), which orders the
    practice's invoice, payment and period events; None where billing gives none (at-risk)."""
    if event_type in NO_DATA_SEQUENCE:
        return None
    value = data.get("practiceSequence")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def releasable(
    held: list[tuple[int, datetime]], position: int, now: datetime, hold: timedelta
) -> tuple[int, int]:
    """Of the held events (billing number, when held; in number order), how many go out now, and
    the practice's position after them. The next one goes when it is the number after
    ``position`` (or one already passed), or when the oldest still held has waited ``hold``:
    billing numbers events the feed does not carry too, and an event may be late or lost, so a
    gap is waited for a bounded time, never for ever."""
    count = 0
    for i, (sequence, _) in enumerate(held):
        waited = now - min(at for _, at in held[i:])
        if sequence > position + 1 and waited < hold:
            break
        position, count = max(position, sequence), count + 1
    return count, position


def wants(event_types: list[str], event_type: str) -> bool:
    return event_type in event_types


@dataclass(frozen=True)
class FeedEvent:
    """An event as the practice's feed carries it (after numbering): ``practice_sequence`` is
    the feed's own number, ``billing_sequence`` billing's (its ``practiceSequence`` as billing
    made it; None for an event billing does not number)."""

    id: str
    type: str
    time: str
    subject: str | None
    practice_sequence: int
    data: dict[str, Any]
    billing_sequence: int | None = None


# What an id-only notification names besides its ``focus``, per event type (properties of the
# event's data, under the same names): enough to act on without the data. A closed month is no
# FHIR resource: its notification names the month and its invoice (its focus stays the
# practice's Organization reference it always was: webhook bodies change only additively).
NAMED: dict[str, tuple[str, ...]] = {
    "billing.payment.recorded.v1": ("invoiceId", "paymentId"),
    "billing.payment.voided.v1": ("invoiceId", "paymentId"),
    "billing.payment.refunded.v1": ("invoiceId", "refundId"),
    "billing.period.closed.v1": ("month", "invoiceId"),
}


def notification(
    *, subscription: str, practice: str, number: int, mode: str, event: FeedEvent
) -> dict[str, Any]:
    """The webhook body: an event notification with the subscription's own event number.

    Modelled on the FHIR Subscriptions backport: ``eventNumber`` is events-since-subscription-
    start, ``focus`` the resource concerned; ``billingSequence`` is
    billing's own number of the event (a gap in it, over the eight numbered types, is an event
    lost before the feed); payment and period events also name their payment, refund, month
    and invoice (``NAMED``). ``full-resource`` adds the event's data (for invoice events the
    FHIR R4 Invoice under ``data.invoice``), ``id-only`` does not.
    """
    described: dict[str, Any] = {
        "id": event.id,
        "type": event.type,
        "time": event.time,
        "focus": event.subject,
        "practiceSequence": event.practice_sequence,
        "billingSequence": event.billing_sequence,
    }
    for name in NAMED.get(event.type, ()):
        described[name] = event.data.get(name)
    body: dict[str, Any] = {
        "type": "event-notification",
        "subscription": subscription,
        "practice": practice,
        "eventNumber": number,
        "content": mode,
        "event": described,
    }
    if mode == "full-resource":
        body["data"] = event.data
    return body


def subscription_secret(secret_key: str, subscription: str, salt: str) -> str:
    """A subscription's signing secret, derived (nothing secret is stored in the database)."""
    mac = hmac.new(
        derive_key(secret_key, "subscription"), f"{subscription}:{salt}".encode(), hashlib.sha256
    )
    return "whsec_" + mac.hexdigest()


def should_pause(consecutive_failures: int, pause_after: int) -> bool:
    return consecutive_failures >= pause_after


# A receiver's answer to a delivery it already has (processed before: the acknowledgement was
# lost, or it read the event from ``/events`` first): 2xx is the documented answer; a 409 is
# taken as the same acknowledgement, so a receiver written to the earlier advice ("reject an
# eventNumber you already processed") does not pause its own subscription.
ALREADY_HAD = 409


def delivery_outcome(ok: bool, status: int | None, attempt: int) -> str | None:
    """How a delivery attempt counts: ``delivered`` (2xx), ``duplicate`` (a 409 to a redelivery,
    ``attempt`` 2 or more: the receiver already has the event, whose first acknowledgement was
    lost; acknowledged the same) or None (failed: retried, then paused). A 409 to a first
    attempt is a failure: the receiver (or a gateway before it) refused an event it cannot have
    had, and taking that as delivered would drop the event unseen."""
    if ok:
        return "delivered"
    return "duplicate" if status == ALREADY_HAD and attempt > 1 else None


class Verdict(Enum):
    """What a receiver makes of one delivery (``Receiver.check``)."""

    NEW = "new"  # genuine and not processed yet: do the work, then answer 2xx
    DUPLICATE = "duplicate"  # genuine, processed before: answer 2xx, do nothing again
    REFUSED = "refused"  # bad signature or a timestamp outside the tolerance: answer 401


@dataclass
class Receiver:
    """The documented verification a receiver runs on every delivery (README: "Verifying").

    Refuse (401) only what is not genuine: a signature that does not match the raw body, or a
    timestamp more than ``tolerance`` seconds from the receiver's clock (an old delivery
    replayed). A genuine delivery of an event number already processed is a redelivery (the
    answer to the first one was lost or came after the timeout): acknowledge it (2xx) without
    doing the work again. Refusing it would make the platform retry it until the subscription
    pauses. A number above the last one plus one means events are missing: fetch
    ``/events?since=<last processed>``.
    """

    secret: str
    tolerance: int = 300
    processed: set[int] = field(default_factory=set)

    def check(self, signature: str, body: bytes, now: int) -> Verdict:
        if not verify_webhook(self.secret, signature, body, now, self.tolerance):
            return Verdict.REFUSED
        event_number = json.loads(body)["eventNumber"]  # from the signed body, not a header
        return Verdict.DUPLICATE if event_number in self.processed else Verdict.NEW

    def receive(
        self, signature: str, body: bytes, now: int, work: Callable[[dict[str, Any]], None]
    ) -> int:
        """The HTTP status to answer: 401 when refused; 200 for a duplicate (``work`` not
        called) and for a new event once ``work`` returned (an exception in it answers
        nothing: the platform retries, and the event is still new then)."""
        verdict = self.check(signature, body, now)
        if verdict is Verdict.REFUSED:
            return 401
        if verdict is Verdict.NEW:
            notification = json.loads(body)
            work(notification)
            self.processed.add(notification["eventNumber"])
        return 200
