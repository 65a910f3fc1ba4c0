"""What an invoice's money says: its balance and its payment state, from its total, what the
practice paid net (payments not voided, less refunds) and whether it was cancelled. Pure.

An invoice's ``paid`` is net: the sum of its payments not voided less the sum of its refunds, so
that ``balance = total - paid`` = total - Σ payments counted + Σ refunds. A refund is paid back
only out of what the practice overpaid (balance < 0), so it never changes the state: an invoice
whose balance a refund brings back to 0 stays balanced (settled). A void takes a payment out:
an invoice paid in full by it is issued again (and overdue when past its due date).

A void is never refused: the bank took the money back (or it never came), whatever was done
with it since. Voided after the overpayment it made was refunded, the payment leaves refunds
that no payment counted covers, and ``paid`` is negative: minus the refunded money the practice
owes back, on top of the total (``balance`` above the total). Nothing else makes ``paid``
negative (a refund never takes it below the total, or below 0 on an invoice cancelled without
replacement). The practice pays it back as any payment: the live invoice takes up to its
balance, and an invoice cancelled without replacement, which takes no other payment, takes the
refunded money it is owed back (``takes_payment``)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

ZERO = Decimal("0.00")


def balance_of(total_net: str | Decimal, paid: str | Decimal, status: str,
               replaced_by: str | None) -> Decimal:
    """What the practice still owes on an invoice; negative, what it is owed back (paid beyond
    the total a correction lowered, and not yet refunded). A cancelled invoice is owed nothing:
    its payments and refunds are carried into its replacement, or, where the correction left
    nothing to bill, what it paid net is owed back."""
    if status == "cancelled":
        return Decimal(0) if replaced_by else Decimal(0) - Decimal(paid)
    return Decimal(total_net) - Decimal(paid)


def payment_state(balance: Decimal, paid: Decimal) -> tuple[str, str]:
    """(payment status, status) of an invoice not cancelled: balanced once nothing is owed
    (overpaid, or refunded back to 0, included), partially paid while something was paid net
    and something is owed, else issued (nothing paid, or every payment voided or refunded)."""
    if balance <= 0:
        return "balanced", "balanced"
    return ("partially-paid" if paid > 0 else "issued"), "issued"


def reopened_overdue(was: str, status: str, due: date, today: date) -> bool:
    """Whether an invoice a void took back from balanced to issued is overdue at once: past its
    due date (the day after it, in the practice's time zone, as the scheduler flags invoices)."""
    return was == "balanced" and status == "issued" and due < today


def refundable(balance: Decimal) -> Decimal:
    """What may still be refunded on an invoice: what it owes back (0 when it owes nothing)."""
    return max(Decimal(0) - balance, ZERO)


def takes_payment(status: str, replaced_by: str | None, balance: Decimal) -> bool:
    """Whether an invoice takes a payment: one not cancelled does (up to its balance); a
    cancelled one only without a replacement (which would carry it) and while it is owed money,
    which is then refunded money paid back (its payment voided after the refund)."""
    if status != "cancelled":
        return True
    return replaced_by is None and balance > 0
