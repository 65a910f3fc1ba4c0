"""Practice-level messages (pure): who receives them, what an invoice's figures say, and when a
notice held for a recipient has become obsolete and is withdrawn rather than sent late.

A practice-level message is addressed to the practice's contacts (its summary recipients, else
its clinical supervisor), not to a practitioner an event names. One that arrives before the
practice configured any contact is held (pending, no attempt time) and sent once a contact is
configured. Per kind, what makes a held one obsolete:

- ``invoice-issued``: the invoice it announces was cancelled (``billing.invoice.cancelled.v1``;
  a replacement has a message of its own, a correction that left nothing to bill an
  ``invoice-cancelled`` message). A cancellation consumed before the invoice's ``issued`` event
  (another topic) means its message is never made: recorded as not sent. The same holds for
  one addressed but not sent yet (due, or waiting for a retry): it is withdrawn, not sent late.
- ``consent-expiring``: the consent was revoked, declined or voided, or a permitting CCM consent
  of the same patient (the same one extended, or a new one) was granted that covers days after
  the one the notice announces (``renews``). An expiry that passed while held does not make it
  obsolete: the practice still needs a renewed consent to bill.
- ``subscription-paused``: the subscription was resumed or deleted (the pause it announces is
  over).
- ``utilization-summary`` and ``invoice-cancelled``: never (what happened in a closed month, or
  to an invoice, stays true); sent late.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

PRACTICE_KINDS = frozenset({
    "invoice-issued", "invoice-cancelled", "utilization-summary", "consent-expiring",
    "subscription-paused",
})
# The key suffix of a practice-level message recorded while the practice had no contact.
NO_CONTACT = "no-recipient"
# The key suffix of an ``invoice-issued`` recorded as not sent: its invoice's cancellation was
# consumed before its ``issued`` event (they travel on separate topics).
CANCELLED_FIRST = "cancelled-first"


def cancelled_why(replaced_by: str | None) -> str:
    """What an invoice's cancellation notice adds about its replacement, if it has one."""
    return f" (replaced by invoice {replaced_by})" if replaced_by else ""


def cancelled_before_sent(invoice_id: str, why: str) -> str:
    """Why an ``invoice-issued`` message addressed but not sent yet (due, or waiting for a
    retry) is withdrawn: its invoice was cancelled first (``why``: ``cancelled_why``)."""
    return f"not sent: invoice {invoice_id} was cancelled{why} before this message was sent"


def practice_recipients(summary_recipients: Iterable[str] | None,
                        supervisor: str | None) -> list[str]:
    """Who gets a practice-level message: its summary recipients, else its clinical supervisor
    (in the order configured, each once); nobody when neither is set."""
    recipients = list(dict.fromkeys(r for r in summary_recipients or () if r))
    if not recipients and supervisor:
        recipients = [supervisor]
    return recipients


def _amount(text: str | None) -> Decimal | None:
    """Billing's money text as a number; None when absent or no number."""
    if text is None:
        return None
    try:
        return Decimal(text)
    except (InvalidOperation, TypeError, ValueError):
        return None


def owed(balance: str | None) -> tuple[str | None, str | None]:
    """(amount due, amount owed back) from billing's ``balance`` (negative: owed back), each as
    a positive amount with two decimals, or None when it does not apply."""
    if (value := _amount(balance)) is None:
        return None, None
    return (f"{value:.2f}" if value > 0 else None, f"{-value:.2f}" if value < 0 else None)


def refund_owed(paid: str | None) -> str | None:
    """The refund the practice owes back, from billing's ``paid`` on an invoice (a positive
    amount with two decimals), or None. ``paid`` is negative only after a payment was voided
    once its overpayment had been refunded: the refunded money is then owed back (it counts in
    the balance due), and nothing was "already paid"."""
    value = _amount(paid)
    return f"{-value:.2f}" if value is not None and value < 0 else None


def cancelled_without_replacement(data: dict) -> bool:
    """A ``billing.invoice.cancelled.v1`` says no invoice replaces the cancelled one (a
    correction left nothing to bill): ``replacedBy`` present and null. An event without the
    property cannot tell, and is taken as replaced (no message rather than a wrong one)."""
    return "replacedBy" in data and data["replacedBy"] is None


def cancelled_values(data: dict) -> dict:
    """The ``invoice-cancelled`` fields of a ``billing.invoice.cancelled.v1`` event."""
    amount_due, owed_back = owed(data.get("balance"))
    return {
        "invoice_id": data["invoiceId"],
        "month": data["month"],
        "revision": data["revision"],
        "total_net": data["totalNet"],
        "reason": data.get("reason"),
        "paid": data.get("paid"),
        "balance": data.get("balance"),
        "amount_due": amount_due,
        "owed_back": owed_back,
    }


def last_day_covered(end: str | None, tz: ZoneInfo) -> date | None:
    """The last day (the practice's, in ``tz``) a period ending at ``end`` covers, as ingest
    reads a consent's ``provision.period.end``: a dateTime the day it is in ``tz``, a date as
    written, a partial one its last day. None: no end (it covers every later day)."""
    if not end:
        return None
    if "T" in end:
        try:
            moment = datetime.fromisoformat(end.replace("Z", "+00:00"))
            return moment.date() if moment.tzinfo is None else moment.astimezone(tz).date()
        except (ValueError, OverflowError):  # past the calendar's end in ``tz``, as ingest
            return date.fromisoformat(end[:10])
    if len(end) == 4:
        return date(int(end), 12, 31)
    if len(end) == 7:
        year, month = int(end[:4]), int(end[5:7])
        return date(year, month, calendar.monthrange(year, month)[1])
    return date.fromisoformat(end[:10])


def renews(expires_on: str, provision: str | None, period_end: str | None,
           tz: ZoneInfo) -> bool:
    """A granted consent (``provision``, ``period_end``) renews a consent noticed as covering
    until ``expires_on``: it permits, and covers a day after that one (or has no end). An end
    that cannot be read renews nothing (the notice is sent)."""
    if provision == "deny":
        return False
    try:
        covered = last_day_covered(period_end, tz)
        noticed = date.fromisoformat(expires_on)
    except (ValueError, TypeError):
        return False
    return covered is None or covered > noticed
