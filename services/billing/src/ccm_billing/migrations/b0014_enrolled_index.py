"""billing: ``ix_time_entries_enrolled``, a partial index of the time entries that enrol their
patient in their month (practice, month, patient where patient and start are set). The check of
a practice-month's cached decisions (``decision_cache._status``, run by every decider pass and
every month close) finds who is enrolled from the index alone, instead of reading every entry
of the month from the table (6,000 rows for a 1,000-patient practice).

The index is built in the migration's transaction: writes to time_entries (the projections)
wait while it is built, a time in proportion to the table's size.

Revision ID: billing_0014
Revises: billing_0013
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import migration_schema

revision = "billing_0014"
down_revision = "billing_0013"
branch_labels = None
depends_on = None

# billing_0002 creates time_entries from today's model, which has the index: hence the
# if_not_exists / if_exists. The predicate as of this revision (the model's ENROLLED_ENTRY).
ENROLLED_ENTRY = sa.text("patient IS NOT NULL AND start IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_time_entries_enrolled", "time_entries", ["practice", "month", "patient"],
                    postgresql_where=ENROLLED_ENTRY, sqlite_where=ENROLLED_ENTRY,
                    if_not_exists=True, schema=migration_schema())


def downgrade() -> None:
    op.drop_index("ix_time_entries_enrolled", table_name="time_entries", if_exists=True,
                  schema=migration_schema())
