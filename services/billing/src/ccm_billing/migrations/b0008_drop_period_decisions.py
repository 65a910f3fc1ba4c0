"""billing: drop ``billing_periods.decisions``. It held a copy of every decision of a closed
month (about 1.5 KB per patient, written again at each correction); the month's decision filings
already hold them, and ``evidence.filed_decisions`` reads them from there. The downgrade puts
the column back, rebuilt from the filings.

Revision ID: billing_0008
Revises: billing_0007
Create Date: 2026-11-27
"""

import json

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "billing_0008"
down_revision = "billing_0007"
branch_labels = None
depends_on = None


def _has_decisions() -> bool:
    # billing_0002 creates the table from today's model, which no longer has the column.
    return "decisions" in column_names("billing_periods")


def upgrade() -> None:
    if _has_decisions():
        op.drop_column("billing_periods", "decisions", schema=migration_schema())


def downgrade() -> None:
    if _has_decisions():
        return
    op.add_column("billing_periods", sa.Column("decisions", sa.Text(), nullable=False,
                                               server_default="[]"),
                  schema=migration_schema())
    bind, q = op.get_bind(), f'"{migration_schema()}"'
    for practice, month in bind.execute(sa.text(f"SELECT practice, month FROM {q}.billing_periods")):
        latest: dict[str, tuple[int, str]] = {}
        for patient, rev, decision in bind.execute(sa.text(
                f"SELECT patient, revision, decision FROM {q}.decision_filings "
                "WHERE practice = :p AND month = :m"), {"p": practice, "m": month}):
            if patient not in latest or rev > latest[patient][0]:
                latest[patient] = (rev, decision)
        docs = [json.loads(latest[p][1]) for p in sorted(latest)]
        bind.execute(sa.text(f"UPDATE {q}.billing_periods SET decisions = :d "
                             "WHERE practice = :p AND month = :m"),
                     {"d": json.dumps([d for d in docs if d is not None], separators=(",", ":")),
                      "p": practice, "m": month})
