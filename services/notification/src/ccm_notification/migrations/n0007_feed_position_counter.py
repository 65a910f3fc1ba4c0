"""notification: the practice feed's position (each practice's last billing number fanned out)
is a counter of the platform's ``event_sequences`` (subject ``practice-feed-position``), locked
and advanced by ``reserve_sequences`` in one statement, rather than a second counter table:
``feed_positions``' rows are copied there and the table dropped. The downgrade copies them back.

Revision ID: notification_0007
Revises: notification_0006
Create Date: 2026-11-29
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from ccm_notification.subscriptions.tables import add_feed_positions_table_v1
from ccm_shared.migrate import create_tables, drop_tables
from ccm_shared.tables import add_messaging_tables

revision = "notification_0007"
down_revision = "notification_0006"
branch_labels = None
depends_on = None

FEED_POSITION = "practice-feed-position"  # subscriptions.domain.FEED_POSITION, as of this one


def _tables() -> tuple[sa.Table, sa.Table]:
    metadata = sa.MetaData()
    _, _, sequences = add_messaging_tables(metadata)
    return add_feed_positions_table_v1(metadata)["feed_positions"], sequences


def upgrade() -> None:
    positions, sequences = _tables()
    bind = op.get_bind()
    bind.execute(sequences.insert().from_select(
        ["tenant", "subject", "last"],
        sa.select(positions.c.practice, sa.literal(FEED_POSITION, sa.String(200)),
                  positions.c.producer_sequence)))
    drop_tables(add_feed_positions_table_v1)


def downgrade() -> None:
    create_tables(add_feed_positions_table_v1)
    positions, sequences = _tables()
    bind = op.get_bind()
    bind.execute(positions.insert().from_select(
        ["practice", "producer_sequence", "updated_at"],
        sa.select(sequences.c.tenant, sequences.c["last"],
                  sa.literal(datetime.now(UTC), sa.DateTime(timezone=True)))
        .where(sequences.c.subject == FEED_POSITION)))
    bind.execute(sequences.delete().where(sequences.c.subject == FEED_POSITION))
