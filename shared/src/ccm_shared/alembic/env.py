"""Alembic environment shared by every schema; ``ccm_shared.migrate`` passes the schema and URL."""

import asyncio

from sqlalchemy import text

from alembic import context
from ccm_shared.db import create_engine_for, is_sqlite

config = context.config
SCHEMA: str = config.attributes["schema"]
URL: str = config.attributes["url"]


def _run(connection) -> None:  # noqa: ANN001
    context.configure(
        connection=connection,
        version_table_schema=SCHEMA,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    engine = create_engine_for(URL, schema=SCHEMA, pool_size=1)
    try:
        async with engine.connect() as conn:
            if not is_sqlite(URL):
                # Several `ccm migrate` at once (one Job per service) must not race on the same
                # schema: a session lock held for the whole run serialises them.
                await conn.execute(text("SELECT pg_advisory_lock(4242)"))
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
                await conn.commit()
            try:
                await conn.run_sync(_run)
                await conn.commit()
            finally:
                if not is_sqlite(URL):
                    await conn.execute(text("SELECT pg_advisory_unlock(4242)"))
                    await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `ccm migrate`")
asyncio.run(_main())
