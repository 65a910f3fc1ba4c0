"""Advisory transaction locks on real PostgreSQL: a lock a session's transaction already holds
is not asked for again (a consumer batch takes each practice's lock once), but inside a savepoint,
whose rollback would release it, and in the next transaction it is."""

import pytest
from sqlalchemy import event, text

from ccm_shared.db import xact_lock

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_held_lock_is_taken_once_per_transaction_and_really_held(pg_db):
    asked: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:  # noqa: ANN001
        if "advisory" in statement:
            asked.append(statement)

    event.listen(pg_db.engine.sync_engine, "before_cursor_execute", seen)
    try:
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
