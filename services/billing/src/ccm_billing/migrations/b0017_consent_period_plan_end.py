"""billing: ``consents.valid_from`` / ``valid_until``: the consent's ``provision.period`` (ingest
sends it in every consent event), as days of the practice. A consent counts only for months its
period reaches; before, a consent whose period had ended went on billing. Consents stored
before this have neither (no period known: as before) until their next event.
``care_plans.completed_on``: the day a completed care plan ended (its ``period.end``, else the
day of the version that completed it); it counts through that month, not after (before, a
completed plan counted for every later month).

Revision ID: billing_0017
Revises: billing_0016
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0017"
down_revision = "billing_0016"
branch_labels = None
depends_on = None

COLUMNS = (("consents", "valid_from"), ("consents", "valid_until"),
           ("care_plans", "completed_on"))


# billing_0002 creates the tables from today's model, which has the columns: added (or dropped)
# only where they are missing (or present).


def upgrade() -> None:
    for table, name in COLUMNS:
        if name not in column_names(table):
            op.add_column(table, sa.Column(name, sa.Date(), nullable=True),
                          schema=migration_schema())


def downgrade() -> None:
    for table, name in COLUMNS:
        if name in column_names(table):
            op.drop_column(table, name, schema=migration_schema())
