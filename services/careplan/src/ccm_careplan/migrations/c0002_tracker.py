"""careplan: review tracker, versions, reviews, scheduled steps, distributions, rules, and the
patient / practitioner / condition facts the tracker needs.

Revision ID: careplan_0002
Revises: careplan_0001
Create Date: 2026-11-27
"""

from alembic import op
from sqlalchemy import MetaData

from ccm_careplan.adapters.orm import add_tracker_tables

revision = "careplan_0002"
down_revision = "careplan_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in add_tracker_tables(MetaData()).values():
        table.create(op.get_bind())


def downgrade() -> None:
    for table in reversed(list(add_tracker_tables(MetaData()).values())):
        table.drop(op.get_bind())
