"""The state rules of an invoice's money (domain/payments.py), one row per case: payments,
voids, refunds and corrections as the figures they leave."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from ccm_billing.domain.payments import balance_of, payment_state, refundable, reopened_overdue

D = Decimal


@pytest.mark.parametrize(("case", "total", "payments", "voided", "refunds", "state"), [
    ("nothing paid", "75.33", [], [], [], ("issued", "issued")),
    ("paid in part", "75.33", ["50.00"], [], [], ("partially-paid", "issued")),
    ("paid in full", "75.33", ["50.00", "25.33"], [], [], ("balanced", "balanced")),
    ("overpaid: a correction lowered the total", "42.00", ["75.33"], [], [],
     ("balanced", "balanced")),
    ("overpaid, refunded in part", "42.00", ["75.33"], [], ["20.00"], ("balanced", "balanced")),
    ("overpaid, refunded back to 0: settled", "42.00", ["75.33"], [], ["33.33"],
     ("balanced", "balanced")),
    ("the only payment voided", "75.33", ["75.33"], ["75.33"], [], ("issued", "issued")),
    ("one of two payments voided", "75.33", ["50.00", "25.33"], ["50.00"], [],
     ("partially-paid", "issued")),
    ("a partial payment voided", "75.33", ["10.00"], ["10.00"], [], ("issued", "issued")),
    ("overpaid, a void still leaves it paid", "42.00", ["50.00", "25.33"], ["25.33"], [],
     ("balanced", "balanced")),
    ("voided after its refund: the refund is owed too", "42.00", ["75.33"], ["75.33"],
     ["33.33"], ("issued", "issued")),
    ("voided after a refund, paid net nothing", "42.00", ["10.00", "65.33"], ["65.33"],
     ["33.33"], ("issued", "issued")),
    ("voided after a refund, something paid net", "42.00", ["40.00", "35.33"], ["35.33"],
     ["33.33"], ("partially-paid", "issued")),
    ("a zero total (nothing billed)", "0.00", [], [], [], ("balanced", "balanced")),
])
def test_payment_state(case, total, payments, voided, refunds, state):
    counted = sum(map(D, payments), D(0)) - sum(map(D, voided), D(0))
    paid = counted - sum(map(D, refunds), D(0))  # what an invoice row keeps: net
    balance = balance_of(total, paid, "issued", None)
    assert balance == D(total) - counted + sum(map(D, refunds), D(0)), case
    assert payment_state(balance, paid) == state, case


@pytest.mark.parametrize(("case", "total", "paid", "status", "replaced_by", "balance"), [
    ("issued", "75.33", "50.00", "issued", None, "25.33"),
    ("overpaid", "42.00", "75.33", "balanced", None, "-33.33"),
    ("refunded back to 0", "42.00", "42.00", "balanced", None, "0.00"),
    ("after a void of a refunded payment", "42.00", "-33.33", "issued", None, "75.33"),
    ("cancelled and replaced: its money moved on", "75.33", "75.33", "cancelled", "r1", "0.00"),
    ("cancelled, nothing left to bill: owed back", "75.33", "75.33", "cancelled", None,
     "-75.33"),
    ("cancelled, refunded", "75.33", "0.00", "cancelled", None, "0.00"),
    ("cancelled, refunded, then the payment voided", "75.33", "-75.33", "cancelled", None,
     "75.33"),
])
def test_balance(case, total, paid, status, replaced_by, balance):
    assert balance_of(total, paid, status, replaced_by) == D(balance), case


@pytest.mark.parametrize(("balance", "owed"), [
    ("-33.33", "33.33"), ("-0.01", "0.01"), ("0.00", "0.00"), ("12.00", "0.00")])
def test_what_may_be_refunded_is_what_is_owed_back(balance, owed):
    assert refundable(D(balance)) == D(owed)


DUE = date(2025, 5, 2)


@pytest.mark.parametrize(("case", "was", "status", "today", "overdue"), [
    ("paid in full, voided after the due date", "balanced", "issued", date(2025, 5, 3), True),
    ("voided on the due date: not yet", "balanced", "issued", DUE, False),
    ("voided before the due date", "balanced", "issued", date(2025, 4, 15), False),
    ("still overpaid after the void", "balanced", "balanced", date(2025, 6, 1), False),
    ("partly paid before and after: the scheduler's", "issued", "issued", date(2025, 6, 1),
     False),
])
def test_an_invoice_a_void_reopens_past_its_due_date_is_overdue_at_once(case, was, status,
                                                                        today, overdue):
    assert reopened_overdue(was, status, DUE, today) is overdue, case
