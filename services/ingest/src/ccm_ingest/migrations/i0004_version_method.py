"""ingest: ``resource_versions.method``: how each version came (``POST``: a create with a
server-assigned id, ``PUT``: an update or a create with the client's id, ``DELETE``), so that
``_history`` tells them apart (it said ``PUT`` for all). Versions stored before stay NULL and
are shown as before. Nullable: code before this revision keeps inserting without it.

Revision ID: ingest_0004
Revises: ingest_0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "ingest_0004"
down_revision = "ingest_0003"
branch_labels = None
depends_on = None


# ingest_0002 creates resource_versions from today's model, which has the column: added (or
# dropped) only where it is missing (or present).
def upgrade() -> None:
    if "method" not in column_names("resource_versions"):
        op.add_column("resource_versions", sa.Column("method", sa.String(6), nullable=True),
                      schema=migration_schema())


def downgrade() -> None:
    if "method" in column_names("resource_versions"):
        op.drop_column("resource_versions", "method", schema=migration_schema())
