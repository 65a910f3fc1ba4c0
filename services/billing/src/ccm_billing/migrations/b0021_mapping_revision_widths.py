"""billing: a source version's key may end with ingest's mapping revision (``|r`` and nine
digits: ``projections.version_key``), so the version columns are 11 characters wider (93 ->
104). On PostgreSQL only, and only where a column is narrower (``widen_columns``): widening a
VARCHAR rewrites neither the table nor its indexes; SQLite ignores VARCHAR lengths.

Revision ID: billing_0021
Revises: billing_0020
Create Date: 2026-11-28
"""

import sqlalchemy as sa

from ccm_shared.migrate import widen_columns

revision = "billing_0021"
down_revision = "billing_0020"
branch_labels = None
depends_on = None

VERSION = 104
PROJECTIONS = ("time_entries", "consents", "care_plans", "conditions", "patients",
               "practitioner_roles", "visits")
WIDER = (
    *((table, "version", sa.String(VERSION)) for table in PROJECTIONS),
    ("time_entries", "data_version", sa.String(VERSION)),
    ("care_plans", "review_version", sa.String(VERSION)),
)


def upgrade() -> None:
    widen_columns(WIDER)


def downgrade() -> None:
    # Nothing: the code before this reads and writes the wider columns as it did the narrower
    # ones, and what they hold now may not fit the old width.
    pass
