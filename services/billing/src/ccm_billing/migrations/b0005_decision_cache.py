"""billing: decisions kept current during the month (fact generations, cached decisions, lines).

Revision ID: billing_0005
Revises: billing_0004
Create Date: 2026-11-27
"""

from alembic import op
from sqlalchemy import MetaData

from ccm_billing.adapters.orm import add_decision_cache_tables

revision = "billing_0005"
down_revision = "billing_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in add_decision_cache_tables(MetaData()).values():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in reversed(list(add_decision_cache_tables(MetaData()).values())):
        table.drop(op.get_bind())
