"""billing: ``payments.idempotency_key`` and ``refunds.idempotency_key``, each with a unique
index per invoice (where a key was sent). A payment or refund without a reference was recorded
twice when its request was sent twice (a client retrying after a timeout): the request's
``Idempotency-Key`` header is now kept with what it recorded, and the same key sent again to
the invoice answers that payment or refund instead of recording another. Rows before it have
no key; nothing is rewritten.

Revision ID: billing_0023
Revises: billing_0022
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0023"
down_revision = "billing_0022"
branch_labels = None
depends_on = None

# The model as of this revision (orm.HAS_KEY, orm.IDEMPOTENCY_KEY).
HAS_KEY = sa.text("idempotency_key IS NOT NULL")
KEY = 200
INDEXES = (("payments", "uq_payments_invoice_idempotency_key"),
           ("refunds", "uq_refunds_invoice_idempotency_key"))


# billing_0002 and billing_0020 create the tables from today's model, which has the columns and
# indexes: added (or dropped) only where they are missing (or present).


def upgrade() -> None:
    schema = migration_schema()
    for table, index in INDEXES:
        if "idempotency_key" not in column_names(table):
            op.add_column(table, sa.Column("idempotency_key", sa.String(KEY), nullable=True),
                          schema=schema)
        op.create_index(index, table, ["invoice_id", "idempotency_key"], unique=True,
                        postgresql_where=HAS_KEY, sqlite_where=HAS_KEY, if_not_exists=True,
                        schema=schema)


def downgrade() -> None:
    # The code before it ignores the column (and sends no key): dropped with its index.
    schema = migration_schema()
    for table, index in INDEXES:
        op.drop_index(index, table_name=table, if_exists=True, schema=schema)
        if "idempotency_key" in column_names(table):
            op.drop_column(table, "idempotency_key", schema=schema)
