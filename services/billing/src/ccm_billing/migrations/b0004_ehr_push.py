"""billing: EHR endpoints of practices and the delivery log of pushed Invoices.

Revision ID: billing_0004
Revises: billing_0003
Create Date: 2026-11-27
"""

from alembic import op
from sqlalchemy import MetaData

from ccm_billing.adapters.orm import add_ehr_tables

revision = "billing_0004"
down_revision = "billing_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in add_ehr_tables(MetaData()).values():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in reversed(list(add_ehr_tables(MetaData()).values())):
        table.drop(op.get_bind())
