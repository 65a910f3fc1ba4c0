"""notification: the inbox's index on processed_at, for messaging retention (``ccm_shared.retention``
deletes inbox rows by age; without the index each hourly pass read the whole inbox).

Revision ID: notification_0004
Revises: notification_0003
Create Date: 2026-11-27
"""

from ccm_shared.migrate import create_inbox_age_index, drop_inbox_age_index

revision = "notification_0004"
down_revision = "notification_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_inbox_age_index()


def downgrade() -> None:
    drop_inbox_age_index()
