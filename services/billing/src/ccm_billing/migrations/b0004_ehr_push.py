"""billing: EHR endpoints of practices and the delivery log of pushed Invoices.

Revision ID: billing_0004
Revises: billing_0003
Create Date: 2026-11-27
"""

from ccm_billing.adapters.orm import add_ehr_tables
from ccm_shared.migrate import create_tables, drop_tables

revision = "billing_0004"
down_revision = "billing_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_ehr_tables)


def downgrade() -> None:
    drop_tables(add_ehr_tables)
