"""Audit trail: append-only, hash-chained entries per practice, and each chain's head.

Revision ID: p0002
Revises: p0001
Create Date: 2026-11-27
"""

from alembic import op

revision = "p0002"
down_revision = "p0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from ccm_shared.audit import audit_heads, audit_log

    for table in (audit_log, audit_heads):
        table.create(op.get_bind())


def downgrade() -> None:
    op.drop_table("audit_heads", schema="platform")
    op.drop_table("audit_log", schema="platform")
