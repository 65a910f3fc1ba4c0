"""billing: time entries' source versions carry which state they record ("|1" logged, "|0"
reversed), as visits' do since billing_0011, so that when ingest reports time moved to another
month as a reversal and a new entry of one source version, the new entry wins in either order
(before, whichever came first did: a moved entry could end up reversed). Existing rows get the
suffix of their state; the downgrade takes it off.

Revision ID: billing_0012
Revises: billing_0011
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import migration_schema

revision = "billing_0012"
down_revision = "billing_0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    q = f'"{migration_schema()}"'
    op.get_bind().execute(sa.text(
        f"UPDATE {q}.time_entries SET version = version || CASE WHEN status = 'finished' "
        "THEN '|1' ELSE '|0' END, data_version = data_version || '|1'"))


def downgrade() -> None:
    q = f'"{migration_schema()}"'
    op.get_bind().execute(sa.text(
        f"UPDATE {q}.time_entries SET version = substr(version, 1, length(version) - 2), "
        "data_version = substr(data_version, 1, length(data_version) - 2)"))
