"""Retention of the messaging tables (ccm_shared.retention) on the embedded database: published
outbox rows and processed inbox rows older than their retention go, in batches; unpublished
rows never do; 0 days keeps a table forever; the runtime starts the job only when there is
something to prune."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select

from ccm_shared.retention import prune
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tables import inbox_table, outbox_table

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


async def fill(db, *, outbox: list[tuple[float, float | None]], inbox: list[float]) -> None:
    """Outbox rows (age in days when written, age when published or None) and inbox rows
    (age in days when processed)."""
    async with db.engine.begin() as conn:
        if outbox:
            await conn.execute(insert(outbox_table), [{
                "event_id": f"e{n}", "tenant": "alpha", "topic": "t", "key": "k",
                "event_type": "t", "payload": "{}", "created_at": NOW - timedelta(days=made),
                "sent_at": None if sent is None else NOW - timedelta(days=sent),
            } for n, (made, sent) in enumerate(outbox)])
        if inbox:
            await conn.execute(insert(inbox_table), [{
                "consumer": "c", "event_id": f"i{n}", "tenant": "alpha", "topic": "t",
                "partition": 0, "offset": n, "outcome": "applied",
                "processed_at": NOW - timedelta(days=age)} for n, age in enumerate(inbox)])


async def remaining(db) -> tuple[list[str], list[str]]:
    async with db.engine.connect() as conn:
        out = (await conn.execute(select(outbox_table.c.event_id)
                                  .order_by(outbox_table.c.id))).scalars().all()
        inn = (await conn.execute(select(inbox_table.c.event_id)
                                  .order_by(inbox_table.c.event_id))).scalars().all()
    return list(out), list(inn)


async def test_old_published_and_processed_rows_go_unpublished_and_recent_ones_stay(sqlite_db):
    await fill(sqlite_db,
               outbox=[(20, 19), (20, None), (9, 8), (8, 6.9), (1, 1), (30, None)],
               inbox=[40, 30.5, 29, 1])
    pruned = await prune(sqlite_db, outbox_days=7, inbox_days=30, now=NOW)
    assert (pruned.outbox, pruned.inbox) == (2, 2)
    # e0 and e2 were published over 7 days ago; e1 and e5 were never published.
    assert await remaining(sqlite_db) == (["e1", "e3", "e4", "e5"], ["i2", "i3"])


async def test_batches_continue_until_everything_due_is_gone(sqlite_db):
    await fill(sqlite_db, outbox=[(10, 9)] * 23 + [(1, 1)], inbox=[31] * 11 + [2])
    pruned = await prune(sqlite_db, outbox_days=7, inbox_days=30, now=NOW, batch=5)
    assert (pruned.outbox, pruned.inbox) == (23, 11)
    assert await remaining(sqlite_db) == (["e23"], ["i11"])


@pytest.mark.parametrize(("outbox_days", "inbox_days", "left"), [
    (0, 30, (2, 1)), (7, 0, (1, 2)), (0, 0, (2, 2))])
async def test_zero_days_keeps_that_table_forever(sqlite_db, outbox_days, inbox_days, left):
    await fill(sqlite_db, outbox=[(400, 399), (1, 1)], inbox=[400, 1])
    await prune(sqlite_db, outbox_days=outbox_days, inbox_days=inbox_days, now=NOW)
    out, inn = await remaining(sqlite_db)
    assert (len(out), len(inn)) == left


async def test_runtime_starts_the_job_only_when_a_table_has_a_retention(tmp_path, clean_ccm_env):
    definition = discover_services()["ingest"]
    names = {}
    for days in (7.0, 0.0):
        settings = load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/p{days}.db",
                                 outbox_retention_days=days, inbox_retention_days=days)
        runtime = ServiceRuntime.build(definition, settings)
        await runtime.start(consumers=False, relay=False, background=True)
        names[days] = {t.get_name() for t in runtime._tasks}
        assert runtime.failed_tasks() == []
        await runtime.stop()
    assert "messaging-retention" in names[7.0] and "messaging-retention" not in names[0.0]



async def test_a_pass_reads_what_it_deletes_not_the_whole_outbox(sqlite_db):
    """The outbox walk stops at the first page with nothing due: over a table of recent rows a
    pass reads one page, however long the table (it holds a week of events)."""
    from sqlalchemy import event

    await fill(sqlite_db, outbox=[(10, 9)] * 4 + [(1, 1)] * 40, inbox=[])
    pages: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith("SELECT") and "outbox" in statement:
            pages.append(statement)

    event.listen(sqlite_db.engine.sync_engine, "before_cursor_execute", seen)
    try:
        pruned = await prune(sqlite_db, outbox_days=7, inbox_days=0, now=NOW, batch=3)
        assert pruned.outbox == 4
        assert len(pages) == 3  # [old, old, old], [old, new, new], [new, new, new]: stop
        pages.clear()
        assert (await prune(sqlite_db, outbox_days=7, inbox_days=0, now=NOW, batch=3)).outbox == 0
        assert len(pages) == 1
    finally:
        event.remove(sqlite_db.engine.sync_engine, "before_cursor_execute", seen)
    assert len((await remaining(sqlite_db))[0]) == 40
