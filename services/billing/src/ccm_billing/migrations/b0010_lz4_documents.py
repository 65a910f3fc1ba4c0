"""billing: compress the large documents with lz4 instead of pglz (PostgreSQL built with lz4,
as Debian's and the official images are). An Invoice of 1,780 lines is ~320 KB of JSON, stored
twice at issue (``invoices.resource`` and the outbox event carrying it); pglz took ~3.5 ms to
compress each, lz4 ~1 ms, for the same size. Only values written afterwards change; SQLite and
a PostgreSQL without lz4 are left as they are.

Revision ID: billing_0010
Revises: billing_0009
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import migration_schema

revision = "billing_0010"
down_revision = "billing_0009"
branch_labels = None
depends_on = None

COLUMNS = (("invoices", "resource"), ("outbox", "payload"))


def _set(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or not bind.execute(sa.text(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
            "WHERE name = 'default_toast_compression'")).scalar():
        return
    schema = migration_schema()
    for table, column in COLUMNS:
        op.execute(f'ALTER TABLE "{schema}".{table} ALTER COLUMN {column} SET COMPRESSION {method}')


def upgrade() -> None:
    _set("lz4")


def downgrade() -> None:
    _set("default")
