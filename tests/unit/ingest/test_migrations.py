"""ingest's own migrations, up and down (SQLite, as in embedded mode)."""

import asyncio

import sqlalchemy as sa
from alembic import command

from ccm_shared.db import create_engine_for
from ccm_shared.migrate import alembic_config, upgrade, upgrade_platform
from ccm_shared.service import discover_services


def columns(url: str, schema: str, table: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_engine_for(url, schema=schema, pool_size=1)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: {
                    col["name"] for col in sa.inspect(c).get_columns(table, schema=schema)})
        finally:
            await engine.dispose()
    return asyncio.run(read())


def test_ingest_0004_adds_the_version_method_and_its_downgrade_drops_it(tmp_path):
    definition = discover_services()["ingest"]
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    schema, package = definition.schema, definition.migrations_package
    upgrade_platform(url)
    upgrade(url, schema, package)
    assert "method" in columns(url, schema, "resource_versions")
    config = alembic_config(url, schema, package)
    command.downgrade(config, "ingest_0003")
    assert "method" not in columns(url, schema, "resource_versions")  # as the older code had it
    command.upgrade(config, "head")
    assert "method" in columns(url, schema, "resource_versions")


def test_ingest_0006_adds_the_config_revision_and_its_downgrade_drops_it(tmp_path):
    definition = discover_services()["ingest"]
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    schema, package = definition.schema, definition.migrations_package
    upgrade_platform(url)
    config = alembic_config(url, schema, package)
    upgrade(url, schema, package)
    command.downgrade(config, "ingest_0005")
    assert "revision" not in columns(url, schema, "ingest_configs")  # as the older code had it

    async def older_config() -> None:  # a practice's overrides stored by the older code
        engine = create_engine_for(url, schema=schema, pool_size=1)
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text(
                    "INSERT INTO ingest_configs (tenant, config, updated_at) "
                    "VALUES ('alpha', '{}', '2026-11-28 00:00:00')"))
        finally:
            await engine.dispose()

    asyncio.run(older_config())
    command.upgrade(config, "head")
    assert "revision" in columns(url, schema, "ingest_configs")

    async def revisions() -> list:
        engine = create_engine_for(url, schema=schema, pool_size=1)
        try:
            async with engine.connect() as conn:
                return (await conn.execute(sa.text(
                    "SELECT tenant, revision FROM ingest_configs"))).all()
        finally:
            await engine.dispose()

    assert [tuple(r) for r in asyncio.run(revisions())] == [("alpha", 0)]
