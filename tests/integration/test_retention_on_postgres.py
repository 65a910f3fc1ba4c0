"""Retention of the messaging tables on real PostgreSQL: the same outcomes as on the embedded
database, and while one process prunes a schema another one skips it."""

import pytest

from ccm_shared.db import xact_lock
from ccm_shared.retention import prune
from tests.unit.test_retention import NOW, fill, remaining

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_old_published_and_processed_rows_go_in_batches(pg_db):
    await fill(pg_db, outbox=[(20, 19), (20, None), (9, 8), (8, 6.9), (1, 1)] + [(10, 9)] * 7,
               inbox=[40, 30.5, 29, 1] + [31] * 6)
    pruned = await prune(pg_db, outbox_days=7, inbox_days=30, now=NOW, batch=3)
    assert (pruned.outbox, pruned.inbox) == (9, 8)
    assert await remaining(pg_db) == (["e1", "e3", "e4"], ["i2", "i3"])


async def test_a_schema_being_pruned_elsewhere_is_skipped(pg_db):
    await fill(pg_db, outbox=[(20, 19)], inbox=[40])
    async with pg_db.engine.begin() as other:  # another process holds the schema's lock
        assert await xact_lock(other, f"ccm-retention:{pg_db.schema}", wait=False)
        pruned = await prune(pg_db, outbox_days=7, inbox_days=30, now=NOW)
    assert (pruned.outbox, pruned.inbox) == (0, 0)
    assert await remaining(pg_db) == (["e0"], ["i0"])
    pruned = await prune(pg_db, outbox_days=7, inbox_days=30, now=NOW)
    assert (pruned.outbox, pruned.inbox) == (1, 1)
