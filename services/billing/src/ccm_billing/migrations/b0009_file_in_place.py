"""billing: a month close files in place. ``billing_periods`` gets ``filed_in_place``,
``line_invoice`` and ``line_entered``: a month closed in place keeps its cached decisions as its
revision-0 filings and its decision lines as the ChargeItems of its first Invoice, instead of
copying them into ``decision_filings`` and ``charge_items`` (adapters/filed.py). The lines get
the indexes ChargeItem reads need (by id, by patient). The downgrade copies what was filed in
place into those tables, as the code before this migration expects, then drops the rest.

Revision ID: billing_0009
Revises: billing_0008
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0009"
down_revision = "billing_0008"
branch_labels = None
depends_on = None

COLUMNS = ("filed_in_place", "line_invoice", "line_entered")
INDEXES = {"ix_decision_lines_item": ["charge_item_id"],
           "ix_decision_lines_patient": ["practice", "patient"]}


# billing_0002 and billing_0005 create the tables from today's model, which has all of these:
# each is added (or dropped) only where it is missing (or present).


def upgrade() -> None:
    columns, schema = column_names("billing_periods"), migration_schema()
    if "filed_in_place" not in columns:
        op.add_column("billing_periods", sa.Column("filed_in_place", sa.Boolean(), nullable=False,
                                                   server_default=sa.false()), schema=schema)
    for name in ("line_invoice", "line_entered"):
        if name not in columns:
            kind = sa.String(64) if name == "line_invoice" else sa.Text()
            op.add_column("billing_periods", sa.Column(name, kind, nullable=True), schema=schema)
    for name, cols in INDEXES.items():
        op.create_index(name, "month_decision_lines", cols, if_not_exists=True, schema=schema)


def downgrade() -> None:
    columns, schema = column_names("billing_periods"), migration_schema()
    q, bind = f'"{schema}"', op.get_bind()
    if "filed_in_place" in columns:
        bind.execute(sa.text(
            f"INSERT INTO {q}.decision_filings (practice, patient, month, revision, filed_at, "
            f"reason, decision, entries) SELECT md.practice, md.patient, md.month, 0, p.closed_at, "
            f"'closed', md.decision, md.entries FROM {q}.month_decisions md JOIN {q}.billing_periods p "
            f"ON p.practice = md.practice AND p.month = md.month WHERE p.filed_in_place"))
        bind.execute(sa.text(
            f"INSERT INTO {q}.charge_items (id, practice, invoice_id, patient, month, code, status, "
            f"amount, resource) SELECT l.charge_item_id, l.practice, p.line_invoice, l.patient, "
            f"l.month, l.code, 'billable', l.amount, "
            f"substr(l.resource, 1, length(l.resource) - 1) || p.line_entered "
            f"FROM {q}.month_decision_lines l JOIN {q}.billing_periods p "
            f"ON p.practice = l.practice AND p.month = l.month WHERE p.line_invoice IS NOT NULL"))
        for table in ("month_decisions", "month_decision_lines"):  # closed: no longer cached
            bind.execute(sa.text(
                f"DELETE FROM {q}.{table} WHERE EXISTS (SELECT 1 FROM {q}.billing_periods p "
                f"WHERE p.practice = {table}.practice AND p.month = {table}.month)"))
    for name in INDEXES:
        op.drop_index(name, "month_decision_lines", if_exists=True, schema=schema)
    for name in COLUMNS:
        if name in columns:
            op.drop_column("billing_periods", name, schema=schema)
