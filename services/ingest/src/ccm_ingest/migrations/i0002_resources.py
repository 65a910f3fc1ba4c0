"""ingest: the FHIR resource mirror (resources, versions, identifiers, conditional creates) and
per-practice ingest configuration.

Revision ID: ingest_0002
Revises: ingest_0001
Create Date: 2026-11-28
"""

from alembic import op

revision = "ingest_0002"
down_revision = "ingest_0001"
branch_labels = None
depends_on = None


def _tables():  # noqa: ANN202
    # Created from the table definitions as they are at this revision: any later change to
    # them must come with a migration of its own that alters these tables.
    from ccm_ingest.adapters import orm

    return orm.SERVICE_TABLES


def upgrade() -> None:
    for table in _tables():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in reversed(_tables()):
        table.drop(op.get_bind())
