"""notification: provider directory, templates, policies, messages, deliveries, call requests.

Revision ID: notification_0002
Revises: notification_0001
Create Date: 2026-11-27
"""

from ccm_notification.adapters.orm import add_notification_tables_v1
from ccm_shared.migrate import create_tables, drop_tables

revision = "notification_0002"
down_revision = "notification_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_notification_tables_v1)


def downgrade() -> None:
    drop_tables(add_notification_tables_v1)
