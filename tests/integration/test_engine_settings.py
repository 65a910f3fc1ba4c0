"""Engine settings on real PostgreSQL: asyncpg keeps enough prepared statements for a consumer
batch's numbered savepoints, and a URL that sets the cache (e.g. 0 behind a transaction-mode
pooler) is obeyed."""

import inspect

import pytest

from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.db import PREPARED_STATEMENTS_PER_CONNECTION, create_engine_for
from ccm_shared.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def cache_capacity(url: str) -> int | None:
    engine = create_engine_for(url, schema=None, pool_size=1)
    try:
        async with engine.connect() as conn:
            cache = (await conn.get_raw_connection()).dbapi_connection._prepared_statement_cache
            return None if cache is None else cache.capacity
    finally:
        await engine.dispose()


async def test_prepared_statement_cache_holds_a_consumer_batch_and_the_url_wins(infra):
    largest = next(m.le for m in Settings.model_fields["consumer_batch_size"].metadata
                   if getattr(m, "le", None) is not None)
    assert inspect.signature(ConsumerRuntime).parameters["batch_size"].default <= largest
    # The largest batch's SAVEPOINT and RELEASE texts, and room for the service's own.
    assert PREPARED_STATEMENTS_PER_CONNECTION >= 2 * largest + 100
    assert await cache_capacity(infra.database_url) == PREPARED_STATEMENTS_PER_CONNECTION
    assert await cache_capacity(f"{infra.database_url}?prepared_statement_cache_size=0") is None
    assert await cache_capacity(f"{infra.database_url}?prepared_statement_cache_size=50") == 50
