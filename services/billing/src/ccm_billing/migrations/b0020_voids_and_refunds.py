"""billing: payments voided (``payments.voided_at``, ``void_reason``, ``voided_by``,
``voided_by_label``), refunds of what a practice overpaid (``refunds``) and what an invoice
refunded (``invoices.refunded``; ``invoices.paid`` is net of it). A payment recorded in error or
reversed by the bank could not be undone, and a balance a correction made negative stayed so.
Invoices before this refunded nothing (``0.00``) and their payments are not voided.

Revision ID: billing_0020
Revises: billing_0019
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from ccm_billing.adapters.orm import add_refund_tables
from ccm_shared.migrate import column_names, create_tables, drop_tables, migration_schema

revision = "billing_0020"
down_revision = "billing_0019"
branch_labels = None
depends_on = None

VOID_COLUMNS = (
    ("voided_at", sa.DateTime(timezone=True)),
    ("void_reason", sa.Text()),
    ("voided_by", sa.String(200)),
    ("voided_by_label", sa.String(200)),
)


# billing_0002 creates the tables from today's model, which has the columns: added (or
# dropped) only where they are missing (or present).


def upgrade() -> None:
    schema = migration_schema()
    present = column_names("payments")
    for name, type_ in VOID_COLUMNS:
        if name not in present:
            op.add_column("payments", sa.Column(name, type_, nullable=True), schema=schema)
    if "refunded" not in column_names("invoices"):
        op.add_column("invoices", sa.Column("refunded", sa.String(20), nullable=False,
                                            server_default="0.00"), schema=schema)
    if not sa.inspect(op.get_bind()).has_table("refunds", schema=schema):
        create_tables(add_refund_tables)


def downgrade() -> None:
    # The code before this would count a voided payment as paid (and carry it into a
    # replacement) and knows no refund: refused while any was recorded, rather than leave
    # invoices whose payments and `paid` disagree.
    schema = migration_schema()
    bind = op.get_bind()
    if sa.inspect(bind).has_table("refunds", schema=schema):
        table = f'"{schema}".' if schema else ""
        voided, refunds = bind.execute(sa.text(
            f"SELECT (SELECT count(*) FROM {table}payments WHERE voided_at IS NOT NULL), "
            f"(SELECT count(*) FROM {table}refunds)")).one()
        if voided or refunds:
            raise RuntimeError(
                f"billing_0020 cannot be downgraded: {voided} payment(s) voided and {refunds} "
                "refund(s) recorded, which the code before it would count as paid or not know")
        drop_tables(add_refund_tables)
    if "refunded" in column_names("invoices"):
        op.drop_column("invoices", "refunded", schema=schema)
    present = column_names("payments")
    for name, _ in reversed(VOID_COLUMNS):
        if name in present:
            op.drop_column("payments", name, schema=schema)
