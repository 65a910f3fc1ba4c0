"""Many rows of several tables in one statement, inside the session's transaction.

On PostgreSQL every table's rows travel as one array per column and one statement inserts them
all: ``WITH a AS (INSERT … SELECT * FROM unnest($1::text[], …)), … INSERT … unnest(…)``. The
text depends only on the tables and columns, so asyncpg prepares it once per connection, and
it goes through SQLAlchemy's lowest level (``exec_driver_sql``: no compile, and the unit of
work's transaction begins as with any statement). One round trip and no per-row SQL, whether
the batch is one resource or a Bundle of a thousand. Elsewhere (SQLite, embedded mode) one
executemany INSERT per table.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

_PG_ARRAY_TYPES = ((BigInteger, "bigint"), (Integer, "int"), (Boolean, "bool"),
                   (DateTime, "timestamptz"), (String, "text"))


def _pg_type(table: Table, column: str) -> str:
    kind = table.c[column].type
    return next(name for cls, name in _PG_ARRAY_TYPES if isinstance(kind, cls))


async def service_schema(session: AsyncSession) -> str | None:
    """The schema the session's tables live in (the engine's schema_translate_map)."""
    conn = await session.connection()
    return (conn.sync_connection.get_execution_options().get("schema_translate_map")
            or {}).get(None)


def qualified(schema: str | None, table: str) -> str:
    return f'"{schema}"."{table}"' if schema else f'"{table}"'


async def insert_all(session: AsyncSession,
                     batches: list[tuple[Table, list[dict[str, Any]]]]) -> None:
    """Insert each table's rows (dicts with the same keys), in order, tables in list order."""
    batches = [(table, rows) for table, rows in batches if rows]
    if not batches:
        return
    if session.bind.dialect.name != "postgresql":
        for table, rows in batches:
            await session.execute(insert(table), rows)
        return
    schema = await service_schema(session)
    parts: list[str] = []
    params: list[list[Any]] = []
    for table, rows in batches:
        columns = list(rows[0])
        arrays = ", ".join(f"${len(params) + n}::{_pg_type(table, c)}[]"
                           for n, c in enumerate(columns, start=1))
        params += [[row[c] for row in rows] for c in columns]
        names = ", ".join(f'"{c}"' for c in columns)
        parts.append(f"INSERT INTO {qualified(schema, table.name)} ({names}) "
                     f"SELECT * FROM unnest({arrays})")
    *first, last = parts
    sql = ("WITH " + ", ".join(f"w{n} AS ({p})" for n, p in enumerate(first)) + " " + last
           if first else last)
    await (await session.connection()).exec_driver_sql(sql, tuple(params))
