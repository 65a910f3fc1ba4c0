"""billing: projections of ingest's events, billing periods, invoices, charge items, payments.

Revision ID: billing_0002
Revises: billing_0001
Create Date: 2026-11-27
"""

from alembic import op
from sqlalchemy import MetaData

from ccm_billing.adapters.orm import add_billing_tables

revision = "billing_0002"
down_revision = "billing_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in add_billing_tables(MetaData()).values():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in reversed(list(add_billing_tables(MetaData()).values())):
        table.drop(op.get_bind())
