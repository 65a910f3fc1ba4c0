"""notification: ``subscription_secrets``, the signing secrets of subscriptions whose secret was
rotated (``POST …/subscriptions/{id}/secret``): the current one and the earlier ones still
signing beside it during their overlap. Subscriptions never rotated keep the secret derived from
``CCM_SECRET_KEY`` (no row, nothing changes for them).

Revision ID: notification_0009
Revises: notification_0008
Create Date: 2026-12-02
"""

from ccm_notification.subscriptions.tables import add_subscription_secrets_table
from ccm_shared.migrate import create_tables, drop_tables

revision = "notification_0009"
down_revision = "notification_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_subscription_secrets_table)


def downgrade() -> None:
    # Rotated subscriptions go back to their derived secret (the one before their first
    # rotation): receivers verifying with a rotated-in secret stop verifying.
    drop_tables(add_subscription_secrets_table)
