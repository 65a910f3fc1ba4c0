"""billing: compliance records — source versions, decision filings, care-plan reviews.

Revision ID: billing_0003
Revises: billing_0002
Create Date: 2026-11-28
"""

from alembic import op
from sqlalchemy import MetaData

from ccm_billing.compliance.tables import add_compliance_tables

revision = "billing_0003"
down_revision = "billing_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in add_compliance_tables(MetaData()).values():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in reversed(list(add_compliance_tables(MetaData()).values())):
        table.drop(op.get_bind())
