"""billing: qualifying visits (ingest.visit.recorded / reversed), for the initiating-visit check
and G0506.

Revision ID: billing_0011
Revises: billing_0010
Create Date: 2026-11-27
"""

from ccm_billing.adapters.orm import add_visit_tables
from ccm_shared.migrate import create_tables, drop_tables

revision = "billing_0011"
down_revision = "billing_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_visit_tables)


def downgrade() -> None:
    drop_tables(add_visit_tables)
