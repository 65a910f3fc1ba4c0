"""Practice subscriptions without I/O: pure fan-out rules, numbering, signatures, and the
fan-out + webhook delivery on SQLite with the in-process bus (receiver: an httpx mock)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import (
    event_sequences,
    feed_held,
    messages,
    outbox,
    subscriptions,
)
from ccm_notification.bootstrap import SERVICE
from ccm_notification.domain.signing import webhook_signature
from ccm_notification.entrypoints.workers import deliverer_of, http_client_of
from ccm_notification.service_layer.directory import edit_provider
from ccm_notification.subscriptions.domain import (
    FeedEvent,
    Receiver,
    UnsafeTenant,
    Verdict,
    delivery_outcome,
    feed_data,
    notification,
    subscription_secret,
    target_practice,
)
from ccm_notification.subscriptions.service import feed_handler
from ccm_shared.consumer import PoisonMessage
from ccm_shared.events import CloudEvent, practice_topic, to_message
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime
from tests.unit.notification.feed_events import (
    at_risk,
    invoice_issued,
    payment_recorded,
    period_closed,
)

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


def test_the_documented_verification_does_the_work_once_and_acknowledges_a_redelivery():
    """A receiver whose answer to #1 was lost (it came after the timeout) gets #1 again: it
    answers 2xx without doing the work again. Refusing it paused its own subscription."""
    receiver, done = Receiver("whsec_abc"), []
    signature, body = _signed("whsec_abc", 1, 1_000_000)
    assert receiver.check(signature, body, now=1_000_010) is Verdict.NEW
    assert receiver.receive(signature, body, 1_000_010, done.append) == 200
    assert receiver.check(signature, body, now=1_000_020) is Verdict.DUPLICATE
    assert receiver.receive(signature, body, 1_000_020, done.append) == 200  # redelivered
    assert [n["eventNumber"] for n in done] == [1]  # the work was done once


def test_work_that_fails_leaves_the_event_new_for_the_retry():
    receiver, done = Receiver("whsec_abc"), []
    signature, body = _signed("whsec_abc", 1, 1_000_000)

    def broken(notification: dict) -> None:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError):
        receiver.receive(signature, body, 1_000_000, broken)
    assert receiver.receive(signature, body, 1_000_001, done.append) == 200 and len(done) == 1


def test_a_tampered_body_or_wrong_secret_is_rejected():
    receiver = Receiver("whsec_abc")
    signature, body = _signed("whsec_abc", 1, 1_000_000)
    assert receiver.check(signature, body.replace(b"1", b"2"), now=1_000_000) is Verdict.REFUSED
    other, body = _signed("whsec_other", 1, 1_000_000)
    assert receiver.check(other, body, now=1_000_000) is Verdict.REFUSED
    assert receiver.receive(other, body, 1_000_000, lambda n: None) == 401
    forged = signature.replace("t=1000000", "t=1000100")  # a fresher timestamp, old mac
    assert receiver.check(forged, body, now=1_000_100) is Verdict.REFUSED


def test_an_old_delivery_replayed_later_is_rejected_by_its_timestamp():
    receiver = Receiver("whsec_abc", tolerance=300)
    signature, body = _signed("whsec_abc", 9, 1_000_000)
    assert Receiver("whsec_abc").check(signature, body, now=1_000_301) is Verdict.REFUSED
    assert Receiver("whsec_abc").receive(signature, body, 1_000_301, lambda n: None) == 401
    assert receiver.check(signature, body, now=1_000_299) is Verdict.NEW


@pytest.mark.parametrize("ok, status, attempt, outcome", [
    (True, 200, 1, "delivered"), (True, 204, 2, "delivered"),
    (False, 409, 2, "duplicate"),  # a redelivery refused as had: its acknowledgement was lost
    (False, 409, 1, None),  # a first delivery it cannot have had: no acknowledgement, retried
    (False, 400, 2, None), (False, 401, 2, None), (False, 410, 1, None), (False, 503, 3, None),
    (False, None, 2, None),
])
def test_how_a_delivery_attempt_counts(ok, status, attempt, outcome):
    assert delivery_outcome(ok, status, attempt) == outcome


def test_the_hmac_key_is_the_whole_whsec_string_as_utf8():
    """What the README's verification snippet does, checked against the service's signer."""
    import hashlib
    import hmac

    secret, t, body = "whsec_" + "ab" * 32, 1_700_000_000, b'{"eventNumber":1}'
    header = webhook_signature(secret, t, body)
    mac = hmac.new(secret.encode("utf-8"), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert header == f"t={t},v1={mac}"


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
    assert verifier.check(headers["x-ccm-signature"], raw, int(clock.now.timestamp())) is \
        Verdict.NEW
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


# -- a redelivery the receiver already has (409) ------------------------------------------------


class LateReceiver:
    """Processes every event once; its answer to the first delivery of #1 comes after the
    timeout (the platform sees ReadTimeout), and it answers 409 to an event it already has,
    as the earlier README told it to."""

    def __init__(self) -> None:
        self.processed: list[int] = []
        self.timed_out = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        number = json.loads(request.content)["eventNumber"]
        if number in self.processed:
            return httpx.Response(409, text="already processed")
        self.processed.append(number)
        if not self.timed_out:
            self.timed_out = True
            raise httpx.ReadTimeout("answered after the timeout", request=request)
        return httpx.Response(200)


async def test_a_409_to_a_redelivery_acknowledges_it_and_the_subscription_goes_on(env):
    """The walkthrough: ReadTimeout, 409, 409 … paused for good. A 409 now means "I have it"."""
    rt, clock, receiver, api, tokens = env
    late = LateReceiver()
    rt.state["http_client"] = httpx.AsyncClient(transport=httpx.MockTransport(late))
    rt.state.pop("subscription_deliverer", None)
    sub = await _subscribe(api, tokens, "acme")
    feed, deliverer = _feed_consumer(rt), deliverer_of(rt)
    first = invoice_issued("acme")
    await feed.process(to_message(first.type, first))
    for _ in range(3):  # PAUSE_AFTER_FAILURES is 3 here
        await deliverer.run_once()
        clock.now += timedelta(hours=2)
    second = invoice_issued("acme")
    await feed.process(to_message(second.type, second))
    await deliverer.run_once()
    url = f"/v1/practices/acme/subscriptions/{sub['id']}"
    status = (await api.get(url + "/status", headers=tokens["acme"])).json()
    assert status["status"] == "active" and status["deliveredThrough"] == 2
    assert status["consecutiveFailures"] == 0 and status["lagEvents"] == 0
    assert late.processed == [1, 2]  # each once
    log = (await api.get(url + "/deliveries", headers=tokens["acme"])).json()
    assert [(d["eventNumber"], d["outcome"]) for d in reversed(log)] == [
        (1, "retry"), (1, "duplicate"), (2, "delivered")]
    assert "409" in log[1]["response"]


# -- a paused subscription: its status, and the practice is told ---------------------------------


async def _pause(rt, clock, receiver, api, tokens) -> dict:  # noqa: ANN001
    sub = await _subscribe(api, tokens, "acme", description="ERP")
    feed, deliverer = _feed_consumer(rt), deliverer_of(rt)
    receiver.down = True
    e = invoice_issued("acme")
    await feed.process(to_message(e.type, e))
    for _ in range(3):
        await deliverer.run_once()
        clock.now += timedelta(hours=2)
    return sub


async def test_a_paused_subscription_shows_no_next_attempt_while_events_keep_coming(env):
    rt, clock, receiver, api, tokens = env
    sub = await _pause(rt, clock, receiver, api, tokens)
    e = invoice_issued("acme")
    await _feed_consumer(rt).process(to_message(e.type, e))  # numbered while paused
    clock.now += timedelta(hours=5)
    url = f"/v1/practices/acme/subscriptions/{sub['id']}"
    status = (await api.get(url + "/status", headers=tokens["acme"])).json()
    assert status["status"] == "paused" and status["lagEvents"] == 2
    assert status["nextAttemptAt"] is None
    async with rt.db.unit_of_work() as uow:
        row = (await uow.session.execute(
            select(subscriptions).where(subscriptions.c.id == sub["id"]))).one()
    assert row.next_attempt_at is None  # a resume schedules it, nothing else
    receiver.down = False
    assert (await api.post(url + "/resume", headers=tokens["acme"])).status_code == 200
    status = (await api.get(url + "/status", headers=tokens["acme"])).json()
    assert status["nextAttemptAt"] == clock.now.isoformat()
    assert await deliverer_of(rt).run_once() == 2


async def _contacts(rt, api, tokens) -> None:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        await edit_provider(uow, "acme", "doc-1", {"name": "Dr. One", "email": "one@acme.test"},
                            (), actor="test", now=clock_now(), if_match=None)
        await uow.commit()
    r = await api.put("/v1/practices/acme/contacts", json={"summary_recipients": ["doc-1"]},
                      headers=tokens["acme"])
    assert r.status_code == 200, r.text


def clock_now() -> datetime:
    return datetime(2026, 12, 1, 7, 0, tzinfo=UTC)


async def _pause_messages(rt) -> list:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        return (await uow.session.execute(select(messages).where(
            messages.c.kind == "subscription-paused").order_by(messages.c.created_at))).all()


async def test_the_practices_contacts_are_told_when_its_subscription_pauses(env):
    rt, clock, receiver, api, tokens = env
    await _contacts(rt, api, tokens)
    sub = await _pause(rt, clock, receiver, api, tokens)
    [message] = await _pause_messages(rt)
    assert message.practice == "acme" and message.provider_id == "doc-1"
    assert message.status == "pending" and message.channel == "email"
    assert message.subject == "[Action needed] Webhook subscription ERP paused"
    assert f"/v1/practices/acme/subscriptions/{sub['id']}/resume" in message.text_body
    assert "3 deliveries in a row to https://acme.example/hook failed" in message.text_body
    assert "http 503: maintenance" in message.text_body


async def test_a_pause_notice_is_held_without_contacts_and_sent_when_one_is_saved(env):
    rt, clock, receiver, api, tokens = env
    await _pause(rt, clock, receiver, api, tokens)
    [held] = await _pause_messages(rt)
    assert held.status == "pending" and held.next_attempt_at is None
    assert held.last_error.startswith("no recipient yet")
    await _contacts(rt, api, tokens)
    [sent] = await _pause_messages(rt)
    assert sent.id == held.id and sent.provider_id == "doc-1" and sent.next_attempt_at is not None


@pytest.mark.parametrize("then", ["resume", "delete"])
async def test_a_held_pause_notice_is_withdrawn_when_the_pause_is_over(env, then):
    rt, clock, receiver, api, tokens = env
    sub = await _pause(rt, clock, receiver, api, tokens)
    url = f"/v1/practices/acme/subscriptions/{sub['id']}"
    r = await (api.post(url + "/resume", headers=tokens["acme"]) if then == "resume"
               else api.delete(url, headers=tokens["acme"]))
    assert r.status_code in (200, 204)
    [withdrawn] = await _pause_messages(rt)
    assert withdrawn.status == "failed"
    assert withdrawn.last_error.startswith(
        f"not sent: the subscription was {'resumed' if then == 'resume' else 'deleted'}")
    await _contacts(rt, api, tokens)
    assert [m.status for m in await _pause_messages(rt)] == ["failed"]  # not sent late


# -- tenants that are not this deployment's practices -------------------------------------------


async def test_an_event_of_a_tenant_that_is_no_registered_practice_is_dead_lettered(env):
    """Another deployment's billing on the same Kafka: its events create no topics, counters or
    held rows here; they are dead-lettered at once, the reason naming no data."""
    rt, *_ = env
    feed = _feed_consumer(rt)
    ensured: list = []
    real_ensure = rt.transport.ensure_topics

    async def ensure_topics(topics, **kw):  # noqa: ANN001, ANN003, ANN202
        ensured.extend(topics)
        return await real_ensure(topics, **kw)

    rt.transport.ensure_topics = ensure_topics
    ghost = invoice_issued("ghost-clinic")
    await feed.process(to_message(ghost.type, ghost))
    assert feed.stats.dead_lettered == 1 and feed.stats.retries == 0
    assert ensured == [] and await _feed_outbox(rt) == []
    async with rt.db.unit_of_work() as uow:
        assert (await uow.session.execute(select(event_sequences).where(
            event_sequences.c.tenant == "ghost-clinic"))).all() == []
        assert (await uow.session.execute(select(feed_held))).all() == []
    dead = rt.transport.messages("billing.invoice.issued.v1.dlq")
    assert [m.header("dlq-reason") for m in dead] == [
        b"the event's tenant is not a registered practice (platform.practices)"]
    ok = invoice_issued("acme")
    await feed.process(to_message(ok.type, ok))
    assert len(await _feed_outbox(rt)) == 1 and any("ccm.practice.acme." in t for t in ensured)


async def test_the_feed_handler_itself_refuses_an_unregistered_tenant(env):
    """Without the consumer's ``prepare`` (the check is in the event's transaction too)."""
    rt, *_ = env
    handler = feed_handler(lambda: clock_now(), 0)
    async with rt.db.unit_of_work() as uow:
        with pytest.raises(PoisonMessage, match="not a registered practice"):
            await handler(invoice_issued("ghost-clinic"), uow)


# -- what an id-only notification names -----------------------------------------------------------


def test_id_only_notifications_name_the_month_payment_and_refund():
    closed = period_closed("acme", "inv-1")
    paid = payment_recorded("acme", "inv-1")
    refund = {"invoiceId": "inv-1", "refundId": "rf-1", "amount": "5.00"}

    def body(event_type: str, subject: str, data: dict) -> dict:
        return notification(subscription="s1", practice="acme", number=1, mode="id-only",
                            event=FeedEvent(id="e", type=event_type, time="t", subject=subject,
                                            practice_sequence=1, data=data,
                                            billing_sequence=7))["event"]

    month = body(closed.type, closed.subject, closed.data)
    assert month["focus"] == "Organization/acme"  # as it was: webhook bodies change additively
    assert (month["month"], month["invoiceId"], month["billingSequence"]) == ("2026-11", "inv-1", 7)
    payment = body(paid.type, paid.subject, paid.data)
    assert payment["focus"] == "Invoice/inv-1" and payment["invoiceId"] == "inv-1"
    assert payment["paymentId"] == paid.data["paymentId"]
    assert body("billing.payment.voided.v1", "Invoice/inv-1", paid.data)["paymentId"] == \
        paid.data["paymentId"]
    refunded = body("billing.payment.refunded.v1", "Invoice/inv-1", refund)
    assert (refunded["refundId"], refunded["invoiceId"]) == ("rf-1", "inv-1")
    issued = body("billing.invoice.issued.v1", "Invoice/inv-1", {"invoiceId": "inv-1"})
    assert issued["focus"] == "Invoice/inv-1" and "paymentId" not in issued


def _readme_verify():  # noqa: ANN202
    """The verification snippet of the README's "Webhook signatures", as a function."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "services" / "notification" /
              "README.md").read_text()
    section = readme.split("## Webhook signatures", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["verify"]


async def test_the_readmes_snippet_verifies_a_subscription_delivery_with_its_secret(env):
    """The key is the whole whsec_ string as UTF-8; the practice's webhook secret (the one for
    message webhooks) does not verify a subscription's deliveries."""
    rt, clock, receiver, api, tokens = env
    verify = _readme_verify()
    sub = await _subscribe(api, tokens, "acme", payload="id-only")
    e = invoice_issued("acme")
    await _feed_consumer(rt).process(to_message(e.type, e))
    await deliverer_of(rt).run_once()
    [(_, headers, body)] = receiver.got
    raw, now = json.dumps(body, separators=(",", ":")).encode(), clock.now.timestamp()
    header = headers["x-ccm-signature"]
    assert verify(sub["secret"], header, raw, now=now)
    assert not verify(sub["secret"], header, raw.replace(b"acme", b"acmf"), now=now)
    assert not verify(sub["secret"], header, raw, now=now + 301)
    practice_secret = (await api.get("/v1/practices/acme/webhook-secret",
                                     headers=tokens["acme"])).json()["secret"]
    assert not verify(practice_secret, header, raw, now=now)
    assert len(sub["secret"].encode("utf-8")) == 70  # "whsec_" + 64 hex digits, all of it
    import base64
    import hashlib
    import hmac

    # Standard Webhooks' reading (base64 after "whsec_") decodes, and never matches
    decoded = base64.b64decode(sub["secret"].removeprefix("whsec_"))
    t = header.split(",")[0].removeprefix("t=")
    assert f"v1={hmac.new(decoded, f'{t}.'.encode() + raw, hashlib.sha256).hexdigest()}" \
        not in header
