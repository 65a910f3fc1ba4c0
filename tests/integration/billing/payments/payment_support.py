"""A closed month to pay, void and refund, the corrections that reissue it, and the figures
every invoice must show whatever happened to it (``assert_money_is_coherent``)."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import select

from ccm_billing.adapters import filed, orm
from ccm_billing.domain.payments import balance_of, payment_state
from ccm_shared.tables import outbox_table
from tests.support.contracts import assert_valid_event
from tests.unit.billing import events as ev

MONTH = "2025-03"
# Closed on 2 April; the Invoice is due 30 days later, on 2 May.
CLOSE_AT = datetime(2025, 4, 2, 12, tzinfo=UTC)
E2_DAY = "2025-03-17T10:00:00-04:00"


async def deliver(runtime, *events) -> None:  # noqa: ANN001
    """Each event through billing's consumer handler, one transaction each."""
    handler = runtime.definition.consumers(runtime)[0].handler
    for e in events:
        async with runtime.db.unit_of_work() as uow:
            await handler(e, uow)
            await uow.commit()


def march_events(practice: str) -> list:
    """p1: 25 + 20 staff minutes (99490 42.00 + 99439 33.33 = 75.33); p2 19:59, not billed."""
    return [*ev.enrolled_patient(practice, "p1"), *ev.enrolled_patient(practice, "p2"),
            ev.role(practice, "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
            ev.time_logged(practice, "p1", "e1", 1500, "2025-03-03T10:00:00-05:00"),
            ev.time_logged(practice, "p1", "e2", 1200, E2_DAY),
            ev.time_logged(practice, "p2", "e3", 1199, "2025-03-05T10:00:00-05:00")]


def lowered(practice: str, version: int):  # noqa: ANN201
    """p1's second Encounter reversed: the month is reissued at 42.00."""
    return ev.time_reversed(practice, "p1", "e2", version=version)


def raised(practice: str, version: int):  # noqa: ANN201
    """p1's second Encounter logged again: the month is reissued at 75.33."""
    return ev.time_logged(practice, "p1", "e2", 1200, E2_DAY, version=version)


def dropped(practice: str):  # noqa: ANN201
    """p1's consent entered in error: nothing is left to bill, cancelled without replacement."""
    return ev.consent(practice, "p1", "c-p1", status="entered-in-error", version=2)


async def outboxed(runtime, practice: str, topic: str) -> list[dict]:  # noqa: ANN001
    """The practice's events of ``topic`` in the outbox, in order, each checked against its
    contract."""
    o = outbox_table
    async with runtime.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(o.c.payload).where(
            o.c.topic == topic, o.c.tenant == practice).order_by(o.c.id))).scalars().all()
    events = [json.loads(r) for r in rows]
    for e in events:
        assert_valid_event(e)
    return events


async def money(runtime, practice: str) -> tuple[list, dict, dict]:  # noqa: ANN001
    """(the month's invoice rows by revision, their payments and refunds by invoice id)."""
    i, p, r = orm.invoices, orm.payments, orm.refunds
    async with runtime.db.unit_of_work() as uow:
        invoices = (await uow.session.execute(select(i).where(
            i.c.practice == practice, i.c.month == MONTH).order_by(i.c.revision))).all()
        ids = [x.id for x in invoices]
        pays, refunds = defaultdict(list), defaultdict(list)
        for x in (await uow.session.execute(select(p).where(p.c.invoice_id.in_(ids)))).all():
            pays[x.invoice_id].append(x)
        for x in (await uow.session.execute(select(r).where(r.c.invoice_id.in_(ids)))).all():
            refunds[x.invoice_id].append(x)
        resources = {x.id: (await filed.invoice_resource(uow.session, x))["status"]
                     for x in invoices}
    for x in invoices:
        assert resources[x.id] == x.status, (x.id, resources[x.id], x.status)  # FHIR agrees
    return invoices, pays, refunds


def total(rows) -> Decimal:  # noqa: ANN001
    return sum((Decimal(x.amount) for x in rows), Decimal("0.00"))


async def assert_money_is_coherent(runtime, practice: str) -> list:  # noqa: ANN001
    """Every invoice of the month: ``paid`` is its payments not voided less its refunds,
    ``refunded`` its refunds, its balance total − Σ payments counted + Σ refunds (a cancelled
    one: 0 when replaced, else what it paid net, owed back), its state the rule's; a payment
    and the copies carried of it are voided together, a replacement holds the payments and
    refunds of the invoice it replaces; one invoice at most is live.

    ``paid`` is negative only where a payment was voided after its overpayment was refunded:
    it is then minus the refunded money the practice owes back (domain/payments.py). A refund
    only ever paid back money received, so refunds never exceed the payments recorded."""
    invoices, pays, refunds = await money(runtime, practice)
    roots = defaultdict(set)
    for x in invoices:
        counted = total(y for y in pays[x.id] if y.voided_at is None)
        voided = total(y for y in pays[x.id] if y.voided_at is not None)
        refunded = total(refunds[x.id])
        assert (Decimal(x.paid), Decimal(x.refunded)) == (counted - refunded, refunded), x.id
        assert refunded <= counted + voided, x.id
        if Decimal(x.paid) < 0:
            assert voided > 0 and Decimal(0) - Decimal(x.paid) <= refunded, x.id
        balance = balance_of(x.total_net, x.paid, x.status, x.replaced_by)
        if x.status != "cancelled":
            assert balance == Decimal(x.total_net) - counted + refunded
            assert (x.payment_status, x.status) == payment_state(balance, Decimal(x.paid))
        elif x.replaced_by:
            assert balance == 0
        else:
            assert balance == refunded - counted
        for y in pays[x.id]:
            roots[y.carried_from or y.id].add((y.amount, y.voided_at, y.void_reason))
    assert all(len(v) == 1 for v in roots.values()), roots  # copies agree with the payment
    # A replacement holds every payment and refund of the invoice it replaces: the same money.
    for x in invoices:
        if x.replaced_by:
            for kind in (pays, refunds):
                held = {y.carried_from or y.id for y in kind[x.replaced_by]}
                assert {y.carried_from or y.id for y in kind[x.id]} <= held, (x.id, kind)
    assert sum(x.status != "cancelled" for x in invoices) <= 1
    return invoices
