"""Notification on real PostgreSQL: concurrent requests (read committed, row locks): the same
idempotency key sent at once is one message, and one call's slots confirmed at once confirm
one; a new provider PUT at once is created once, one of same-If-Match PUTs applies (the rest
412), one acknowledgement event per alert, the practice's subscription limit holds, a role's
email never overwrites the one a Practitioner event committed meanwhile; and a value
PostgreSQL cannot store (or a provider text with NUL) is the request's (422), not a 500."""

import asyncio
import uuid

import pytest
import pytest_asyncio
from sqlalchemy import func, select
from sqlalchemy import text as sql

from ccm_notification.adapters.orm import messages, outbox, subscriptions
from ccm_notification.bootstrap import SERVICE
from ccm_notification.service_layer.directory import (
    edit_provider,
    load_provider,
    practitioner_role_upserted,
    practitioner_upserted,
)
from ccm_shared.events import CloudEvent
from tests.support.infra import api_on_postgres
from tests.unit.notification.conftest import NOW
from tests.unit.notification.test_api_edges import CALL, GAP
from tests.unit.notification.test_exactly_once import role_event

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    """(runtime, client, practice path, headers) for a fresh practice with provider doc-1."""
    async with api_on_postgres(infra.database_url, SERVICE, "races") as (rt, client, practice,
                                                                        headers):
        async with rt.db.unit_of_work() as uow:
            await edit_provider(uow, practice, "doc-1", {"name": "Dr. One",
                                                         "email": "one@races.test"},
                                (), actor="test", now=rt.clock(), if_match=None)
            await uow.commit()
        yield rt, client, f"/v1/practices/{practice}", headers


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


async def test_one_new_provider_put_at_once_is_created_once(api):
    """Concurrent PUTs creating the same provider: one creates it (201), the others update the
    row now there (200): none fails on the primary key."""
    rt, client, path, headers = api
    for _ in range(3):
        pid = f"new-{uuid.uuid4().hex[:8]}"
        answers = await asyncio.gather(*(client.put(f"{path}/providers/{pid}", headers=headers,
                                                    json={"name": f"Dr. N{n}"})
                                         for n in range(6)))
        assert sorted(r.status_code for r in answers) == [200] * 5 + [201], \
            [r.text for r in answers]
        history = (await client.get(f"{path}/providers/{pid}/history", headers=headers)).json()
        versions = [h["version"] for h in history]
        assert versions == list(range(1, len(versions) + 1)), versions


async def test_if_match_lets_one_of_concurrent_provider_puts_through(api):
    """Six PUTs with the same If-Match at once: one is applied (200, version 2), the others
    answer 412; the provider is at version 2."""
    rt, client, path, headers = api
    for _ in range(5):
        pid = f"im-{uuid.uuid4().hex[:8]}"
        r = await client.put(f"{path}/providers/{pid}", headers=headers,
                             json={"name": "Dr. Start"})
        assert r.status_code == 201 and r.headers["ETag"] == '"1"'
        answers = await asyncio.gather(*(client.put(f"{path}/providers/{pid}",
                                                    headers={**headers, "If-Match": '"1"'},
                                                    json={"name": f"Dr. Edit {n}"})
                                         for n in range(6)))
        assert sorted(r.status_code for r in answers) == [200] + [412] * 5, \
            [r.text for r in answers]
        [won] = [r for r in answers if r.status_code == 200]
        stored = (await client.get(f"{path}/providers/{pid}", headers=headers)).json()
        assert stored["version"] == 2 and stored["name"] == won.json()["name"], stored


