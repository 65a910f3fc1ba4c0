"""ingest: ``consent_expiry_notices``, the expiry notices sent (ingest.consent.expiring.v1), one
per consent, end day and patient.

Revision ID: ingest_0005
Revises: ingest_0004
Create Date: 2026-11-28
"""

from alembic import op

revision = "ingest_0005"
down_revision = "ingest_0004"
branch_labels = None
depends_on = None


def _table():  # noqa: ANN202
    from ccm_ingest.adapters import orm

    return orm.consent_expiry_notices


def upgrade() -> None:
    _table().create(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    _table().drop(op.get_bind(), checkfirst=True)
