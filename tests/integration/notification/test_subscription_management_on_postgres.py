"""Managing a practice subscription on real PostgreSQL with real HTTP receivers: a rotated secret
stored and signing beside the old one (concurrent rotations one after the other), a PATCHed
endpoint receiving what waits (audited), and a ping that numbers and records nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import pytest_asyncio
from sqlalchemy import and_, select, text

from ccm_notification.adapters.orm import event_sequences, subscription_deliveries, subscriptions
from ccm_notification.bootstrap import SERVICE
from ccm_notification.entrypoints.workers import deliverer_of, http_client_of
from ccm_notification.subscriptions import service
from ccm_notification.subscriptions.domain import Receiver, Verdict, verify_signature
from ccm_notification.subscriptions.service import subscription_secrets
from ccm_shared.audit import audit_log
from ccm_shared.events import to_message
from tests.integration.conftest import eventually
from tests.integration.notification.servers import start_http
from tests.support.infra import api_on_postgres
from tests.unit.notification.feed_events import invoice_issued

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra, monkeypatch):
    monkeypatch.setenv("CCM_NOTIFICATION_SUBSCRIPTION_REQUIRE_HTTPS", "false")  # local receivers
    async with api_on_postgres(infra.database_url, SERVICE, "subm") as (
            rt, client, practice, headers):
        receivers = [start_http(), start_http()]
        yield rt, client, practice, headers, receivers
        for r in receivers:
            r.close()
        await http_client_of(rt).aclose()


async def _subscribe(client, practice, headers, endpoint) -> dict:  # noqa: ANN001
    r = await client.post(f"/v1/practices/{practice}/subscriptions", headers=headers, json={
        "events": ["billing.invoice.issued.v1"], "endpoint": endpoint, "payload": "id-only"})
    assert r.status_code == 201, r.text
    return r.json()


async def _fan_out(rt, practice) -> None:  # noqa: ANN001
    feed = next(c for c in rt.consumers if c.name == "notification-practice-feed")
    e = invoice_issued(practice)
    await feed.process(to_message(e.type, e))


async def _rotate(rt, practice: str, sub_id: str) -> str:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        _, secret = await service.rotate_secret(
            uow, practice, sub_id, secret_key=rt.settings.secret_key, overlap=timedelta(hours=24),
            now=rt.clock())
        await uow.commit()
    return secret


async def test_rotations_at_once_are_stored_one_after_the_other_and_all_sign(api):
    """A rotation waits for one under way (the subscription's row lock) and then keeps what it
    stored: both read the secrets before either committed, they made the same generations."""
    rt, client, practice, headers, (receiver, _) = api
    sub = await _subscribe(client, practice, headers, receiver.url + "/hook")
    async with rt.db.unit_of_work() as uow:
        _, first = await service.rotate_secret(
            uow, practice, sub["id"], secret_key=rt.settings.secret_key,
            overlap=timedelta(hours=24), now=rt.clock())
        second = asyncio.create_task(_rotate(rt, practice, sub["id"]))

        async def waiting() -> bool:  # the second one is blocked by the first's transaction
            async with rt.db.engine.connect() as conn:
                return bool((await conn.execute(text(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"))).scalar())

        await eventually(waiting, timeout=10, what="the second rotation waiting")
        await uow.commit()
    secrets = [sub["secret"], first, await second]
    assert len(set(secrets)) == 3
    async with rt.db.unit_of_work() as uow:
        stored = (await uow.session.execute(
            select(subscription_secrets).where(subscription_secrets.c.subscription_id == sub[
                "id"]).order_by(subscription_secrets.c.generation))).all()
    assert [(s.generation, s.valid_until is None, s.practice) for s in stored] == [
        (0, False, practice), (1, False, practice), (2, True, practice)]
    assert stored[0].secret == sub["secret"] and {s.secret for s in stored} == set(secrets)

    await _fan_out(rt, practice)
    assert await deliverer_of(rt).run_once() == 1
    [got] = receiver.accepted()
    now = int(rt.clock().timestamp())
    header = got.headers["X-CCM-Signature"]
    assert header.count("v1=") == 3
    for secret in secrets:  # the raw bytes received, as a receiver verifies them
        assert verify_signature(secret, header, got.body, now)
        assert Receiver(secret).check(header, got.body, now) is Verdict.NEW


async def test_a_patched_endpoint_gets_what_waits_and_the_change_is_audited(api):
    rt, client, practice, headers, (first, second) = api
    sub = await _subscribe(client, practice, headers, first.url + "/hook")
    url = f"/v1/practices/{practice}/subscriptions/{sub['id']}"
    first.fail_with = [503]
    await _fan_out(rt, practice)
    assert await deliverer_of(rt).run_once() == 1  # refused: waits for the backoff
    r = await client.patch(url, headers=headers, json={"endpoint": second.url + "/new",
                                                       "description": "moved"})
    assert r.status_code == 200, r.text
    assert (r.json()["endpoint"], r.json()["description"]) == (second.url + "/new", "moved")
    assert await deliverer_of(rt).run_once() == 1  # at once, at the new endpoint
    [got] = second.accepted()
    assert got.path == "/new" and got.json()["eventNumber"] == 1
    assert verify_signature(sub["secret"], got.headers["X-CCM-Signature"], got.body,
                            int(rt.clock().timestamp()))

    async def audited() -> bool:
        async with rt.db.engine.connect() as conn:
            return (await conn.execute(select(audit_log.c.action, audit_log.c.outcome).where(
                and_(audit_log.c.practice == practice, audit_log.c.service == "notification",
                     audit_log.c.what == "PATCH /v1/practices/{practice}/subscriptions/{sub_id}"))
            )).all() == [("U", 0)]

    await eventually(audited, timeout=10, what="the PATCH's audit entry")

    bad = await client.patch(url, headers=headers, json={"description": "a\u0000b"})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    shown = (await client.get(url, headers=headers)).json()
    assert shown["description"] == "moved"


async def test_a_ping_reaches_the_receiver_signed_and_numbers_nothing(api):
    rt, client, practice, headers, (receiver, _) = api
    sub = await _subscribe(client, practice, headers, receiver.url + "/hook")
    url = f"/v1/practices/{practice}/subscriptions/{sub['id']}"

    async def numbers() -> tuple:
        async with rt.db.unit_of_work() as uow:
            row = (await uow.session.execute(
                select(subscriptions).where(subscriptions.c.id == sub["id"]))).one()
            counters = (await uow.session.execute(select(event_sequences).where(
                event_sequences.c.tenant == practice))).all()
            log = (await uow.session.execute(select(subscription_deliveries).where(
                subscription_deliveries.c.subscription_id == sub["id"]))).all()
        return row.last_event_number, row.delivered_through, row.next_attempt_at, counters, log

    before = await numbers()
    r = await client.post(url + "/test", headers=headers)
    assert r.status_code == 200, r.text
    assert (r.json()["delivered"], r.json()["status"]) == (True, 200)
    [got] = receiver.accepted()
    assert got.json()["type"] == "ping" and got.json()["id"] == r.json()["ping"]
    assert Receiver(sub["secret"]).check(got.headers["X-CCM-Signature"], got.body,
                                         int(rt.clock().timestamp())) is Verdict.PING
    assert await numbers() == before

    receiver.fail_with = [500]
    r = await client.post(url + "/test", headers=headers)
    assert (r.json()["delivered"], r.json()["status"]) == (False, 500)
    assert await numbers() == before