async def test_concurrent_acks_record_one_acknowledgement(api):
    """Eight acks of one pending alert at once: all 200 with the same acknowledgement, and one
    notification.message.acknowledged.v1 event."""
    rt, client, path, headers = api
    for _ in range(3):
        r = await client.post(f"{path}/notifications", headers=headers, json=GAP)
        assert r.status_code == 201, r.text
        mid = r.json()["id"]
        answers = await asyncio.gather(*(client.post(f"/v1/notifications/{mid}/ack",
                                                     headers=headers) for _ in range(8)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert {a.json()["ack_state"] for a in answers} == {"acknowledged"}
        assert len({a.json()["acked_at"] for a in answers}) == 1, [a.json() for a in answers]
        async with rt.db.engine.connect() as conn:
            events = (await conn.execute(select(func.count()).select_from(outbox).where(
                outbox.c.event_type == "notification.message.acknowledged.v1",
                outbox.c.payload.contains(mid)))).scalar_one()
        assert events == 1


async def test_concurrent_subscription_creates_keep_the_practice_limit(api):
    """30 creates at once against a limit of 20: 20 are stored (201), the rest 409."""
    rt, client, path, headers = api
    body = {"events": ["billing.invoice.issued.v1"], "endpoint": "https://example.org/hook"}
    answers = await asyncio.gather(*(client.post(f"{path}/subscriptions", headers=headers,
                                                 json=body) for _ in range(30)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 20 + [409] * 10, [r.text for r in answers if r.status_code != 201]
    async with rt.db.engine.connect() as conn:
        stored = (await conn.execute(select(func.count()).select_from(subscriptions).where(
            subscriptions.c.practice == path.rsplit("/", 1)[1]))).scalar_one()
    assert stored == 20


async def test_a_provider_text_with_nul_is_refused_and_not_stored(api):
    """PostgreSQL's JSON column takes an escaped NUL, which then breaks every message to the
    provider: the PUT refuses it (422, without the value) and stores nothing."""
    rt, client, path, headers = api
    for field in ("name", "phone"):
        for text in ("Dr \\u0000 Nul", "Dr \\ud800 Nul"):
            r = await client.put(f"{path}/providers/doc-1",
                                 headers={**headers, "Content-Type": "application/json"},
                                 content='{"' + field + '": "' + text + '"}')
            assert r.status_code == 422 and "Nul" not in r.text, r.text
    r = await client.put(f"{path}/providers/nul-new",
                         headers={**headers, "Content-Type": "application/json"},
                         content='{"name": "Dr \\u0000 Nul"}')
    assert r.status_code == 422, r.text
    assert (await client.get(f"{path}/providers/nul-new", headers=headers)).status_code == 404
    stored = (await client.get(f"{path}/providers/doc-1", headers=headers)).json()
    assert stored["name"] == "Dr. One" and stored["version"] == 1, stored
    r = await client.post(f"{path}/notifications", headers=headers, json=GAP)
    assert r.status_code == 201, r.text


def practitioner_event(practice: str, pid: str, email: str | None, at: str) -> CloudEvent:
    return CloudEvent(
        source="/ccm/ingest", type="ingest.practitioner.upserted.v1", tenant=practice,
        subject=f"Practitioner/{pid}",
        data={"source": {"resourceType": "Practitioner", "id": pid, "versionId": "1",
                         "lastUpdated": at, "sha256": "0" * 64, "receivedAt": at},
              "practitioner": f"Practitioner/{pid}", "name": {"family": "Own"}, "npi": None,
              "telecom": [{"system": "email", "value": email}] if email else [],
              "active": True, "deleted": False})


async def test_a_role_email_never_overwrites_the_practitioners_own_given_meanwhile(api):
    """A PractitionerRole event supplies its email only to a provider the EHR gave none. Its
    handler decided that from a read without the row's lock: a Practitioner event with an email
    of its own, committing while the role's handler waited for the row, was overwritten by the
    role's email."""
    rt, *_ = api
    practice = api[2].rsplit("/", 1)[-1]
    pid = f"doc-{uuid.uuid4().hex[:8]}"
    role = role_event(f"role-{pid}", pid, "role@races.test").model_copy(
        update={"tenant": practice})
    async with rt.db.unit_of_work() as uow:  # known to the directory, without an email
        await practitioner_upserted(practitioner_event(practice, pid, None,
                                                       "2026-11-01T00:00:00+00:00"), uow, NOW)
        await uow.commit()
    async with rt.db.unit_of_work() as first:  # its own email arrives and holds the row
        await practitioner_upserted(practitioner_event(practice, pid, "own@races.test",
                                                       "2026-11-02T00:00:00+00:00"), first, NOW)

        async def the_role() -> None:
            async with rt.db.unit_of_work() as uow:
                await practitioner_role_upserted(role, uow, NOW)
                await uow.commit()

        holder = (await first.session.execute(sql("SELECT pg_backend_pid()"))).scalar_one()
        second = asyncio.create_task(the_role())
        async with rt.db.engine.connect() as conn:  # the role's handler waits for the row
            for _ in range(1000):
                waiting = (await conn.execute(sql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE :holder = ANY(pg_blocking_pids(pid))"), {"holder": holder})).scalar_one()
                if waiting or second.done():
                    break
                # pg_stat_activity is read once per transaction: each poll reads it anew
                await conn.rollback()
                await asyncio.sleep(0.02)
        assert not second.done(), second.exception()  # it went on while the row was held
        assert waiting, "the role's handler never waited for the provider's row"
        await first.commit()
    await second
    async with rt.db.unit_of_work() as uow:
        row = await load_provider(uow, practice, pid)
    assert row.current["email"] == "own@races.test"
