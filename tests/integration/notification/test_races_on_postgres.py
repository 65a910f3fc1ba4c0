"""Notification on real PostgreSQL: concurrent requests (read committed, row locks): the same
idempotency key sent at once is one message, and one call's slots confirmed at once confirm
one; and a value PostgreSQL cannot store is the request's (422), not a 500."""

import asyncio
import uuid

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import func, select

from ccm_notification.adapters.orm import messages
from ccm_notification.bootstrap import SERVICE
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from ccm_shared.transport import InProcessTransport
from tests.unit.notification.test_api_edges import CALL, GAP

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    """(runtime, client, practice path, headers) for a fresh practice with provider doc-1."""
    await upgrade_async(infra.database_url, SERVICE.schema, SERVICE.migrations_package)
    rt = ServiceRuntime.build(SERVICE, load_settings(database_url=infra.database_url),
                              transport=InProcessTransport())
    practice = f"races-{uuid.uuid4().hex[:10]}"
    await create_practice(rt.db.engine, practice_id=practice, name="Races Clinic",
                          timezone="America/New_York", pricing=Pricing())
    async with rt.db.unit_of_work() as uow:
        await edit_provider(uow, practice, "doc-1", {"name": "Dr. One",
                                                     "email": "one@races.test"},
                            (), actor="test", now=rt.clock(), if_match=None)
        await uow.commit()
    token = await create_token(rt.db.engine, practice_id=practice)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app()),
                                 base_url="http://n", timeout=60) as client:
        yield rt, client, f"/v1/practices/{practice}", {"Authorization": f"Bearer {token}"}
    await rt.db.dispose()


async def test_one_idempotency_key_sent_at_once_is_one_message(api):
    rt, client, path, headers = api
    key = f"key-{uuid.uuid4().hex[:8]}"
    answers = await asyncio.gather(*(client.post(f"{path}/notifications", headers=headers,
                                                 json=GAP | {"idempotency_key": key})
                                     for _ in range(8)))
    assert sorted(r.status_code for r in answers) == [200] * 7 + [201], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    async with rt.db.engine.connect() as conn:
        stored = (await conn.execute(select(func.count()).select_from(messages).where(
            messages.c.idempotency_key.endswith(f":api:{key}")))).scalar_one()
    assert stored == 1


async def test_one_calls_slots_confirmed_at_once_confirm_one(api):
    rt, client, path, headers = api
    slots = {**CALL, "slots": ["2027-01-05T15:00:00+00:00", "2027-01-06T15:00:00+00:00",
                               "2027-01-07T15:00:00+00:00"]}
    call = (await client.post(f"{path}/calls", headers=headers, json=slots)).json()
    answers = await asyncio.gather(*(client.post(f"{path}/calls/{call['id']}/confirm",
                                                 headers=headers, json={"slot": n % 3})
                                     for n in range(9)))
    assert all(r.status_code in (200, 409) for r in answers), [r.text for r in answers]
    won = {r.json()["chosen_slot"] for r in answers if r.status_code == 200}
    assert len(won) == 1
    stored = (await client.get(f"{path}/calls/{call['id']}", headers=headers)).json()
    assert stored["chosen_slot"] == won.pop()


async def test_a_text_postgresql_cannot_store_is_refused_not_500(api):
    """A notification's fields are free JSON: a lone surrogate (JSON may escape one) reaches the
    database, which refuses it; the answer is 422 without the value, and nothing is stored."""
    rt, client, path, headers = api
    key = f"key-{uuid.uuid4().hex[:8]}"
    r = await client.post(f"{path}/notifications",
                          headers={**headers, "Content-Type": "application/json"},
                          content=('{"kind": "care-gap-alert", "provider": "doc-1", '
                                   '"idempotency_key": "' + key + '", "fields": {"patient": '
                                   '"Patient/p-1", "gap": "Jane\\ud800Doe"}}'))
    assert r.status_code == 422 and "Jane" not in r.text, r.text
    async with rt.db.engine.connect() as conn:
        stored = (await conn.execute(select(func.count()).select_from(messages).where(
            messages.c.idempotency_key.endswith(f":api:{key}")))).scalar_one()
    assert stored == 0
