"""notification: practice subscriptions, their numbered events and delivery log.

Revision ID: notification_0003
Revises: notification_0002
Create Date: 2026-12-01
"""

from ccm_notification.subscriptions.tables import add_subscription_tables_v1
from ccm_shared.migrate import create_tables, drop_tables

revision = "notification_0003"
down_revision = "notification_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_subscription_tables_v1)


def downgrade() -> None:
    drop_tables(add_subscription_tables_v1)
