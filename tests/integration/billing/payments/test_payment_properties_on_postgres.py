"""Property (hypothesis), on PostgreSQL: whatever order payments, voids, refunds and
corrections (a month reissued lower or higher with its payments carried over, or cancelled with
nothing left to bill) arrive in, every invoice's balance is its total − Σ payments counted
(not voided) + Σ refunds, its state the rule's, a payment and its carried copies agree, no
refund pays back more than was overpaid, ``paid`` is negative only after a payment voided once
its overpayment was refunded (minus the refund owed back), a payment is taken by a live invoice
or by one cancelled without replacement that is owed a refund back, a voided payment's
reference is free again, and what is refused changes nothing."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from ccm_billing.domain.model import Month
from ccm_billing.domain.payments import balance_of, takes_payment
from ccm_billing.service_layer import invoicing
from ccm_shared.errors import AppError
from ccm_shared.migrate import upgrade
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tables import outbox_table
from ccm_shared.tenancy import create_practice
from ccm_shared.transport import InProcessTransport
from tests.integration.billing.payments.payment_support import (
    CLOSE_AT,
    MONTH,
    assert_money_is_coherent,
    deliver,
    dropped,
    lowered,
    march_events,
    money,
    outboxed,
    raised,
)
from tests.unit.billing.conftest import PRICING

cents = st.integers(1, 7533).map(lambda n: Decimal(n) / 100)
# How much of what is owed (or owed back) an operation takes: a third, half, all of it, a cent
# more than all (refused), or any amount.
SHARES = st.sampled_from(["third", "half", "all", "too much"]) | cents
PAY = st.tuples(st.just("pay"), SHARES)
PAY_ALL = st.tuples(st.just("pay"), st.just("all"))
VOID = st.tuples(st.just("void"), st.integers(0, 20))
REFUND = st.tuples(st.just("refund"), SHARES, st.sampled_from(["last", "first"]))
# A payment sent to a given invoice, cancelled ones included (taken only while one cancelled
# without replacement is owed a refund back).
PAY_TO = st.tuples(st.just("pay to"), SHARES, st.sampled_from(["last", "first"]))
CORRECT = st.tuples(st.just("correct"))  # lowered to 42.00, or back to 75.33
OPERATIONS = st.lists(st.one_of(
    PAY, PAY_ALL, VOID, VOID, REFUND, REFUND, CORRECT, CORRECT, PAY_TO,
    st.tuples(st.just("pay again"), st.integers(0, 9)),  # a reference sent again
    # Nothing left to bill (cancelled without replacement), one time in four it is drawn.
    st.tuples(st.just("drop"), st.integers(0, 3)),
), min_size=3, max_size=16)


def share(of: Decimal, how) -> Decimal:  # noqa: ANN001
    if isinstance(how, Decimal):
        return how
    part = {"third": of / 3, "half": of / 2, "all": of, "too much": of + Decimal("0.01")}[how]
    return max(part.quantize(Decimal("0.01")), Decimal("0.01"))


async def snapshot(runtime, practice: str) -> tuple:  # noqa: ANN001
    invoices, pays, refunds = await money(runtime, practice)
    async with runtime.db.unit_of_work() as uow:
        events = (await uow.session.execute(select(func.count()).select_from(outbox_table).where(
            outbox_table.c.tenant == practice))).scalar_one()
    return ([tuple(x) for x in invoices], {k: sorted(map(tuple, v)) for k, v in pays.items()},
            {k: sorted(map(tuple, v)) for k, v in refunds.items()}, events)


async def run(database_url: str, operations: list[tuple]) -> None:
    definition = discover_services()["billing"]
    runtime = ServiceRuntime.build(definition, load_settings(database_url=database_url),
                                   transport=InProcessTransport(), clock=lambda: CLOSE_AT)
    practice = f"prop-{uuid.uuid4().hex[:10]}"
    now = datetime(2025, 4, 10, 12, tzinfo=UTC)
    try:
        await create_practice(runtime.db.engine, practice_id=practice, name="prop",
                              timezone="America/New_York", pricing=PRICING)
        await deliver(runtime, *march_events(practice))
        async with runtime.db.unit_of_work() as uow:
            await invoicing.close_period(uow, practice, Month(2025, 3), CLOSE_AT)
            await uow.commit()
        version, references, voids, refunds = 2, [], set(), 0
        for op in operations:
            invoices, pays, _ = await money(runtime, practice)
            live = [x for x in invoices if x.status != "cancelled"]
            before = await snapshot(runtime, practice)
            accepted = True
            try:
                async with runtime.db.unit_of_work() as uow:
                    kind = op[0]
                    if kind == "drop" and op[1]:
                        continue
                    if kind in ("correct", "drop"):
                        if kind == "drop":
                            correction = dropped(practice)
                        else:
                            correction = (lowered if version % 2 == 0 else raised)(practice,
                                                                                  version)
                            version += 1
                        handler = runtime.definition.consumers(runtime)[0].handler
                        await handler(correction, uow)
                    elif kind in ("pay", "pay again"):
                        if not live:
                            continue
                        if kind == "pay":
                            owed = balance_of(live[0].total_net, live[0].paid, live[0].status,
                                              live[0].replaced_by)
                            references.append((f"chk-{len(references)}",
                                               share(max(owed, Decimal(0)), op[1])))
                        if not references:
                            continue
                        reference, amount = references[-1] if kind == "pay" else \
                            references[op[1] % len(references)]
                        result = await invoicing.record_payment(
                            uow, practice, live[0].id, amount=amount, paid_on=date(2025, 4, 10),
                            reference=reference, now=now)
                        # A new payment, or the one that counts with this reference: never a
                        # voided one (its reference is free for the payment that replaces it).
                        assert result["payment"]["voided"] is None, reference
                    elif kind == "pay to":
                        target = invoices[-1] if op[-1] == "last" else invoices[0]
                        owed = balance_of(target.total_net, target.paid, target.status,
                                          target.replaced_by)
                        amount = share(max(owed, Decimal(0)), op[1])
                        paid = await invoicing.record_payment(
                            uow, practice, target.id, amount=amount, paid_on=date(2025, 4, 10),
                            reference=f"to-{uuid.uuid4().hex[:8]}", now=now)
                        # Accepted: the invoice took payments, and owed at least this.
                        assert takes_payment(target.status, target.replaced_by, owed)
                        assert amount <= owed, (amount, owed)
                        if target.status == "cancelled":  # and stays so
                            assert paid["invoice"]["status"] == "cancelled"
                    elif kind == "void":
                        rows = [y for x in invoices for y in sorted(pays[x.id], key=str)]
                        if not rows:
                            continue
                        row = rows[op[1] % len(rows)]
                        await invoicing.void_payment(uow, practice, row.invoice_id, row.id,
                                                     reason="bounced", actor="t",
                                                     actor_label=None, now=now)
                        voids.add(row.carried_from or row.id)
                    else:
                        target = invoices[-1] if op[-1] == "last" else invoices[0]
                        owed = Decimal(0) - balance_of(target.total_net, target.paid,
                                                       target.status, target.replaced_by)
                        amount = share(max(owed, Decimal(0)), op[1])
                        await invoicing.record_refund(uow, practice, target.id, amount=amount,
                                                      refunded_on=date(2025, 4, 20),
                                                      reference=None, now=now)
                        # Accepted: the invoice owed at least this back.
                        assert amount <= owed and not (target.status == "cancelled"
                                                       and target.replaced_by), (amount, owed)
                        refunds += 1
                    await uow.commit()
            except AppError:
                accepted = False
            event(f"{op[0]}: {'done' if accepted else 'refused'}")
            if not accepted:  # refused: nothing changed, no event
                assert await snapshot(runtime, practice) == before, op
            invoices = await assert_money_is_coherent(runtime, practice)
            if any(Decimal(x.paid) < 0 for x in invoices):
                event("paid negative: a refund owed back")
        # One event per payment voided (however many of its records, however often asked).
        assert len(await outboxed(runtime, practice, "billing.payment.voided.v1")) == len(voids)
        assert len(await outboxed(runtime, practice, "billing.payment.refunded.v1")) == refunds
        invoices, *_ = await money(runtime, practice)
        assert {x.month for x in invoices} == {MONTH}
        event(f"invoices at the end: {len(invoices)}")
    finally:
        await runtime.db.dispose()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(OPERATIONS)
# Always among the examples: paid, lowered, refunded, the payment voided, raised again …
@example([("pay", "all"), ("correct",), ("refund", "half", "last"), ("void", 0),
          ("correct",), ("refund", "all", "first"), ("pay", "all"), ("void", 3)])
# … paid in two, one voided through the cancelled invoice after the correction, the rest refunded
@example([("pay", "half"), ("pay", "all"), ("correct",), ("void", 1), ("refund", "all", "last"),
          ("pay again", 0), ("correct",), ("refund", "all", "last")])
# … refunded in full, then nothing left to bill: the cancelled invoice owes back, is refunded
@example([("pay", "all"), ("correct",), ("refund", "all", "last"), ("drop", 0),
          ("refund", "too much", "last"), ("refund", "all", "last"), ("void", 2),
          ("refund", "all", "last")])
# … the invoice of the brief: overpaid, the overpayment refunded, the payment voided (the refund
# owed back), then paid back in full; a voided reference sent again
@example([("pay", "all"), ("correct",), ("refund", "all", "last"), ("void", 0),
          ("pay", "all"), ("pay again", 0), ("refund", "all", "last")])
# … nothing left to bill, refunded, voided: the cancelled invoice takes the refund back, no more
@example([("pay", "all"), ("drop", 0), ("refund", "all", "last"), ("void", 0),
          ("pay to", "too much", "last"), ("pay to", "half", "last"), ("pay to", "all", "last"),
          ("pay to", "third", "last"), ("correct",)])
# … a payment recorded in error, voided, and the right one sent with the same reference
@example([("pay", "half"), ("void", 0), ("pay again", 0), ("pay again", 0), ("void", 1),
          ("pay again", 0)])
def test_balances_hold_whatever_order_money_and_corrections_arrive_in(infra, operations):
    if not test_balances_hold_whatever_order_money_and_corrections_arrive_in.migrated:
        definition = discover_services()["billing"]
        upgrade(infra.database_url, definition.schema, definition.migrations_package)
        test_balances_hold_whatever_order_money_and_corrections_arrive_in.migrated = True
    asyncio.run(run(infra.database_url, operations))


test_balances_hold_whatever_order_money_and_corrections_arrive_in.migrated = False
