"""billing: ``uq_payments_invoice_reference``, a unique index of the references of an invoice's
payments that count (a reference, not voided). A payment voided as recorded in error kept its
reference: the correct payment sent with the bank's same reference was answered with the voided
one and never recorded. The code now looks a reference up among the payments not voided, and
this index holds that rule in the database: one counted payment per reference and invoice (a
replacement's carried copies are its own payments, one per reference as on the invoice they
come from).

A database whose invoice holds two counted payments with one reference (recorded together
before payments locked their invoice) is refused, naming how many, rather than choosing one to
void: void the duplicate (``POST /v1/invoices/{id}/payments/{payment}/void``) and upgrade again.
The index is built in the migration's transaction: payments wait while it is built.

Revision ID: billing_0022
Revises: billing_0021
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import migration_schema

revision = "billing_0022"
down_revision = "billing_0021"
branch_labels = None
depends_on = None

# billing_0002 creates payments from today's model, which has the index: hence if_not_exists /
# if_exists. The predicate as of this revision (the model's ACTIVE_REFERENCE).
ACTIVE_REFERENCE = sa.text("reference IS NOT NULL AND voided_at IS NULL")
INDEX = "uq_payments_invoice_reference"


def upgrade() -> None:
    schema = migration_schema()
    table = f'"{schema}".payments' if schema else "payments"
    # An empty reference named no check or transfer (the API took "" and never looked it up):
    # no reference, so payments that had one are no duplicates of each other.
    op.get_bind().execute(sa.text(
        f"UPDATE {table} SET reference = NULL WHERE reference IS NOT NULL "
        "AND trim(reference) = ''"))
    duplicated = op.get_bind().execute(sa.text(
        f"SELECT count(*), coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM {table} "
        "WHERE reference IS NOT NULL AND voided_at IS NULL GROUP BY invoice_id, reference "
        "HAVING count(*) > 1) AS d")).one()
    if duplicated[0]:
        raise RuntimeError(
            f"billing_0022 cannot be applied: {duplicated[0]} reference(s) name "
            f"{duplicated[1]} payments not voided of one invoice; void the duplicates "
            "(POST /v1/invoices/{id}/payments/{payment}/void) and upgrade again")
    op.create_index(INDEX, "payments", ["invoice_id", "reference"], unique=True,
                    postgresql_where=ACTIVE_REFERENCE, sqlite_where=ACTIVE_REFERENCE,
                    if_not_exists=True, schema=schema)


def downgrade() -> None:
    # The code before this looks a reference up among every payment, voided ones included: it
    # never records a second payment of a reference, so it runs with or without the index. Dropped
    # all the same: billing_0020's downgrade drops voided_at, which the index's predicate names
    # (SQLite refuses to drop a column an index uses).
    op.drop_index(INDEX, table_name="payments", if_exists=True, schema=migration_schema())
