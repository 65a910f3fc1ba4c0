"""ingest: ``ingest_configs.revision``, counted up by each change of a practice's ingest config:
the events that state a stored version's mapping again after a change carry it
(``source.mappingRevision``), so consumers take them as newer than the version's earlier
events. Rows stored before start at 0.

Revision ID: ingest_0006
Revises: ingest_0005
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "ingest_0006"
down_revision = "ingest_0005"
branch_labels = None
depends_on = None


# ingest_0002 creates ingest_configs from today's model, which has the column: added (or
# dropped) only where it is missing (or present).
def upgrade() -> None:
    if "revision" not in column_names("ingest_configs"):
        op.add_column("ingest_configs", sa.Column("revision", sa.Integer, nullable=False,
                                                  server_default="0"),
                      schema=migration_schema())


def downgrade() -> None:
    if "revision" in column_names("ingest_configs"):
        op.drop_column("ingest_configs", "revision", schema=migration_schema())
