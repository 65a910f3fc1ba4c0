import os

import pytest
import pytest_asyncio

from ccm_shared.audit import audit_metadata
from ccm_shared.db import Database
from tests.support.messaging import metadata


@pytest_asyncio.fixture
async def sqlite_db(tmp_path):
    """An embedded-mode database (SQLite files), the test tables in the 'ingest' schema."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/platform.db", schema="ingest")
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.run_sync(audit_metadata.create_all)
    yield db
    await db.dispose()


@pytest.fixture
def clean_ccm_env(monkeypatch):
    """Tests that describe the environment themselves: the caller's CCM_* must not leak in."""
    for name in list(os.environ):
        if name.startswith("CCM_"):
            monkeypatch.delenv(name)
