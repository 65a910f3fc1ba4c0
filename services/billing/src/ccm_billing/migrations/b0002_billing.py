"""billing: projections of ingest's events, billing periods, invoices, charge items, payments.

Revision ID: billing_0002
Revises: billing_0001
Create Date: 2026-11-27
"""

from ccm_billing.adapters.orm import add_billing_tables
from ccm_shared.migrate import create_tables, drop_tables

revision = "billing_0002"
down_revision = "billing_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_billing_tables)


def downgrade() -> None:
    drop_tables(add_billing_tables)
