"""billing: drop ``time_entries.locked``, unused since billing_0005 (the close's decision filings
are the lock record of a month's time; ``corrections.locked_at_close`` reads them).

Revision ID: billing_0006
Revises: billing_0005
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0006"
down_revision = "billing_0005"
branch_labels = None
depends_on = None


def _has_locked() -> bool:
    # billing_0002 creates the table from today's model, which no longer has the column.
    return "locked" in column_names("time_entries")


def upgrade() -> None:
    if _has_locked():
        op.drop_column("time_entries", "locked", schema=migration_schema())


def downgrade() -> None:
    if not _has_locked():
        op.add_column("time_entries", sa.Column("locked", sa.Boolean(), nullable=False,
                                                server_default=sa.false()),
                      schema=migration_schema())
