"""notification: practice subscriptions, their numbered events and delivery log.

Revision ID: notification_0003
Revises: notification_0002
Create Date: 2026-12-01
"""

from alembic import op
from sqlalchemy import MetaData

from ccm_notification.subscriptions.tables import add_subscription_tables_v1

revision = "notification_0003"
down_revision = "notification_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in add_subscription_tables_v1(MetaData()).values():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in reversed(list(add_subscription_tables_v1(MetaData()).values())):
        table.drop(op.get_bind())
