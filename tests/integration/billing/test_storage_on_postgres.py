"""Billing's storage on real PostgreSQL: the large documents (Invoices, and the outbox events
that carry them) are compressed with lz4 where the server has it (billing_0010)."""

import pytest
from sqlalchemy import text

from ccm_shared.db import create_engine_for
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import discover_services

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_invoices_and_their_events_are_compressed_with_lz4_where_the_server_has_it(infra):
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    engine = create_engine_for(infra.database_url, schema=definition.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            has_lz4 = (await conn.execute(text(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                "WHERE name = 'default_toast_compression'"))).scalar()
            columns = dict((await conn.execute(text(
                "SELECT c.relname || '.' || a.attname, a.attcompression::text FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :schema AND (c.relname, a.attname) IN "
                "(('invoices', 'resource'), ('outbox', 'payload'))"),
                {"schema": definition.schema})).all())
    finally:
        await engine.dispose()
    assert has_lz4, "the project's PostgreSQL (Debian's 15) is built with lz4"
    assert columns == {"invoices.resource": "l", "outbox.payload": "l"}
