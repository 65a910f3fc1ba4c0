import asyncio
import uuid

import pytest
import pytest_asyncio
from sqlalchemy import text

from ccm_shared.db import Database
from ccm_shared.migrate import upgrade_platform
from ccm_shared.transport import KafkaTransport
from tests.support.infra import Infra, start_infra
from tests.support.messaging import metadata


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def infra():
    infra: Infra = start_infra()
    upgrade_platform(infra.database_url)
    yield infra
    infra.close()


@pytest_asyncio.fixture(loop_scope="session")
async def pg_db(infra):
    """A fresh schema with the test tables (outbox, inbox, effects), dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:10]}"
    db = Database(infra.database_url, schema=schema, pool_size=5)
    async with db.engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        await conn.run_sync(metadata.create_all)
    yield db
    async with db.engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    await db.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def kafka(infra):
    transport = KafkaTransport(infra.kafka_bootstrap_servers, client_id="ccm-tests")
    await transport.start()
    yield transport
    await transport.stop()


@pytest.fixture
def topic():
    return f"tests.thing.{uuid.uuid4().hex[:8]}.v1"


async def eventually(predicate, *, timeout: float = 60, interval: float = 0.2, what: str = ""):
    """Wait until an async predicate is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await predicate():
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate.__name__}")
        await asyncio.sleep(interval)
