"""billing: ``consents.valid_from`` / ``valid_until``: the consent's ``provision.period`` (ingest
sends it in every consent event), as days of the practice. A consent counts only for months its
period reaches; before, a consent whose period had ended went on billing. Consents stored
before this have neither (no period known: as before) until their next event.

Revision ID: billing_0017
Revises: billing_0016
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0017"
down_revision = "billing_0016"
branch_labels = None
depends_on = None

COLUMNS = ("valid_from", "valid_until")


# billing_0002 creates consents from today's model, which has the columns: added (or dropped)
# only where they are missing (or present).


def upgrade() -> None:
    present = column_names("consents")
    for name in COLUMNS:
        if name not in present:
            op.add_column("consents", sa.Column(name, sa.Date(), nullable=True),
                          schema=migration_schema())


def downgrade() -> None:
    present = column_names("consents")
    for name in COLUMNS:
        if name in present:
            op.drop_column("consents", name, schema=migration_schema())
