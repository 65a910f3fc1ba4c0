"""Careplan's rules under concurrent writers on real PostgreSQL (read committed): If-Match lets
exactly one of them through, and revisions are never shared."""

import asyncio
import uuid

import httpx
import pytest
import pytest_asyncio

from ccm_careplan.bootstrap import SERVICE
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from ccm_shared.transport import InProcessTransport

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    """(client, rules URL, headers) for a fresh practice."""
    await upgrade_async(infra.database_url, SERVICE.schema, SERVICE.migrations_package)
    rt = ServiceRuntime.build(SERVICE, load_settings(database_url=infra.database_url),
                              transport=InProcessTransport())
    practice = f"rules-{uuid.uuid4().hex[:10]}"
    await create_practice(rt.db.engine, practice_id=practice, name="Rules Clinic",
                          timezone="America/New_York", pricing=Pricing())
    token = await create_token(rt.db.engine, practice_id=practice)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app()),
                                 base_url="http://c", timeout=60) as client:
        yield client, f"/v1/practices/{practice}/care-plan-rules", {
            "Authorization": f"Bearer {token}"}
    await rt.db.dispose()


async def test_concurrent_rules_writes_with_one_if_match_let_one_through(api):
    client, url, headers = api
    assert (await client.put(url, headers=headers, json={})).status_code == 200
    for _ in range(4):
        etag = (await client.get(url, headers=headers)).headers["etag"]
        answers = await asyncio.gather(*(client.put(
            url, headers={**headers, "If-Match": etag},
            json={"overdue_reminder_every_days": 3 + n}) for n in range(6)))
        assert sorted(r.status_code for r in answers) == [200] + [412] * 5, \
            [(r.status_code, r.text) for r in answers]


async def test_concurrent_rules_writes_without_if_match_each_get_a_revision(api):
    client, url, headers = api
    before = int((await client.get(url, headers=headers)).headers["etag"].strip('W/"'))
    answers = await asyncio.gather(*(client.put(
        url, headers=headers, json={"overdue_reminder_every_days": 3 + n}) for n in range(6)))
    assert [r.status_code for r in answers] == [200] * 6
    revisions = sorted(int(r.headers["etag"].strip('W/"')) for r in answers)
    assert revisions == list(range(before + 1, before + 7))
