"""Many rows in one go inside the session's transaction.

On PostgreSQL the rows go straight to asyncpg on the session's own connection (so inside its
transaction): COPY for a large batch (one fixed-cost exchange, no per-row SQL), else one
prepared INSERT whose text never changes (asyncpg prepares it once per connection). This skips
SQLAlchemy's per-statement compile and parameter processing, which cost more than the database
on the write path. Elsewhere (SQLite, embedded mode) an executemany INSERT.

(billing has a COPY helper of the same kind; a candidate for ccm_shared.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

COPY_FROM_ROWS = 16  # below this, a prepared INSERT is cheaper than COPY's extra round trips


async def driver_connection(session: AsyncSession) -> tuple[Any, str | None]:
    """(the asyncpg connection of the session's transaction, the schema its tables live in)."""
    conn = await session.connection()
    options = conn.sync_connection.get_execution_options()
    schema = (options.get("schema_translate_map") or {}).get(None)
    raw = (await conn.get_raw_connection()).driver_connection
    if not raw.is_in_transaction():
        # SQLAlchemy sends BEGIN lazily, with its first statement: make it now, or these rows
        # would commit on their own (autocommit) instead of with the unit of work.
        await conn.exec_driver_sql("SELECT 1")
        if not raw.is_in_transaction():
            raise RuntimeError("no transaction is open on the session's connection")
    return raw, schema


def qualified(schema: str | None, table: str) -> str:
    return f'"{schema}"."{table}"' if schema else f'"{table}"'


async def bulk_insert(session: AsyncSession, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts with the same keys, values of the columns' Python types) in
    order."""
    if not rows:
        return
    if session.bind.dialect.name != "postgresql":
        await session.execute(insert(table), rows)
        return
    raw, schema = await driver_connection(session)
    columns = list(rows[0])
    records = [tuple(r[c] for c in columns) for r in rows]
    if len(rows) >= COPY_FROM_ROWS:
        await raw.copy_records_to_table(table.name, records=records, columns=columns,
                                        schema_name=schema)
        return
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
    await raw.executemany(f"INSERT INTO {qualified(schema, table.name)} ({names}) "
                          f"VALUES ({marks})", records)
