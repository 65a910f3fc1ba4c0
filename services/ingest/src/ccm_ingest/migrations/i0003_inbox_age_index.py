"""ingest: the inbox's index on processed_at, for messaging retention (``ccm_shared.retention``
deletes inbox rows by age; without the index each hourly pass read the whole inbox).

Revision ID: ingest_0003
Revises: ingest_0002
Create Date: 2026-11-27
"""

from ccm_shared.migrate import create_inbox_age_index, drop_inbox_age_index

revision = "ingest_0003"
down_revision = "ingest_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_inbox_age_index()


def downgrade() -> None:
    drop_inbox_age_index()
