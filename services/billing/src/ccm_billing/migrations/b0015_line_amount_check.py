"""billing: on PostgreSQL, ``month_decision_lines.amount`` must be written as the decider writes
it (``f"{amount:.2f}"``: an optional minus, at most 13 integer digits without a leading zero,
two decimals). A month close has the database write each line's amount as JSON from that text
(``decision_cache.invoice_lines``); checking the form there cost it ~5 ms per 1,000-patient
practice, checking it here costs the decider a regular expression per line it writes. Pricing
refuses a line it could not hold (non-finite, or 10 ** 13 USD or more: ``PricingInvalid``). SQLite
(embedded mode) has no regular expressions and reads the lines in Python.

Revision ID: billing_0015
Revises: billing_0014
Create Date: 2026-11-27
"""

from alembic import op

from ccm_shared.migrate import migration_schema

revision = "billing_0015"
down_revision = "billing_0014"
branch_labels = None
depends_on = None

NAME = "ck_decision_lines_amount"
# The form as of this revision (decision_cache.AMOUNT_FORM).
FORM = r"^-?(0|[1-9][0-9]{0,12})[.][0-9]{2}$"


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.create_check_constraint(NAME, "month_decision_lines", f"amount ~ '{FORM}'",
                                   schema=migration_schema())


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.drop_constraint(NAME, "month_decision_lines", type_="check",
                           schema=migration_schema())
