"""careplan: review tracker, versions, reviews, scheduled steps, distributions, rules, and the
patient / practitioner / condition facts the tracker needs.

Revision ID: careplan_0002
Revises: careplan_0001
Create Date: 2026-11-27
"""

from ccm_careplan.adapters.orm import add_tracker_tables
from ccm_shared.migrate import create_tables, drop_tables

revision = "careplan_0002"
down_revision = "careplan_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_tables(add_tracker_tables)


def downgrade() -> None:
    drop_tables(add_tracker_tables)
