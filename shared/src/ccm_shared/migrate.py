"""Alembic migrations per schema: ``platform`` first, then each service's own.

One shared ``env.py`` (``ccm_shared/alembic``) serves every schema; each service keeps only its
revision files (``ccm_<service>/migrations``). The version table lives in the schema it versions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import command, op
from alembic.config import Config
from sqlalchemy import MetaData

from ccm_shared.tables import add_messaging_tables

PLATFORM = "platform"


def _package_dir(package: str) -> str:
    return str(Path(str(resources.files(package))))


def alembic_config(url: str, schema: str, versions_package: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _package_dir("ccm_shared.alembic"))
    cfg.set_main_option("version_locations", _package_dir(versions_package))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["schema"] = schema
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, schema: str, versions_package: str, revision: str = "head") -> None:
    """Run in a thread of its own when called from async code: env.py starts its own loop."""
    command.upgrade(alembic_config(url, schema, versions_package), revision)


async def upgrade_async(url: str, schema: str, versions_package: str) -> None:
    await asyncio.to_thread(upgrade, url, schema, versions_package)


def upgrade_platform(url: str) -> None:
    upgrade(url, PLATFORM, "ccm_shared.platform_migrations")


Declare = Callable[[MetaData], "dict[str, sa.Table] | Sequence[sa.Table]"]


def _declared(declare: Declare) -> list[sa.Table]:
    tables = declare(MetaData())
    return list(tables.values() if isinstance(tables, dict) else tables)


def create_tables(declare: Declare) -> None:
    """Inside a migration: create the tables ``declare`` adds to a fresh MetaData, in order
    (an ``add_…_tables`` function of that version, returning them by name or in a sequence)."""
    for table in _declared(declare):
        table.create(op.get_bind())


def drop_tables(declare: Declare) -> None:
    """Inside a migration's downgrade: drop what ``create_tables(declare)`` created, in reverse."""
    for table in reversed(_declared(declare)):
        table.drop(op.get_bind())


def create_messaging_tables() -> None:
    """Inside a service's first migration: its outbox, inbox and event_sequences tables.

    The definitions come from ``tables.add_messaging_tables`` (version 1); any later change to
    them must come with a migration of its own that alters these tables.
    """
    create_tables(add_messaging_tables)


def migration_schema() -> str:
    """Inside a migration: the schema it migrates (on SQLite, the service's attached file)."""
    return op.get_context().version_table_schema


def column_names(table: str) -> set[str]:
    """Inside a migration: the columns ``table`` has now. A service's first migrations create
    tables from today's model, so a later migration that adds or drops a column checks first."""
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table,
                                                                     schema=migration_schema())}


def widen_columns(wider: Sequence[tuple[str, str, sa.types.TypeEngine]]) -> None:
    """Inside a migration, on PostgreSQL: each (table, column, type) made that type where the
    column holds less now (a shorter VARCHAR; text holds anything), never narrowed. Widening a
    VARCHAR, or making it text, rewrites neither the table nor its indexes. SQLite ignores
    VARCHAR lengths: nothing to do there."""
    if op.get_context().dialect.name != "postgresql":
        return
    schema = migration_schema()
    inspector = sa.inspect(op.get_bind())
    now = {}
    for table in {table for table, _, _ in wider}:
        now.update({(table, c["name"]): c["type"]
                    for c in inspector.get_columns(table, schema=schema)})
    for table, name, kind in wider:
        held = getattr(now[table, name], "length", None)
        if held is not None and (kind.length is None or kind.length > held):
            op.alter_column(table, name, type_=kind, existing_type=now[table, name],
                            schema=schema)


def create_inbox_age_index() -> None:
    """Messaging version 2, in each service's migration of its own: the inbox's index on
    ``processed_at`` that retention deletes by (the first migration creates it from today's
    definition on a new database, hence ``if_not_exists``)."""
    op.create_index("ix_inbox_processed", "inbox", ["processed_at"], if_not_exists=True,
                    schema=migration_schema())


def drop_inbox_age_index() -> None:
    op.drop_index("ix_inbox_processed", table_name="inbox", if_exists=True,
                  schema=migration_schema())


def drop_messaging_tables() -> None:
    drop_tables(add_messaging_tables)
