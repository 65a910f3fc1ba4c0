"""billing: ``invoices.version_id`` / ``last_updated`` and ``charge_items.version_id`` /
``last_updated``: the ``meta.versionId`` and ``meta.lastUpdated`` of what /fhir serves (and its
ETag and Last-Modified headers, and ``_lastUpdated`` search). An Invoice's version goes up when
its status, cancellation or replacement changes, a ChargeItem's when it is entered in error.

Rows before it are version 1 (a ChargeItem entered in error 2), last updated at the best
estimate of the time billing kept: an Invoice's issue, the issue of the Invoice that replaced
it, its latest payment, void or refund, and, cancelled without replacement, its month's latest
correction; a ChargeItem's Invoice's issue (entered in error: that Invoice's estimate). The
downgrade drops the columns (the code before it writes neither).

Revision ID: billing_0024
Revises: billing_0023
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0024"
down_revision = "billing_0023"
branch_labels = None
depends_on = None

TABLES = ("invoices", "charge_items")


def _estimates(p: str) -> list[str]:
    """Statements that move each Invoice's ``last_updated`` to a later time billing kept of a
    change to it (``{value}``: a correlated subquery; the row keeps what it has when NULL)."""
    later = ("UPDATE {p}invoices SET last_updated = ({value}) "
             "WHERE ({value}) > last_updated")
    values = [
        f"SELECT r.issued_at FROM {p}invoices r WHERE r.id = invoices.replaced_by",
        f"SELECT max(x.recorded_at) FROM {p}payments x WHERE x.invoice_id = invoices.id",
        f"SELECT max(x.voided_at) FROM {p}payments x WHERE x.invoice_id = invoices.id",
        f"SELECT max(x.recorded_at) FROM {p}refunds x WHERE x.invoice_id = invoices.id",
        # Cancelled without replacement: by a correction, which filed a revision then.
        f"SELECT max(f.filed_at) FROM {p}decision_filings f WHERE f.practice = invoices.practice"
        " AND f.month = invoices.month AND invoices.status = 'cancelled'"
        " AND invoices.replaced_by IS NULL",
    ]
    return [later.format(p=p, value=v) for v in values]


def upgrade() -> None:
    schema = migration_schema()
    p, bind = f'"{schema}".', op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    added = []
    for table in TABLES:
        if "version_id" in column_names(table):
            continue  # created from today's model (billing_0002)
        op.add_column(table, sa.Column("version_id", sa.Integer(), nullable=False,
                                       server_default=sa.text("1")), schema=schema)
        # SQLite adds no column whose default is not a constant: filled below, then (PostgreSQL)
        # made NOT NULL with its default.
        op.add_column(table, sa.Column("last_updated", sa.DateTime(timezone=True),
                                       nullable=True), schema=schema)
        added.append(table)
    if "invoices" in added:
        bind.execute(sa.text(f"UPDATE {p}invoices SET last_updated = issued_at"))
        for statement in _estimates(p):
            bind.execute(sa.text(statement))
    if "charge_items" in added:
        bind.execute(sa.text(
            f"UPDATE {p}charge_items SET version_id = 2 WHERE status = 'entered-in-error'"))
        bind.execute(sa.text(
            f"UPDATE {p}charge_items SET last_updated = (SELECT CASE WHEN charge_items.status = "
            f"'entered-in-error' THEN i.last_updated ELSE i.issued_at END FROM {p}invoices i "
            "WHERE i.id = charge_items.invoice_id)"))
        bind.execute(sa.text(f"UPDATE {p}charge_items SET last_updated = CURRENT_TIMESTAMP "
                             "WHERE last_updated IS NULL"))  # no Invoice: none is known
    if postgres:
        for table in added:
            op.alter_column(table, "last_updated", nullable=False,
                            server_default=sa.func.now(), schema=schema)


def downgrade() -> None:
    schema = migration_schema()
    for table in TABLES:
        present = column_names(table)
        for column in ("last_updated", "version_id"):
            if column in present:
                op.drop_column(table, column, schema=schema)
