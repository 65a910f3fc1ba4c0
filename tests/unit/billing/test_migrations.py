"""billing_0006 drops the unused ``time_entries.locked`` from databases that still have it (and
its downgrade puts it back), on SQLite as in embedded mode."""

import asyncio

import sqlalchemy as sa
from alembic import command

from ccm_shared.db import create_engine_for
from ccm_shared.migrate import alembic_config, upgrade, upgrade_platform

PACKAGE = "ccm_billing.migrations"


def columns(url: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_engine_for(url, schema="billing", pool_size=1)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: {
                    col["name"] for col in sa.inspect(c).get_columns("time_entries",
                                                                      schema="billing")})
        finally:
            await engine.dispose()
    return asyncio.run(read())


def test_locked_is_dropped_and_a_downgrade_restores_it(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    upgrade(url, "billing", PACKAGE)
    assert "locked" not in columns(url) and "late" in columns(url)
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0005")
    assert "locked" in columns(url)  # as a database migrated before billing_0006 has it
    upgrade(url, "billing", PACKAGE)
    assert "locked" not in columns(url) and "late" in columns(url)
