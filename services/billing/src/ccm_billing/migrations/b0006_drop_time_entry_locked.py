"""billing: drop ``time_entries.locked``, unused since billing_0005 (the close's decision filings
are the lock record of a month's time; ``corrections.locked_at_close`` reads them).

Revision ID: billing_0006
Revises: billing_0005
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "billing_0006"
down_revision = "billing_0005"
branch_labels = None
depends_on = None


def _schema() -> str:
    return op.get_context().version_table_schema  # the service's schema (or attached file)


def _has_locked() -> bool:
    # billing_0002 creates the table from today's model, which no longer has the column.
    columns = sa.inspect(op.get_bind()).get_columns("time_entries", schema=_schema())
    return "locked" in {c["name"] for c in columns}


def upgrade() -> None:
    if _has_locked():
        op.drop_column("time_entries", "locked", schema=_schema())


def downgrade() -> None:
    if not _has_locked():
        op.add_column("time_entries", sa.Column("locked", sa.Boolean(), nullable=False,
                                                server_default=sa.false()), schema=_schema())
