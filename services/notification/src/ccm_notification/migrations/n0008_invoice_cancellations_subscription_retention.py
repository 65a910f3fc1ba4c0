"""notification: ``invoice_cancellations`` (the invoices whose cancellation was consumed, so an
``issued`` event consumed after it sends no ``invoice-issued`` message: billing publishes the two
on topics of their own) and the indexes the subscriptions' retention deletes by
(``subscription_events.delivered_at``; ``subscription_deliveries`` by subscription and number).

Revision ID: notification_0008
Revises: notification_0007
Create Date: 2026-11-29
"""

from alembic import op

from ccm_notification.adapters.orm import add_invoice_cancellations_table
from ccm_notification.subscriptions.tables import SUBSCRIPTION_RETENTION_INDEXES
from ccm_shared.migrate import create_tables, drop_tables, migration_schema

revision = "notification_0008"
down_revision = "notification_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_invoice_cancellations_table)
    for name, table, columns in SUBSCRIPTION_RETENTION_INDEXES:
        op.create_index(name, table, list(columns), if_not_exists=True,
                        schema=migration_schema())


def downgrade() -> None:
    for name, table, _ in SUBSCRIPTION_RETENTION_INDEXES:
        op.drop_index(name, table_name=table, if_exists=True, schema=migration_schema())
    drop_tables(add_invoice_cancellations_table)
