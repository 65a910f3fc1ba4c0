"""billing: outbox, inbox and per-patient event sequences.

Revision ID: billing_0001
Revises:
Create Date: 2026-11-27
"""

from ccm_shared.migrate import create_messaging_tables, drop_messaging_tables

revision = "billing_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_messaging_tables()


def downgrade() -> None:
    drop_messaging_tables()
