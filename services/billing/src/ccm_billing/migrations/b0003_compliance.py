"""billing: compliance records — source versions, decision filings, care-plan reviews.

Revision ID: billing_0003
Revises: billing_0002
Create Date: 2026-11-28
"""

from ccm_billing.compliance.tables import add_compliance_tables
from ccm_shared.migrate import create_tables, drop_tables

revision = "billing_0003"
down_revision = "billing_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_compliance_tables)


def downgrade() -> None:
    drop_tables(add_compliance_tables)
