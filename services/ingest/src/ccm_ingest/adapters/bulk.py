"""Many rows of several tables in one statement, inside the session's transaction.

On PostgreSQL each table's rows travel as one JSON text parameter and one statement inserts them
all: ``WITH a AS (INSERT … SELECT … FROM json_to_recordset($1::json) AS r(col type, …)), …``.
The rows are written by orjson in C and PostgreSQL parses them, on its own core: binding the
same rows as one array per column made asyncpg check and encode every element in the API
process, whose single core is what limits ingest. The text depends only on the tables and
columns, so asyncpg prepares it once per connection, and it goes through SQLAlchemy's lowest
level (``exec_driver_sql``: no compile, and the unit of work's transaction begins as with any
statement). One round trip and no per-row SQL, whether the batch is one resource or a Bundle of
a thousand. Elsewhere (SQLite, embedded mode) one executemany INSERT per table.

A value that is a JSON document (a dict or list: a stored version, a CCM state) goes into a text
column as its compact JSON text. On PostgreSQL it travels nested in the rows' JSON, and
``json_to_recordset`` gives a text column a nested value's text as written: the document is
written once, not written and then escaped as a string inside the rows' JSON.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import BigInteger, Boolean, DateTime, Integer, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_shared.db import qualified, schema_of
from ccm_shared.jsontext import compact

_PG_TYPES = ((BigInteger, "bigint"), (Integer, "int"), (Boolean, "bool"),
             (DateTime, "timestamptz"), (String, "text"))


@lru_cache(maxsize=256)
def _pg_type(table: Table, column: str) -> str:
    kind = table.c[column].type
    return next(name for cls, name in _PG_TYPES if isinstance(kind, cls))


@lru_cache(maxsize=64)
def _pg_sql(schema: str | None, shape: tuple[tuple[Table, tuple[str, ...]], ...]) -> str:
    """The statement for tables and their columns, in order (the same text every time, so
    asyncpg's per-connection prepared statement is reused)."""
    parts: list[str] = []
    for n, (table, columns) in enumerate(shape, start=1):
        names = ", ".join(f'"{c}"' for c in columns)
        record = ", ".join(f'"{c}" {_pg_type(table, c)}' for c in columns)
        parts.append(f"INSERT INTO {qualified(schema, table.name)} ({names}) "
                     f"SELECT {names} FROM json_to_recordset(${n}::json) AS r({record})")
    *first, last = parts
    return ("WITH " + ", ".join(f"w{n} AS ({p})" for n, p in enumerate(first)) + " " + last
            if first else last)


def _as_text(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with their JSON documents as text (``compact``: also what orjson cannot
    write, such as integers beyond 64 bits)."""
    return [{k: compact(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
            for row in rows]


def _rows_json(rows: list[dict[str, Any]]) -> str:
    # Aware datetimes keep their offset; a naive one is UTC, as everything stored is.
    try:
        return orjson.dumps(rows, default=str, option=orjson.OPT_NAIVE_UTC).decode()
    except TypeError:  # a document orjson cannot write: each as its text
        return orjson.dumps(_as_text(rows), default=str, option=orjson.OPT_NAIVE_UTC).decode()


async def insert_all(session: AsyncSession,
                     batches: list[tuple[Table, list[dict[str, Any]]]]) -> None:
    """Insert each table's rows (dicts with the same keys), in order, tables in list order."""
    batches = [(table, rows) for table, rows in batches if rows]
    if not batches:
        return
    if session.bind.dialect.name != "postgresql":
        for table, rows in batches:
            await session.execute(insert(table), _as_text(rows))
        return
    schema = schema_of(session)
    shape = tuple((table, tuple(rows[0])) for table, rows in batches)
    params = tuple(_rows_json(rows) for _, rows in batches)
    await (await session.connection()).exec_driver_sql(_pg_sql(schema, shape), params)
