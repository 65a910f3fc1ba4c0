"""Practice subscriptions without I/O: pure fan-out rules, numbering, signatures, and the
fan-out + webhook delivery on SQLite with the in-process bus (receiver: an httpx mock)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import outbox, subscriptions
from ccm_notification.bootstrap import SERVICE
from ccm_notification.domain.signing import webhook_signature
from ccm_notification.entrypoints.workers import deliverer_of, http_client_of
from ccm_notification.subscriptions.domain import (
    FeedEvent,
    Receiver,
    UnsafeTenant,
    feed_data,
    notification,
    subscription_secret,
    target_practice,
)
from ccm_shared.events import CloudEvent, practice_topic, to_message
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime
from tests.unit.notification.feed_events import at_risk, invoice_issued, payment_recorded

SECRET = "unit-secret-key-0123456789abcdef0123"


# -- pure rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["acme.other", "", "ACME", "acme/x", "-acme", "a" * 64])
def test_a_tenant_that_is_not_a_practice_id_is_never_fanned_out(tenant):
    with pytest.raises(UnsafeTenant):
        target_practice(tenant)


def test_the_target_practice_is_the_tenant():
    assert target_practice("maple-clinic-2") == "maple-clinic-2"


def test_feed_data_carries_the_feed_number_where_the_contract_has_one():
    issued = invoice_issued("acme")
    assert feed_data(issued.type, issued.data, 7)["practiceSequence"] == 7
    assert issued.data["practiceSequence"] == 1  # the input is not changed
    risk = at_risk("acme")
    assert "practiceSequence" not in feed_data(risk.type, risk.data, 7)


def _feed(data: dict) -> FeedEvent:
    return FeedEvent(id="e1", type="billing.invoice.issued.v1", time="2026-12-01T06:00:00+00:00",
                     subject="Invoice/i1", practice_sequence=3, data=data)


def test_id_only_notifications_carry_no_event_data():
    data = invoice_issued("acme").data
    lean = notification(subscription="s1", practice="acme", number=4, mode="id-only",
                        event=_feed(data))
    full = notification(subscription="s1", practice="acme", number=4, mode="full-resource",
                        event=_feed(data))
    assert "data" not in lean and lean["event"]["focus"] == "Invoice/i1"
    assert lean["eventNumber"] == 4 and lean["event"]["practiceSequence"] == 3
    assert full["data"]["invoice"]["resourceType"] == "Invoice"


def test_subscription_secrets_differ_per_subscription_and_salt():
    a = subscription_secret(SECRET, "s1", "salt")
    assert a.startswith("whsec_")
    assert a == subscription_secret(SECRET, "s1", "salt")
    assert len({a, subscription_secret(SECRET, "s2", "salt"),
                subscription_secret(SECRET, "s1", "other"),
                subscription_secret(SECRET + "x", "s1", "salt")}) == 4


def _signed(secret: str, number: int, t: int) -> tuple[str, bytes]:
    body = json.dumps({"eventNumber": number, "type": "event-notification"}).encode()
    return webhook_signature(secret, t, body), body


def test_the_documented_verification_accepts_a_genuine_delivery_once():
    receiver = Receiver("whsec_abc")
    signature, body = _signed("whsec_abc", 1, 1_000_000)
    assert receiver.accept(signature, body, now=1_000_010)
    assert not receiver.accept(signature, body, now=1_000_020)  # replayed within tolerance


def test_a_tampered_body_or_wrong_secret_is_rejected():
    receiver = Receiver("whsec_abc")
    signature, body = _signed("whsec_abc", 1, 1_000_000)
    assert not receiver.accept(signature, body.replace(b"1", b"2"), now=1_000_000)
    other, body = _signed("whsec_other", 1, 1_000_000)
    assert not receiver.accept(other, body, now=1_000_000)
    forged = signature.replace("t=1000000", "t=1000100")  # a fresher timestamp, old mac
    assert not receiver.accept(forged, body, now=1_000_100)


def test_an_old_delivery_replayed_later_is_rejected_by_its_timestamp():
    receiver = Receiver("whsec_abc", tolerance=300)
    signature, body = _signed("whsec_abc", 9, 1_000_000)
    assert not Receiver("whsec_abc").accept(signature, body, now=1_000_301)
    assert receiver.accept(signature, body, now=1_000_299)


# -- fan-out and delivery on SQLite -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class MockReceiver:
    """An httpx mock endpoint per practice: records bodies; ``down`` answers 503."""

    def __init__(self) -> None:
        self.down = False
        self.got: list[tuple[str, dict, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            return httpx.Response(503, text="maintenance")
        self.got.append((request.url.host, dict(request.headers), json.loads(request.content)))
        return httpx.Response(200, json={"ok": True})

    def bodies(self, host: str) -> list[dict]:
        return [b for h, _, b in self.got if h == host]


@pytest_asyncio.fixture
async def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CCM_NOTIFICATION_SUBSCRIPTION_PAUSE_AFTER_FAILURES", "3")
    monkeypatch.setenv("CCM_NOTIFICATION_RETRY_BACKOFF_SECONDS", "10")
    clock = Clock()
    rt = await embedded_runtime(tmp_path, SERVICE, clock=clock, secret_key=SECRET)
    receiver = MockReceiver()
    rt.state["http_client"] = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    tokens = {}
    for p in ("acme", "birch"):
        await create_practice(rt.db.engine, practice_id=p, name=p.title(),
                              timezone="America/New_York", pricing=Pricing())
        tokens[p] = {"Authorization": f"Bearer {await create_token(rt.db.engine, practice_id=p)}"}
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app()), base_url="http://n")
    yield rt, clock, receiver, api, tokens
    await api.aclose()
    await http_client_of(rt).aclose()
    await rt.db.dispose()


async def _subscribe(api, tokens, practice, **body) -> dict:  # noqa: ANN001, ANN003
    payload = {"events": ["billing.invoice.issued.v1", "billing.payment.recorded.v1",
                          "billing.threshold.at-risk.v1"],
               "endpoint": f"https://{practice}.example/hook", "payload": "full-resource"} | body
    r = await api.post(f"/v1/practices/{practice}/subscriptions", json=payload,
                       headers=tokens[practice])
    assert r.status_code == 201, r.text
    return r.json()


async def _feed_outbox(rt) -> list:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(
            select(outbox).where(outbox.c.topic.like("ccm.practice.%")).order_by(outbox.c.id)
        )).all()
    return [(r.topic, json.loads(r.payload)) for r in rows]


def _feed_consumer(rt):  # noqa: ANN001, ANN202
    return next(c for c in rt.consumers if c.name == "notification-practice-feed")


async def test_interleaved_events_of_two_practices_reach_only_their_own_feed_in_order(env):
    rt, clock, receiver, api, tokens = env
    subs = {p: await _subscribe(api, tokens, p) for p in ("acme", "birch")}
    feed = _feed_consumer(rt)
    sent = {"acme": [], "birch": []}
    for i in range(6):
        for p in (("acme", "birch") if i % 2 else ("birch", "acme")):
            event = (invoice_issued(p), at_risk(p, f"pt{i}"), payment_recorded(p, "inv"))[i % 3]
            sent[p].append(event.id)
            await feed.process(to_message(event.type, event))
            await feed.process(to_message(event.type, event))  # redelivered: no second copy
    rows = await _feed_outbox(rt)
    for p in ("acme", "birch"):
        mine = [e for t, e in rows if t.startswith(f"ccm.practice.{p}.")]
        assert [e["id"] for e in mine] == sent[p]
        assert [e["sequence"] for e in mine] == [1, 2, 3, 4, 5, 6]
        assert all(e["tenant"] == p for e in mine)
        assert all(t == practice_topic(p, e["type"]) for t, e in rows if e["tenant"] == p)
        assert [e["data"].get("practiceSequence") for e in mine] == [1, None, 3, 4, None, 6]
    assert await deliverer_of(rt).run_once() == 12  # deliveries tried, in one pass
    for p in ("acme", "birch"):
        got = receiver.bodies(f"{p}.example")
        assert [b["event"]["id"] for b in got] == sent[p]
        assert [b["eventNumber"] for b in got] == [1, 2, 3, 4, 5, 6]
        assert {b["practice"] for b in got} == {p} and {b["subscription"] for b in got} == {
            subs[p]["id"]}


async def test_deliveries_are_signed_with_the_secret_returned_once(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme", payload="id-only")
    listed = (await api.get("/v1/practices/acme/subscriptions", headers=tokens["acme"])).json()
    assert "secret" not in listed[0] and listed[0]["id"] == sub["id"]
    event = invoice_issued("acme")
    await _feed_consumer(rt).process(to_message(event.type, event))
    await deliverer_of(rt).run_once()
    [(_, headers, body)] = receiver.got
    raw = json.dumps(body, separators=(",", ":")).encode()
    verifier = Receiver(sub["secret"])
    assert verifier.accept(headers["x-ccm-signature"], raw, now=int(clock.now.timestamp()))
    assert "data" not in body and body["event"]["focus"] == event.subject
    assert headers["x-ccm-event-number"] == "1" and headers["x-ccm-subscription-id"] == sub["id"]


async def test_a_receiver_down_pauses_the_subscription_and_resume_delivers_everything(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    feed, deliverer = _feed_consumer(rt), deliverer_of(rt)
    receiver.down = True
    for _ in range(2):
        e = invoice_issued("acme")
        await feed.process(to_message(e.type, e))
    for _ in range(3):  # attempts 1..3 fail; the backoff holds the next try back
        assert await deliverer.run_once() == 1
        assert await deliverer.run_once() == 0
        clock.now += timedelta(hours=2)
    url = f"/v1/practices/acme/subscriptions/{sub['id']}"
    status = (await api.get(url + "/status", headers=tokens["acme"])).json()
    assert status["status"] == "paused" and status["consecutiveFailures"] == 3
    assert status["lagEvents"] == 2 and "503" in status["pausedReason"]
    async with rt.db.unit_of_work() as uow:
        paused = (await uow.session.execute(select(outbox).where(
            outbox.c.event_type == "notification.subscription.paused.v1"))).all()
    assert len(paused) == 1 and json.loads(paused[0].payload)["data"]["deliveredThrough"] == 0
    e = invoice_issued("acme")
    await feed.process(to_message(e.type, e))  # numbered while paused, not lost
    receiver.down = False
    assert await deliverer.run_once() == 0  # paused: nothing is tried
    r = await api.post(url + "/resume", headers=tokens["acme"])
    assert r.status_code == 200 and r.json()["status"] == "active"
    assert await deliverer.run_once() == 3
    assert [b["eventNumber"] for b in receiver.bodies("acme.example")] == [1, 2, 3]
    log = (await api.get(url + "/deliveries", headers=tokens["acme"])).json()
    assert [d["outcome"] for d in reversed(log)] == ["retry", "retry", "paused", "delivered",
                                                     "delivered", "delivered"]
    assert all(isinstance(d["latencyMs"], int) for d in log)
    status = (await api.get(url + "/status", headers=tokens["acme"])).json()
    assert status["lagEvents"] == 0 and status["deliveredThrough"] == 3
    replay = (await api.get(url + "/events?since=1", headers=tokens["acme"])).json()
    assert [b["eventNumber"] for b in replay["events"]] == [2, 3]
    assert replay["events"] == receiver.bodies("acme.example")[1:]


async def test_another_practices_subscription_is_not_found(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    for path in ("", "/status", "/events", "/deliveries"):
        r = await api.get(f"/v1/practices/acme/subscriptions/{sub['id']}{path}",
                          headers=tokens["birch"])
        assert r.status_code == 404, path
        r = await api.get(f"/v1/practices/birch/subscriptions/{sub['id']}{path}",
                          headers=tokens["birch"])
        assert r.status_code == 404, path
    r = await api.delete(f"/v1/practices/birch/subscriptions/{sub['id']}", headers=tokens["birch"])
    assert r.status_code == 404
    listed = await api.get("/v1/practices/birch/subscriptions", headers=tokens["birch"])
    assert listed.json() == []


@pytest.mark.parametrize("body, fragment", [
    ({"endpoint": "http://acme.example/hook"}, "https"),
    ({"endpoint": "https://user:pw@acme.example/hook"}, "credentials"),
    ({"endpoint": "ftp://acme.example"}, "https"),
    ({"endpoint": "https://[::1"}, "not a valid URL"),
    ({"endpoint": "https://acme.example:65536/hook"}, "not a valid URL"),
    ({"endpoint": "https://acme.example:-1/hook"}, "not a valid URL"),
    ({"endpoint": "https://acme.example:0/hook"}, "between 1 and 65535"),
    ({"endpoint": "https://acme\u0000.example/hook"}, "control characters"),
    ({"endpoint": "https://acme.exa\tmple/hook"}, "control characters"),
    ({"events": []}, "events"),
    ({"events": ["billing.invoice.issued.v1", "ingest.patient.upserted.v1"]}, "events"),
    ({"payload": "everything"}, "payload"),
    ({"secret": "mine"}, "secret"),
])
async def test_a_bad_subscription_is_a_clear_4xx_and_nothing_is_stored(env, body, fragment):
    rt, clock, receiver, api, tokens = env
    payload = {"events": ["billing.invoice.issued.v1"], "endpoint": "https://a.example/h"} | body
    r = await api.post("/v1/practices/acme/subscriptions", json=payload, headers=tokens["acme"])
    assert r.status_code in (400, 422) and fragment in r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    async with rt.db.unit_of_work() as uow:
        assert (await uow.session.execute(select(subscriptions))).all() == []


@pytest.mark.parametrize("since, status", [
    ("9223372036854775808", 422), (str(2**31), 422), ("-1", 422), (str(2**31 - 1), 200),
])
async def test_replay_since_is_bounded_by_the_event_number_range(env, since, status):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    r = await api.get(f"/v1/practices/acme/subscriptions/{sub['id']}/events",
                      params={"since": since}, headers=tokens["acme"])
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["events"] == [] and r.json()["next"] is None
    else:
        assert r.headers["content-type"].startswith("application/problem+json")


async def test_a_deleted_subscription_gets_nothing_more(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    url = f"/v1/practices/acme/subscriptions/{sub['id']}"
    assert (await api.delete(url, headers=tokens["acme"])).status_code == 204
    assert (await api.get(url, headers=tokens["acme"])).status_code == 404
    e = invoice_issued("acme")
    await _feed_consumer(rt).process(to_message(e.type, e))
    assert await deliverer_of(rt).run_once() == 0 and receiver.got == []
    assert len(await _feed_outbox(rt)) == 1  # the Kafka feed is independent of webhooks


async def test_a_malformed_tenant_is_dead_lettered_not_published(env):
    rt, *_ = env
    feed = _feed_consumer(rt)
    feed.max_retries = 0  # the retries themselves are the runtime's, tested there
    bad = invoice_issued("acme").model_dump() | {"tenant": "acme.evil"}
    await feed.process(to_message("billing.invoice.issued.v1", CloudEvent.model_construct(**bad)))
    assert await _feed_outbox(rt) == []
    assert feed.stats.dead_lettered == 1


@pytest.mark.parametrize("endpoint", ["https://127.0.0.1/hook", "https://localhost:8443/hook",
                                      "https://169.254.169.254/latest", "https://[::1]/hook",
                                      "https://10.0.0.5/hook"])
async def test_an_endpoint_deliveries_may_not_reach_is_refused_when_subscribing(env, endpoint):
    """Where outgoing requests may not reach the platform's own network (production's default):
    the practice is told when it subscribes, not by a subscription whose every delivery fails."""
    rt, clock, receiver, api, tokens = env
    rt.settings = rt.settings.model_copy(update={"outbound_allow_private": False})
    payload = {"events": ["billing.invoice.issued.v1"], "endpoint": endpoint}
    r = await api.post("/v1/practices/acme/subscriptions", json=payload, headers=tokens["acme"])
    assert r.status_code == 422 and "not a public internet address" in r.text, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    async with rt.db.unit_of_work() as uow:
        assert (await uow.session.execute(select(subscriptions))).all() == []
    rt.settings = rt.settings.model_copy(update={"outbound_allow_private": True})
    r = await api.post("/v1/practices/acme/subscriptions", json=payload, headers=tokens["acme"])
    assert r.status_code == 201, r.text
