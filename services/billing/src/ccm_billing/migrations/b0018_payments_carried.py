"""billing: ``payments.carried_from``: a payment of a cancelled Invoice carried into its
replacement is recorded against the replacement too, naming the payment it carries. Before, a
correction after a payment issued the replacement unpaid (the practice was billed again, and
dunned as overdue, for what it had paid). Payments recorded before this carry nothing.

Revision ID: billing_0018
Revises: billing_0017
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0018"
down_revision = "billing_0017"
branch_labels = None
depends_on = None


# billing_0002 creates the tables from today's model, which has the column: added (or dropped)
# only where it is missing (or present).


def upgrade() -> None:
    if "carried_from" not in column_names("payments"):
        op.add_column("payments", sa.Column("carried_from", sa.String(36), nullable=True),
                      schema=migration_schema())


def downgrade() -> None:
    if "carried_from" in column_names("payments"):
        op.drop_column("payments", "carried_from", schema=migration_schema())
