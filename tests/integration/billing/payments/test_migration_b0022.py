"""billing_0022 on a database from before it (PostgreSQL, and SQLite as in embedded mode): the
unique index of the references of an invoice's payments not voided is built; a voided payment's
reference is free for another; a database holding two counted payments of one reference on an
invoice is refused, naming them, until one is voided; the downgrade drops the index (and
billing_0020's downgrade then drops the void columns it names)."""

from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa
from alembic import command

from ccm_shared.migrate import alembic_config, upgrade
from tests.integration.billing.payments.test_migration_b0020 import database, run_sql  # noqa: F401

PACKAGE = "ccm_billing.migrations"
INDEX = "uq_payments_invoice_reference"
INVOICE = (
    "INSERT INTO S.invoices (id, practice, month, revision, status, payment_status, total_net, "
    "paid, issued_at, due_date, overdue, resource, lines_in_place) VALUES ('inv-0', 'alpha', "
    "'2025-03', 0, 'issued', 'issued', '75.33', '0.00', '2025-04-02 12:00:00', '2025-05-02', "
    "false, '{}', true)")
PAYMENT = (
    "INSERT INTO S.payments (id, practice, invoice_id, amount, date, reference, recorded_at, "
    "voided_at) VALUES (:id, 'alpha', 'inv-0', '75.33', '2025-04-10', :reference, "
    "'2025-04-10 12:00:00', :voided)")


def indexes(url: str, schema: str) -> set[str]:
    """The names of the payments table's indexes."""
    if url.startswith("sqlite"):
        sql = f"SELECT name FROM \"{schema}\".sqlite_master WHERE tbl_name = 'payments'"
    else:
        sql = (f"SELECT indexname FROM pg_indexes WHERE schemaname = '{schema}' "
               "AND tablename = 'payments'")
    (rows,) = run_sql(url, schema, [(sql, {})])
    return {name for (name,) in rows if name}


def pay(reference: str | None, n: int, voided: str | None = None) -> tuple[str, dict]:
    return PAYMENT, {"id": f"pay-{n}", "reference": reference,
                     "voided": datetime.fromisoformat(voided) if voided else None}


def test_billing_0022_on_a_database_from_before_it(database):  # noqa: F811
    url, schema = database  # at billing_0019
    upgrade(url, schema, PACKAGE, "billing_0021")
    assert INDEX not in indexes(url, schema)  # as billing_0021 left it
    # What the code before it wrote: a reference voided and recorded again could not be (the
    # voided one answered it), and payments without a reference are many.
    run_sql(url, schema, [(INVOICE, {}), pay("chk-1", 1, "2025-04-15 12:00:00"), pay("chk-2", 2),
                          pay(None, 3), pay(None, 4),
                          # the API took an empty reference and never looked it up: no reference
                          pay("", 17), pay("", 18), pay("  ", 19)])
    upgrade(url, schema, PACKAGE)
    assert INDEX in indexes(url, schema)
    (blank,) = run_sql(url, schema, [(
        "SELECT count(*) FROM S.payments WHERE reference IS NOT NULL AND trim(reference) = ''",
        {})])
    assert blank == [(0,)]
    # The voided payment's reference is free; a counted one's is not.
    run_sql(url, schema, [pay("chk-1", 5)])
    with pytest.raises(sa.exc.IntegrityError):
        run_sql(url, schema, [pay("chk-2", 6)])
    with pytest.raises(sa.exc.IntegrityError):
        run_sql(url, schema, [pay("chk-1", 7)])
    run_sql(url, schema, [pay("chk-1", 8, "2025-04-16 12:00:00")])  # voided: any number
    # Downgraded (to before billing_0020 too: its void columns go), the index goes with it.
    command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0021")
    assert INDEX not in indexes(url, schema)
    (rows,) = run_sql(url, schema, [("SELECT id FROM S.payments ORDER BY id", {})])
    assert [r[0] for r in rows] == ["pay-1", "pay-17", "pay-18", "pay-19", "pay-2", "pay-3",
                                    "pay-4", "pay-5", "pay-8"]
    run_sql(url, schema, [("DELETE FROM S.payments WHERE voided_at IS NOT NULL", {})])
    command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0019")
    upgrade(url, schema, PACKAGE)
    assert INDEX in indexes(url, schema)


def test_billing_0022_refuses_two_counted_payments_of_one_reference(database):  # noqa: F811
    url, schema = database
    upgrade(url, schema, PACKAGE, "billing_0021")
    # Recorded together before payments locked their invoice: the same cheque twice.
    run_sql(url, schema, [(INVOICE, {}), pay("chk-1", 1), pay("chk-1", 2), pay("chk-2", 3)])
    with pytest.raises(RuntimeError, match=r"1 reference\(s\) name 2 payments not voided"):
        upgrade(url, schema, PACKAGE)
    assert INDEX not in indexes(url, schema)
    # One voided (as the API does it, by hand here): the upgrade goes through.
    run_sql(url, schema, [("UPDATE S.payments SET voided_at = '2025-04-15 12:00:00', "
                           "void_reason = 'recorded twice' WHERE id = 'pay-2'", {})])
    upgrade(url, schema, PACKAGE)
    assert INDEX in indexes(url, schema)
