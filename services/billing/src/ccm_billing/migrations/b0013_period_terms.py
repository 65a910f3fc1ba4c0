"""billing: ``billing_periods.terms``: the terms a closed month is billed under (the practice's
pricing document: the contract and rule options, of the close or of the last explicit
recompute). A correction of the month decides and prices its patients under them, as everyone
else in the month was; before, it used the terms of the day of the correction, so one
replacement Invoice could price the same code at two rates. Months closed before this keep NULL
and are corrected under the current terms.

Revision ID: billing_0013
Revises: billing_0012
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0013"
down_revision = "billing_0012"
branch_labels = None
depends_on = None


# billing_0002 creates billing_periods from today's model, which has the column: added (or
# dropped) only where it is missing (or present).


def upgrade() -> None:
    if "terms" not in column_names("billing_periods"):
        op.add_column("billing_periods", sa.Column("terms", sa.Text(), nullable=True),
                      schema=migration_schema())


def downgrade() -> None:
    if "terms" in column_names("billing_periods"):
        op.drop_column("billing_periods", "terms", schema=migration_schema())
