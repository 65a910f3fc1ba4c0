"""Which invoice takes a payment (domain/payments.py ``takes_payment``), one row per case, and
what a payment voided after its overpayment was refunded leaves: ``paid`` negative, minus the
refund owed back, and a balance above the total that a payment settles."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ccm_billing.domain.payments import balance_of, payment_state, takes_payment

D = Decimal


@pytest.mark.parametrize(("case", "status", "replaced_by", "total", "paid", "takes"), [
    ("issued, nothing paid", "issued", None, "75.33", "0.00", True),
    ("partly paid", "issued", None, "75.33", "50.00", True),
    # Taken up to its balance: a payment of a settled invoice is refused as too much (422).
    ("paid in full", "balanced", None, "75.33", "75.33", True),
    ("a refund voided out from under it: owes the total and the refund", "issued", None,
     "42.00", "-33.33", True),
    ("cancelled and replaced: the replacement takes it", "cancelled", "r1", "75.33", "-75.33",
     False),
    ("cancelled, nothing left to bill, paid: owed back, not owing", "cancelled", None, "75.33",
     "75.33", False),
    ("cancelled, nothing left to bill, refunded: owes nothing", "cancelled", None, "75.33",
     "0.00", False),
    ("cancelled, refunded, then the payment voided: owes the refund back", "cancelled", None,
     "75.33", "-75.33", True),
    ("cancelled, the refund partly paid back", "cancelled", None, "75.33", "-0.01", True),
])
def test_which_invoice_takes_a_payment(case, status, replaced_by, total, paid, takes):
    balance = balance_of(total, paid, status, replaced_by)
    assert takes_payment(status, replaced_by, balance) is takes, case


@pytest.mark.parametrize(("case", "total", "payments", "voided", "refunds", "paid", "balance",
                          "state"), [
    ("the brief's: 100.00 billed, 150.00 paid, 50.00 refunded, the 150.00 voided", "100.00",
     ["150.00"], ["150.00"], ["50.00"], "-50.00", "150.00", ("issued", "issued")),
    ("then 50.00 paid back: nothing paid net of the invoice yet", "100.00",
     ["150.00", "50.00"], ["150.00"], ["50.00"], "0.00", "100.00", ("issued", "issued")),
    ("then 60.00 more: paid in part", "100.00", ["150.00", "50.00", "60.00"], ["150.00"],
     ["50.00"], "60.00", "40.00", ("partially-paid", "issued")),
    ("then all of it: settled", "100.00", ["150.00", "50.00", "100.00"], ["150.00"],
     ["50.00"], "100.00", "0.00", ("balanced", "balanced")),
    ("a void that leaves the refund covered: never negative", "42.00", ["50.00", "25.33"],
     ["25.33"], ["8.00"], "42.00", "0.00", ("balanced", "balanced")),
])
def test_a_void_after_a_refund_leaves_the_refund_owed_back(case, total, payments, voided,
                                                          refunds, paid, balance, state):
    counted = sum(map(D, payments), D(0)) - sum(map(D, voided), D(0))
    refunded = sum(map(D, refunds), D(0))
    net = counted - refunded
    assert net == D(paid), case
    assert balance_of(total, net, "issued", None) == D(balance), case
    # Negative only by the refund the payments that count no longer cover.
    assert max(D(0) - net, D(0)) == max(refunded - counted, D(0)), case
    assert payment_state(D(balance), net) == state, case
