"""Small SQL helpers shared by the service layer (dialect-aware inserts, practice lookups)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_shared.db import dialect_insert
from ccm_shared.tables import practices


def insert_for(session: AsyncSession, table):  # noqa: ANN001, ANN201
    """INSERT … ON CONFLICT-capable insert for the session's dialect."""
    return dialect_insert(session.bind.dialect.name)(table)


async def practice_row(session: AsyncSession, practice: str):  # noqa: ANN201
    return (await session.execute(select(practices).where(practices.c.id == practice))).first()


async def upsert(session: AsyncSession, table, key: dict, values: dict) -> None:  # noqa: ANN001
    """Insert the row identified by ``key`` or update it with ``values``."""
    stmt = insert_for(session, table).values(**key, **values)
    await session.execute(stmt.on_conflict_do_update(index_elements=list(key), set_=values))
