"""A payment, a void and a refund take what they wrote from the statement that wrote it
(RETURNING): none reads back a row it has just inserted or updated. On the embedded database
(SQLite, as `ccm up` runs billing); the statements are the same on PostgreSQL."""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal

from sqlalchemy import event

from ccm_billing.adapters import orm
from ccm_billing.domain.model import Month
from ccm_billing.service_layer import invoicing
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import deliver, march_practice

CLOSE_AT = datetime(2025, 4, 2, 12, tzinfo=UTC)
MONEY = ("invoices", "payments", "refunds")
# A row lock (``invoicing.locked_invoice``): the row written unchanged, read as it is locked.
LOCK = re.compile(r"UPDATE \S*invoices SET paid=\S*invoices\.paid ", re.IGNORECASE)


@contextmanager
def statements(runtime):  # noqa: ANN001, ANN201
    """The SQL the engine runs inside the block, in order."""
    seen: list[str] = []

    def record(conn, cursor, sql, params, context, executemany):  # noqa: ANN001, ANN202
        seen.append(" ".join(sql.split()))

    engine = runtime.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def written_then_read(seen: list[str]) -> list[str]:
    """The reads of a money table after a statement wrote to it (a row lock writes nothing)."""
    written, found = set(), []
    for sql in seen:
        verb = sql.split(" ", 1)[0].upper()
        for table in MONEY:
            named = re.search(rf"\b(?:\w+\.)?{table}\b", sql)
            if not named:
                continue
            if verb == "SELECT" and table in written:
                found.append(sql)
            elif verb in ("INSERT", "UPDATE") and not LOCK.match(sql) and re.match(
                    rf"(?:INSERT INTO|UPDATE) (?:\w+\.)?{table}\b", sql, re.IGNORECASE):
                written.add(table)
    return found


async def overpaid(runtime) -> tuple[str, str]:  # noqa: ANN001
    """March closed at 75.33 and paid, then corrected to 42.00 (owed 33.33 back): (the
    replacement, its copy of the payment)."""
    await march_practice(runtime)
    async with runtime.db.unit_of_work() as uow:
        invoice = (await invoicing.close_period(uow, "alpha", Month(2025, 3), CLOSE_AT))[
            "invoice"]["id"]
        await uow.commit()
    async with runtime.db.unit_of_work() as uow:
        await invoicing.record_payment(uow, "alpha", invoice, amount=Decimal("75.33"),
                                       paid_on=date(2025, 4, 10), reference="chk-1",
                                       now=CLOSE_AT)
        await uow.commit()
    await deliver(runtime, ev.time_reversed("alpha", "p1", "e2", version=2))  # 42.00
    async with runtime.db.unit_of_work() as uow:
        row = await invoicing.get_invoice_row(uow.session, invoice)
        replacement = await invoicing.get_invoice_row(uow.session, row.replaced_by)
        copy = (await uow.session.execute(orm.payments.select().where(
            orm.payments.c.invoice_id == replacement.id))).one()
    return replacement.id, copy.id


async def test_a_payment_a_refund_and_a_void_read_back_nothing_they_wrote(billing):
    replacement, copy = await overpaid(billing)
    async with billing.db.unit_of_work() as uow:
        with statements(billing) as seen:
            refund = await invoicing.record_refund(
                uow, "alpha", replacement, amount=Decimal("33.33"), refunded_on=date(2025, 4, 20),
                reference="rf-1", now=CLOSE_AT)
        assert any(s.upper().startswith("INSERT INTO") and "refunds" in s for s in seen)
        assert written_then_read(seen) == []
        with statements(billing) as seen:
            void = await invoicing.void_payment(uow, "alpha", replacement, copy,
                                                reason="cheque bounced", actor="t",
                                                actor_label="finance", now=CLOSE_AT)
        assert any(s.upper().startswith("UPDATE") and "payments" in s for s in seen)
        assert written_then_read(seen) == []
        with statements(billing) as seen:
            paid = await invoicing.record_payment(
                uow, "alpha", replacement, amount=Decimal("75.33"), paid_on=date(2025, 4, 21),
                reference="chk-1", now=CLOSE_AT)
        assert written_then_read(seen) == []
        await uow.commit()
    # What they answer is what they wrote, as a read of the invoice shows it.
    assert (refund["refund"]["amount"], refund["invoice"]["paid"], refund["invoice"]["balance"]) \
        == ("33.33", "42.00", "0.00")
    assert (void["payment"]["voided"]["reason"], void["invoice"]["paid"],
            void["invoice"]["balance"], void["invoice"]["status"]) == (
        "cheque bounced", "-33.33", "75.33", "issued")
    assert (paid["payment"]["reference"], paid["payment"]["voided"], paid["invoice"]["paid"],
            paid["invoice"]["status"]) == ("chk-1", None, "42.00", "balanced")
    async with billing.db.unit_of_work() as uow:
        row = await invoicing.get_invoice_row(uow.session, replacement, resource=False)
    assert paid["invoice"] == invoicing.invoice_view(row)
