"""A transaction-mode pooler (PgBouncer) is declared by ``?prepared_statement_cache_size=0``:
both statement caches are off, prepared statements get names of their own, and the outbox
relay and the audit writer keep their statements in transactions (outside one, a prepare and
its execution may reach two server connections)."""

from ccm_shared.audit import AuditWriter
from ccm_shared.db import (
    PREPARED_STATEMENTS_PER_CONNECTION,
    Database,
    behind_transaction_pooler,
    connect_args_for,
)
from ccm_shared.outbox import OutboxRelay
from ccm_shared.transport import InProcessTransport

DIRECT = "postgresql+asyncpg://ccm:ccm@db:5432/ccm"
POOLED = DIRECT + "?prepared_statement_cache_size=0"


def test_a_direct_connection_keeps_many_prepared_statements():
    assert not behind_transaction_pooler(DIRECT)
    assert connect_args_for(DIRECT) == {
        "prepared_statement_cache_size": PREPARED_STATEMENTS_PER_CONNECTION}
    assert connect_args_for(DIRECT + "?prepared_statement_cache_size=50") == {}  # the URL's


def test_behind_a_pooler_no_statement_is_cached_and_each_has_its_own_name():
    assert behind_transaction_pooler(POOLED)
    args = connect_args_for(POOLED)
    assert args["statement_cache_size"] == 0
    names = {args["prepared_statement_name_func"]() for _ in range(3)}
    assert len(names) == 3


async def test_the_relay_uses_autocommit_only_on_a_direct_connection():
    direct, pooled = Database(DIRECT, schema="ingest"), Database(POOLED, schema="ingest")
    try:
        assert OutboxRelay(direct, InProcessTransport())._autocommit is not None
        assert OutboxRelay(pooled, InProcessTransport())._autocommit is None
    finally:
        await direct.dispose()
        await pooled.dispose()


async def test_the_audit_writer_uses_autocommit_only_on_a_direct_connection(tmp_path):
    direct, pooled = Database(DIRECT, schema="ingest"), Database(POOLED, schema="ingest")
    sqlite = Database(f"sqlite+aiosqlite:///{tmp_path}/platform.db", schema="ingest")
    try:
        assert AuditWriter(direct.engine)._autocommit is not None
        assert AuditWriter(pooled.engine)._autocommit is None
        assert AuditWriter(sqlite.engine)._autocommit is None
    finally:
        for db in (direct, pooled, sqlite):
            await db.dispose()
