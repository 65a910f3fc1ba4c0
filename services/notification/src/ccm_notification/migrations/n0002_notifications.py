"""notification: provider directory, templates, policies, messages, deliveries, call requests.

Revision ID: notification_0002
Revises: notification_0001
Create Date: 2026-11-27
"""

from alembic import op
from sqlalchemy import MetaData

from ccm_notification.adapters.orm import add_notification_tables_v1

revision = "notification_0002"
down_revision = "notification_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in add_notification_tables_v1(MetaData()).values():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in reversed(list(add_notification_tables_v1(MetaData()).values())):
        table.drop(op.get_bind())
