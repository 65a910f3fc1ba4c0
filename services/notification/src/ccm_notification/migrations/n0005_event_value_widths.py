"""notification: the columns filled from ingest's and the other services' events hold whatever
those events may carry. An Organization's name and a ContactPoint's value are FHIR strings of
any length (text): a name over 300 characters, an email over 320 dead-lettered the directory's
event, and a practitioner's email over 500, the message's recipient, the alert sent to them.
``messages.patient`` takes any reference the contracts allow (140: "PractitionerRole/" and a
64-character id is 81, over the 80 it had); ``subscription_events.event_id`` any event id a
consumer takes (200, as its inbox).

On PostgreSQL only, and only where a column is narrower: notification_0002 creates the tables
from today's model, and SQLite ignores VARCHAR lengths. Widening a VARCHAR, or making it text,
rewrites neither the table nor an index.

Revision ID: notification_0005
Revises: notification_0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa

from ccm_shared.migrate import widen_columns

revision = "notification_0005"
down_revision = "notification_0004"
branch_labels = None
depends_on = None

WIDER = (
    ("organizations", "name", sa.Text()),
    ("organizations", "email", sa.Text()),
    ("provider_roles", "email", sa.Text()),
    ("messages", "recipient", sa.Text()),
    ("messages", "patient", sa.String(140)),
    # any event id a consumer takes (ccm_shared.consumer.decode: the inbox's 200)
    ("subscription_events", "event_id", sa.String(200)),
)


def upgrade() -> None:
    widen_columns(WIDER)


def downgrade() -> None:
    # Nothing: the code before this reads and writes the wider columns as it did the narrower
    # ones, and what they hold now may not fit the old widths.
    pass
