"""Advisory transaction locks on real PostgreSQL: a lock a session's transaction already holds
is not asked for again (a consumer batch takes each practice's lock once), but inside a savepoint,
whose rollback would release it, and in the next transaction it is. Several locks a unit of work
needs at its start (a month close's) are taken with one statement."""

import pytest
from sqlalchemy import event, text

from ccm_shared.db import xact_lock, xact_locks

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_held_lock_is_taken_once_per_transaction_and_really_held(pg_db):
    asked: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:  # noqa: ANN001
        if "advisory" in statement:
            asked.append(statement)

    event.listen(pg_db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        await _locks_taken_together(pg_db, asked)
        async with pg_db.unit_of_work() as uow:
            assert await xact_lock(uow.session, "close:alpha", shared=True)
            assert await xact_lock(uow.session, "close:alpha", shared=True)
            assert len(asked) == 1
            # Exclusive is another mode: asked for (and taken: the holder is this transaction).
            assert await xact_lock(uow.session, "close:alpha", wait=False)
            assert len(asked) == 2
            async with pg_db.engine.connect() as other:  # really held: nobody else gets it
                key = (await other.execute(text(
                    "SELECT ('x' || substr(encode(sha256('close:alpha'::bytea), 'hex'), 1, 16))"
                    "::bit(64)::bigint"))).scalar()
                assert (await other.execute(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                            {"k": key})).scalar() is False
                await other.rollback()
            del asked[2:]  # the other connection's try
            async with uow.session.begin_nested():  # a savepoint: asked for again inside it
                assert await xact_lock(uow.session, "close:beta", shared=True)
                assert await xact_lock(uow.session, "close:beta", shared=True)
            assert len(asked) == 4
            await uow.commit()
        async with pg_db.unit_of_work() as uow:  # the next transaction holds nothing yet
            assert await xact_lock(uow.session, "close:alpha", shared=True)
            assert len(asked) == 5
            await uow.commit()
    finally:
        event.remove(pg_db.engine.sync_engine, "before_cursor_execute", seen)


async def _held_elsewhere(pg_db, name: str) -> bool:  # noqa: ANN001
    async with pg_db.engine.connect() as other:
        key = (await other.execute(text(
            "SELECT ('x' || substr(encode(sha256(convert_to(CAST(:n AS text), 'UTF8')), 'hex'), 1, 16))"
            "::bit(64)::bigint"), {"n": name})).scalar()
        free = (await other.execute(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                    {"k": key})).scalar()
        await other.rollback()
    return not free


async def _locks_taken_together(pg_db, asked: list[str]) -> None:  # noqa: ANN001
    async with pg_db.unit_of_work() as uow:
        await xact_locks(uow.session, ["close:gamma", "decide:gamma:2026-03", "close:gamma"])
        assert len(asked) == 1 and asked[0].count("pg_advisory_xact_lock(") == 2, asked
        del asked[:]
        assert await _held_elsewhere(pg_db, "close:gamma")
        assert await _held_elsewhere(pg_db, "decide:gamma:2026-03")
        del asked[:]  # the other connection's tries
        # Already held by this transaction: neither asked for again.
        assert await xact_lock(uow.session, "decide:gamma:2026-03")
        await xact_locks(uow.session, ["close:gamma"])
        assert asked == []
        await uow.commit()
    assert not await _held_elsewhere(pg_db, "close:gamma")  # released at commit
    del asked[:]
