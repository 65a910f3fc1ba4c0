"""billing: the columns filled from ingest's and careplan's events hold whatever those events
may carry. A reference ``Type/id`` takes the longest R4 type name and a FHIR id of 64 characters
(98; "PractitionerRole/" and 64 characters is 81, and the 80 these had dead-lettered the time
entry, consent, role or review naming such a role); a source version takes a versionId of 64
(93); ``patients.mbi`` any identifier value (text: one longer than 20 characters was
dead-lettered, billing kept the old MBI and active flag), with a hash index, which holds any
value (a btree entry holds ~2,700 bytes; the duplicate-biller check only asks equality);
``care_plan_reviews.event_id`` any event id the inbox takes (200).

On PostgreSQL only, and only where a column is narrower: billing_0002 creates the tables from
today's model, and SQLite ignores VARCHAR lengths (its index is a btree, which holds any value).
Widening a VARCHAR, or making it text, rewrites neither the table nor its indexes.

Revision ID: billing_0019
Revises: billing_0018
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import migration_schema, widen_columns

revision = "billing_0019"
down_revision = "billing_0018"
branch_labels = None
depends_on = None

REFERENCE, VERSION, EVENT_ID = 98, 93, 200
PROJECTIONS = ("time_entries", "consents", "care_plans", "conditions", "patients",
               "practitioner_roles", "visits")
WIDER = (
    *((table, "version", sa.String(VERSION)) for table in PROJECTIONS),
    ("time_entries", "data_version", sa.String(VERSION)),
    ("care_plans", "review_version", sa.String(VERSION)),
    ("time_entries", "practitioner", sa.String(REFERENCE)),
    ("time_entries", "practitioner_role", sa.String(REFERENCE)),
    ("consents", "practitioner", sa.String(REFERENCE)),
    ("practitioner_roles", "practitioner", sa.String(REFERENCE)),
    ("care_plan_reviews", "responsible_provider", sa.String(REFERENCE)),
    ("care_plan_reviews", "supervisor", sa.String(REFERENCE)),
    ("care_plan_reviews", "event_id", sa.String(EVENT_ID)),
    ("patients", "mbi", sa.Text()),
)
MBI_INDEX = "ix_patients_mbi"


def _index_method(name: str) -> str | None:
    return op.get_bind().execute(sa.text(
        "SELECT am.amname FROM pg_class i JOIN pg_am am ON am.oid = i.relam "
        "JOIN pg_namespace n ON n.oid = i.relnamespace WHERE n.nspname = :schema "
        "AND i.relname = :name"), {"schema": migration_schema(), "name": name}).scalar()


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    schema = migration_schema()
    method = _index_method(MBI_INDEX)
    if method not in (None, "hash"):
        op.drop_index(MBI_INDEX, table_name="patients", schema=schema)
    widen_columns(WIDER)
    if method != "hash":
        op.create_index(MBI_INDEX, "patients", ["mbi"], postgresql_using="hash", schema=schema)


def downgrade() -> None:
    # Nothing: the code before this reads and writes the wider columns and the hash index as it
    # did the narrower ones and the btree, and what they hold now may not fit the old widths.
    pass
