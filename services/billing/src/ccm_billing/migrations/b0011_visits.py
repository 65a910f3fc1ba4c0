"""billing: qualifying visits (ingest.visit.recorded / reversed), for the initiating-visit check
and G0506.

Revision ID: billing_0011
Revises: billing_0010
Create Date: 2026-11-27
"""

from alembic import op
from sqlalchemy import MetaData

from ccm_billing.adapters.orm import add_visit_tables

revision = "billing_0011"
down_revision = "billing_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in add_visit_tables(MetaData()).values():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in add_visit_tables(MetaData()).values():
        table.drop(op.get_bind())
