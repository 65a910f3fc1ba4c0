"""billing: decisions kept current during the month (fact generations, cached decisions, lines).

Revision ID: billing_0005
Revises: billing_0004
Create Date: 2026-11-27
"""

from ccm_billing.adapters.orm import add_decision_cache_tables
from ccm_shared.migrate import create_tables, drop_tables

revision = "billing_0005"
down_revision = "billing_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_decision_cache_tables)


def downgrade() -> None:
    drop_tables(add_decision_cache_tables)
