"""notification: the practice feed's reorder buffer. Billing publishes each event type on a topic
of its own, so the feed consumer may apply a replacement's ``billing.invoice.issued.v1`` before
the ``billing.invoice.cancelled.v1`` billing wrote first; the feed numbered them in that order.
An event that billing numbered (``practiceSequence``) now waits in ``feed_held`` until the
events billing numbered before it are fanned out (or a hold window ends); ``feed_positions``
keeps each practice's last billing number fanned out. Also ``subscription_events.event_id``
widened to 200 again (as notification_0005 now does): 0005 gained that column after a database
here had already run it, and ``widen_columns`` never narrows, so running it twice is harmless.

Revision ID: notification_0006
Revises: notification_0005
Create Date: 2026-11-28
"""

import sqlalchemy as sa

from ccm_notification.subscriptions.tables import add_feed_order_tables
from ccm_shared.migrate import create_tables, drop_tables, widen_columns

revision = "notification_0006"
down_revision = "notification_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    widen_columns([("subscription_events", "event_id", sa.String(200))])
    create_tables(add_feed_order_tables)


def downgrade() -> None:
    drop_tables(add_feed_order_tables)
