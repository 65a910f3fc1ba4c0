"""billing: ``invoices.lines_in_place``: the Invoice's FHIR resource is stored without its
``lineItem``, which its ChargeItems give when it is read (``filed.invoice_resource``). An
Invoice has a line per billable patient and code (1,780 for 1,000 patients, ~320 KB); its event
carries them, and writing them a second time into the row cost a month close ~10 % of its time.
Invoices issued before this keep their whole resource (false). The downgrade puts every
Invoice's lines back into its resource, as the older code reads it.

Revision ID: billing_0016
Revises: billing_0015
Create Date: 2026-11-27
"""

import json
from decimal import Decimal

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
    """The older code serves ``invoices.resource`` as it is: put each Invoice's lines back in."""
    if "lines_in_place" not in column_names("invoices"):
        return
    schema = migration_schema()
    prefix, bind = f'"{schema}".', op.get_bind()
    invoices = bind.execute(sa.text(
        f"SELECT id, resource FROM {prefix}invoices WHERE lines_in_place")).all()
    for invoice_id, text in invoices:
        # The Invoice's ChargeItems, wherever they are (adapters/filed.py as of this revision).
        lines = sorted(bind.execute(sa.text(
            f"SELECT patient, code, id, amount FROM {prefix}charge_items WHERE invoice_id = :i "
            f"UNION ALL SELECT l.patient, l.code, l.charge_item_id, l.amount "
            f"FROM {prefix}month_decision_lines l JOIN {prefix}billing_periods p "
            f"ON p.practice = l.practice AND p.month = l.month WHERE p.line_invoice = :i"),
            {"i": invoice_id}).all())
        stored, resource = json.loads(text), {}
        for key, value in stored.items():
            if key == "totalNet" and lines:
                resource["lineItem"] = [
                    {"sequence": n, "chargeItemReference": {"reference": f"ChargeItem/{item}"},
                     "priceComponent": [{"type": "base", "amount": {
                         "value": float(Decimal(amount)), "currency": "USD"}}]}
                    for n, (_, _, item, amount) in enumerate(lines, start=1)]
            resource[key] = value
        bind.execute(sa.text(f"UPDATE {prefix}invoices SET resource = :r WHERE id = :i"),
                     {"r": json.dumps(resource, separators=(",", ":"), ensure_ascii=False),
                      "i": invoice_id})
    op.drop_column("invoices", "lines_in_place", schema=schema)
