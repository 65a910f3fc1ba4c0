"""Messaging version 2: every service's migrations give its inbox the index on ``processed_at``
that retention deletes by; on a database migrated before, the service's own migration adds it,
and its downgrade takes it away (SQLite, as in embedded mode)."""

import asyncio

import pytest
import sqlalchemy as sa
from alembic import command

from ccm_shared.db import create_engine_for
from ccm_shared.migrate import alembic_config, upgrade, upgrade_platform
from ccm_shared.service import discover_services

REVISIONS = {"ingest": "ingest_0003", "billing": "billing_0007", "careplan": "careplan_0003",
             "notification": "notification_0004"}


def inbox_indexes(url: str, schema: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_engine_for(url, schema=schema, pool_size=1)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: {
                    i["name"] for i in sa.inspect(c).get_indexes("inbox", schema=schema)})
        finally:
            await engine.dispose()
    return asyncio.run(read())


@pytest.mark.parametrize("service", sorted(REVISIONS))
def test_the_inbox_age_index_comes_with_each_service_and_goes_with_its_downgrade(tmp_path,
                                                                                 service):
    definition = discover_services()[service]
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    schema, package = definition.schema, definition.migrations_package
    upgrade_platform(url)
    upgrade(url, schema, package)
    assert "ix_inbox_processed" in inbox_indexes(url, schema)
    config = alembic_config(url, schema, package)
    command.downgrade(config, f"{REVISIONS[service]}-1")
    assert "ix_inbox_processed" not in inbox_indexes(url, schema)  # as before messaging v2
    command.upgrade(config, "head")
    assert "ix_inbox_processed" in inbox_indexes(url, schema)
