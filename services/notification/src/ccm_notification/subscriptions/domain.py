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
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from ccm_notification.domain.signing import derive_key

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
    """A never-rotated subscription's signing secret, derived from ``CCM_SECRET_KEY`` and the
    subscription's salt (nothing secret stored; rotating the key changes it)."""
    mac = hmac.new(
        derive_key(secret_key, "subscription"), f"{subscription}:{salt}".encode(), hashlib.sha256
    )
    return "whsec_" + mac.hexdigest()


# -- secret rotation ------------------------------------------------------------------------------

# How long the secret a rotation replaces keeps signing deliveries beside the new one (hours;
# 0 ends it at once: a leaked secret). Chosen per rotation within these bounds.
DEFAULT_OVERLAP_HOURS = 24
MAX_OVERLAP_HOURS = 7 * 24
# Earlier secrets still signing at once (a rotation repeated within the overlap, e.g. after its
# response was lost, keeps the one the receiver has): the oldest beyond it ends at the rotation.
MAX_EARLIER_SECRETS = 3


def new_secret() -> str:
    """A rotated-in signing secret: random, the same form as a derived one (``whsec_`` + 64 hex
    digits), so a receiver's key handling does not change."""
    return "whsec_" + secrets.token_hex(32)


@dataclass(frozen=True)
class SigningSecret:
    """One secret of a rotated subscription: ``generation`` 0 is the derived one it had before
    its first rotation; ``valid_until`` None is the current one."""

    generation: int
    secret: str
    valid_until: datetime | None = None


def rotate(
    kept: Sequence[SigningSecret], new: str, now: datetime, overlap: timedelta
) -> list[SigningSecret]:
    """A subscription's secrets after a rotation to ``new``, newest first: ``new`` is current,
    the secret it replaces signs beside it for ``overlap`` more, an earlier one still valid
    keeps signing at most as long (so ``overlap`` 0 ends every earlier secret now), and at most
    ``MAX_EARLIER_SECRETS`` earlier ones are kept; expired ones are dropped."""
    if not kept:
        raise ValueError("a rotation needs the secret it replaces")
    ends = now + overlap
    earlier = [
        SigningSecret(s.generation, s.secret,
                      ends if s.valid_until is None else min(s.valid_until, ends))
        for s in sorted(kept, key=lambda s: s.generation, reverse=True)
    ]
    earlier = [s for s in earlier if s.valid_until > now][:MAX_EARLIER_SECRETS]
    current = SigningSecret(max(s.generation for s in kept) + 1, new, None)
    return [current, *earlier]


def signing_secrets(kept: Sequence[SigningSecret], now: datetime) -> list[str]:
    """The secrets a delivery at ``now`` is signed with: the current one first, then the
    earlier ones still in their overlap, newest first (the oldest last: a receiver reading only
    the last ``v1``, as the verification snippet before rotation did, still verifies with the
    secret it had until the overlap ends)."""
    ordered = sorted(kept, key=lambda s: s.generation, reverse=True)
    return [s.secret for s in ordered if s.valid_until is None or s.valid_until > now]


def signature_header(secrets_: Sequence[str], timestamp: int, body: bytes) -> str:
    """``X-CCM-Signature`` signed with each secret: ``t=<t>,v1=<hex>[,v1=<hex>…]`` (one ``v1``
    per secret, in the order given)."""
    if not secrets_:
        raise ValueError("a delivery is signed with at least one secret")
    signed = f"{timestamp}.".encode() + body
    macs = (hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in secrets_)
    return ",".join([f"t={timestamp}", *(f"v1={mac}" for mac in macs)])


def verify_signature(
    secret: str, header: str, body: bytes, now: int, tolerance: int = 300
) -> bool:
    """What a receiver does (the README's snippet): the timestamp within ``tolerance`` seconds
    and any one ``v1`` of the header the HMAC of ``"<t>." + body`` with ``secret``."""
    try:
        pairs = [part.split("=", 1) for part in header.split(",")]
        timestamp = int(dict(pairs)["t"])
    except (ValueError, KeyError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body,
                        hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, value) for name, value in pairs if name == "v1")


def ping(*, subscription: str, practice: str, ping_id: str, time: str) -> dict[str, Any]:
    """The body of a test delivery (``POST …/test``): signed like an event notification but no
    event: no ``eventNumber``, nothing numbered, nothing to do but verify and answer 2xx."""
    return {"type": "ping", "subscription": subscription, "practice": practice, "id": ping_id,
            "time": time}


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
    PING = "ping"  # a genuine test delivery (``POST …/test``): answer 2xx, nothing to do
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
        if not verify_signature(self.secret, signature, body, now, self.tolerance):
            return Verdict.REFUSED
        notification = json.loads(body)
        if notification.get("type") == "ping":
            return Verdict.PING
        event_number = notification["eventNumber"]  # from the signed body, not a header
        return Verdict.DUPLICATE if event_number in self.processed else Verdict.NEW

    def receive(
        self, signature: str, body: bytes, now: int, work: Callable[[dict[str, Any]], None]
    ) -> int:
        """The HTTP status to answer: 401 when refused; 200 for a duplicate or a ping (``work``
        not called) and for a new event once ``work`` returned (an exception in it answers
        nothing: the platform retries, and the event is still new then)."""
        verdict = self.check(signature, body, now)
        if verdict is Verdict.REFUSED:
            return 401
        if verdict is Verdict.NEW:
            notification = json.loads(body)
            work(notification)
            self.processed.add(notification["eventNumber"])
        return 200
