"""careplan: ingest's mapping revisions. When a practice changes its ingest configuration, ingest
states a stored version again with ``source.mappingRevision``; the tracker took it for the same
version (by ``versionId``) and ignored it. Now the tracker keeps its current version's revision
(``care_plan_trackers.current_mapping_revision``), a version's history has a row per revision
(``care_plan_versions.mapping_revision``, part of its key), and the patient, practitioner and
condition facts keep the version that last replaced them (``version_id``, ``mapping_revision``).
Rows from before this: revision 0 (as first mapped), facts' ``version_id`` null.

Revision ID: careplan_0004
Revises: careplan_0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from ccm_shared.migrate import column_names, migration_schema

revision = "careplan_0004"
down_revision = "careplan_0003"
branch_labels = None
depends_on = None

VERSIONS = "care_plan_versions"
OLD_KEY = ["tracker_id", "version_id"]
NEW_KEY = ["tracker_id", "version_id", "mapping_revision"]


def _revision(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), nullable=False, server_default="0")


def _added() -> list[tuple[str, sa.Column]]:
    facts = [(table, column) for table in ("patients", "practitioners", "conditions")
             for column in (sa.Column("version_id", sa.String(64), nullable=True),
                            _revision("mapping_revision"))]
    return [("care_plan_trackers", _revision("current_mapping_revision")),
            (VERSIONS, _revision("mapping_revision")), *facts]


# careplan_0002 creates the tables from today's model, which has the columns and the key: added
# (or dropped) only where they are missing (or present).


def _key() -> dict:
    return sa.inspect(op.get_bind()).get_pk_constraint(VERSIONS, schema=migration_schema())


def _versions(key: list[str]) -> sa.Table:
    """``care_plan_versions`` as careplan_0002 created it, with ``mapping_revision`` and its
    primary key on ``key`` (without the column when the key does not name it)."""
    columns = [
        sa.Column("tracker_id", sa.String(36), nullable=False),
        sa.Column("version_id", sa.String(64), nullable=False),
        sa.Column("practice", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(80), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("review_date", sa.Date(), nullable=True),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    ]
    if "mapping_revision" in key:
        columns.append(_revision("mapping_revision"))
    return sa.Table(VERSIONS, sa.MetaData(), *columns,
                    sa.PrimaryKeyConstraint(*key, name=f"{VERSIONS}_pkey"))


def _set_key(key: list[str]) -> None:
    """The versions' primary key on ``key`` (dropping ``mapping_revision`` when it is not in
    it: SQLite drops no column of a key)."""
    schema = migration_schema()
    if op.get_context().dialect.name == "sqlite":
        # SQLite cannot alter a primary key: the rows are copied into the table of that shape.
        with op.batch_alter_table(VERSIONS, schema=schema, recreate="always",
                                  copy_from=_versions(key)):
            pass
        return
    name = _key().get("name") or f"{VERSIONS}_pkey"
    op.drop_constraint(name, VERSIONS, type_="primary", schema=schema)
    op.create_primary_key(name, VERSIONS, key, schema=schema)


def upgrade() -> None:
    schema = migration_schema()
    for table, column in _added():
        if column.name not in column_names(table):
            op.add_column(table, column, schema=schema)
    if _key()["constrained_columns"] != NEW_KEY:
        _set_key(NEW_KEY)


def downgrade() -> None:
    # The code before this keeps one row per version: refused while a version was re-mapped
    # (several rows of one version), rather than drop what the history says.
    schema = migration_schema()
    table = f'"{schema}".' if schema else ""
    remapped = op.get_bind().execute(sa.text(
        f"SELECT count(*) FROM {table}{VERSIONS} WHERE mapping_revision > 0")).scalar()
    if remapped:
        raise RuntimeError(
            f"careplan_0004 cannot be downgraded: {remapped} care-plan version(s) re-mapped by "
            "ingest, which the code before it would take for duplicates of their version")
    if _key()["constrained_columns"] != OLD_KEY:
        _set_key(OLD_KEY)
    for table, column in reversed(_added()):
        if column.name in column_names(table):
            op.drop_column(table, column.name, schema=schema)
