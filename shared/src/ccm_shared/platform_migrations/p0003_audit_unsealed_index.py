"""Audit trail: a partial index of the unsealed entries for the sealer's work list.

Without it the sealer's ``WHERE seq IS NULL ORDER BY id`` walked the primary key past every
sealed entry on each pass (210 ms at 585,000 entries), a cost that grows with the trail.

Revision ID: p0003
Revises: p0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "p0003"
down_revision = "p0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_unsealed", "audit_log", ["id"], schema="platform",
                    postgresql_where=sa.text("seq IS NULL"), sqlite_where=sa.text("seq IS NULL"),
                    if_not_exists=True)  # p0002 creates the table from today's metadata


def downgrade() -> None:
    op.drop_index("ix_audit_unsealed", table_name="audit_log", schema="platform")
