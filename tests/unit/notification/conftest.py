"""The notification service on embedded SQLite, as several test modules need it."""

from datetime import UTC, datetime

import httpx
import pytest_asyncio

from ccm_notification.bootstrap import SERVICE
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest_asyncio.fixture
async def acme(tmp_path):
    """The service's runtime on SQLite at ``NOW``: practice acme with provider doc-1."""
    rt = await embedded_runtime(tmp_path, SERVICE, clock=lambda: NOW)
    await create_practice(rt.db.engine, practice_id="acme", name="Acme Clinic",
                          timezone="America/New_York", pricing=Pricing())
    async with rt.db.unit_of_work() as uow:
        await edit_provider(uow, "acme", "doc-1", {"name": "Dr. One", "email": "one@acme.test"},
                            (), actor="test", now=NOW, if_match=None)
        await uow.commit()
    yield rt
    await rt.db.dispose()


@pytest_asyncio.fixture
async def api(acme):
    """(runtime, client, headers) for practice acme with provider doc-1."""
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=acme.app()), base_url="http://n")
    headers = {"Authorization": f"Bearer {await create_token(acme.db.engine, practice_id='acme')}"}
    yield acme, client, headers
    await client.aclose()
