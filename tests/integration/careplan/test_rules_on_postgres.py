"""Careplan's rules under concurrent writers on real PostgreSQL (read committed): If-Match lets
exactly one of them through, and revisions are never shared."""

import asyncio

import pytest
import pytest_asyncio

from ccm_careplan.bootstrap import SERVICE
from tests.support.infra import api_on_postgres

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    """(client, rules URL, headers) for a fresh practice."""
    async with api_on_postgres(infra.database_url, SERVICE, "rules") as (_, client, practice,
                                                                        headers):
        yield client, f"/v1/practices/{practice}/care-plan-rules", headers


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
