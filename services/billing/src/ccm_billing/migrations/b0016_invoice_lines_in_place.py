"""billing: ``invoices.lines_in_place``: the Invoice's FHIR resource is stored without its
``lineItem``, which its ChargeItems give when it is read (``filed.invoice_resource``). An
Invoice has a line per billable patient and code (1,780 for 1,000 patients, ~320 KB); its event
carries them, and writing them a second time into the row cost a month close ~10 % of its time.
Invoices issued before this keep their whole resource (false).

Revision ID: billing_0016
Revises: billing_0015
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0016"
down_revision = "billing_0015"
branch_labels = None
depends_on = None


# billing_0002 creates invoices from today's model, which has the column: added (or dropped)
# only where it is missing (or present).


def upgrade() -> None:
    if "lines_in_place" not in column_names("invoices"):
        op.add_column("invoices", sa.Column("lines_in_place", sa.Boolean(), nullable=False,
                                            server_default=sa.false()),
                      schema=migration_schema())


def downgrade() -> None:
    if "lines_in_place" in column_names("invoices"):
        op.drop_column("invoices", "lines_in_place", schema=migration_schema())
