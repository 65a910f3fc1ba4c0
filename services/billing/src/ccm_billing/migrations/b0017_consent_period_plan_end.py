"""billing: ``consents.valid_from`` / ``valid_until``: the consent's ``provision.period`` (ingest
sends it in every consent event), as days of the practice. A consent counts only for months its
period reaches; before, a consent whose period had ended went on billing. Consents stored
before this have neither (no period known: as before) until their next event.
``care_plans.completed_on``: the day a completed care plan was completed (ingest's
``completedOn``: the version that completed it); it counts through that month, not after
(before, a completed plan counted for every later month). ``care_plans.review_version``: the version whose
review evidence ``last_review`` is, so a late older version cannot replace a newer review.
``time_entries.performer_class``: the performer's kind by the practice's ingest config (a
Practitioner's qualifications classify time that names no PractitionerRole).

Revision ID: billing_0017
Revises: billing_0016
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0017"
down_revision = "billing_0016"
branch_labels = None
depends_on = None

COLUMNS = (("consents", "valid_from", sa.Date()), ("consents", "valid_until", sa.Date()),
           ("care_plans", "completed_on", sa.Date()),
           ("care_plans", "review_version", sa.String(80)),
           ("time_entries", "performer_class", sa.String(30)))


# billing_0002 creates the tables from today's model, which has the columns: added (or dropped)
# only where they are missing (or present).


def upgrade() -> None:
    for table, name, kind in COLUMNS:
        if name not in column_names(table):
            op.add_column(table, sa.Column(name, kind, nullable=True),
                          schema=migration_schema())


def downgrade() -> None:
    for table, name, _ in COLUMNS:
        if name in column_names(table):
            op.drop_column(table, name, schema=migration_schema())
