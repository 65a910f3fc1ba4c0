"""Managing a practice subscription after its creation: rotating its signing secret (the old one
signs beside the new one for an overlap), changing its endpoint or event filter (PATCH), and a
signed test delivery (ping). Pure rules, then the API on SQLite with an httpx mock receiver."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from ccm_notification.adapters.orm import event_sequences, metadata, subscriptions
from ccm_notification.config import NotificationSettings
from ccm_notification.domain.signing import webhook_signature
from ccm_notification.entrypoints.workers import deliverer_of
from ccm_notification.subscriptions.domain import (
    MAX_EARLIER_SECRETS,
    Receiver,
    SigningSecret,
    Verdict,
    rotate,
    signature_header,
    signing_secrets,
    verify_signature,
)
from ccm_notification.subscriptions.service import SubscriptionDeliverer, subscription_secrets
from ccm_shared.events import to_message
from tests.support.routes import snapshot
from tests.unit.notification import test_subscriptions as base
from tests.unit.notification.feed_events import invoice_issued, payment_recorded
from tests.unit.notification.test_subscriptions import _feed_consumer, _readme_verify, _subscribe

T0 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
H = timedelta(hours=1)
OLD, NEW = "whsec_" + "0" * 64, "whsec_" + "1" * 64
env = base.env  # the subscriptions' fixture: SQLite, practices acme and birch, a mock receiver


# -- pure rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kept, overlap, expected", [
    # first rotation: the secret replaced signs for the overlap
    ([SigningSecret(0, OLD)], 24 * H, [(1, NEW, None), (0, OLD, T0 + 24 * H)]),
    # 0: the secret replaced (leaked) stops at once
    ([SigningSecret(0, OLD)], 0 * H, [(1, NEW, None)]),
    # again within the overlap: both earlier ones sign, none longer than the new overlap
    ([SigningSecret(1, "whsec_b", None), SigningSecret(0, OLD, T0 + 20 * H)], 24 * H,
     [(2, NEW, None), (1, "whsec_b", T0 + 24 * H), (0, OLD, T0 + 20 * H)]),
    ([SigningSecret(1, "whsec_b", None), SigningSecret(0, OLD, T0 + 20 * H)], 2 * H,
     [(2, NEW, None), (1, "whsec_b", T0 + 2 * H), (0, OLD, T0 + 2 * H)]),
    # an earlier one whose overlap is over is dropped
    ([SigningSecret(1, "whsec_b", None), SigningSecret(0, OLD, T0)], 24 * H,
     [(2, NEW, None), (1, "whsec_b", T0 + 24 * H)]),
    # at most MAX_EARLIER_SECRETS earlier ones: the oldest goes
    ([SigningSecret(3, "whsec_d"), *(SigningSecret(g, f"whsec_{g}", T0 + H) for g in (2, 1, 0))],
     24 * H, [(4, NEW, None), (3, "whsec_d", T0 + 24 * H), (2, "whsec_2", T0 + H),
              (1, "whsec_1", T0 + H)]),
])
def test_what_a_rotation_keeps(kept, overlap, expected):
    after = rotate(kept, NEW, T0, overlap)
    assert [(s.generation, s.secret, s.valid_until) for s in after] == expected


valid_until = st.one_of(st.none(), st.integers(-48, 200).map(lambda h: T0 + h * H))


@given(st.lists(valid_until, min_size=1, max_size=6), st.integers(0, 168),
       st.integers(0, 400))
def test_a_rotation_signs_with_the_new_secret_first_and_never_extends_an_overlap(
        untils, overlap_hours, later_hours):
    kept = [SigningSecret(g, f"whsec_{g}", u) for g, u in enumerate(untils)]
    after = rotate(kept, NEW, T0, overlap_hours * H)
    assert after[0] == SigningSecret(max(s.generation for s in kept) + 1, NEW, None)
    earlier = after[1:]
    assert len(earlier) <= MAX_EARLIER_SECRETS
    assert all(T0 < s.valid_until <= T0 + overlap_hours * H for s in earlier)
    before = {s.generation: s.valid_until for s in kept}
    assert all(before[s.generation] is None or s.valid_until <= before[s.generation]
               for s in earlier)
    later = T0 + later_hours * H
    signing = signing_secrets(after, later)
    assert signing[0] == NEW  # the current one signs, always first
    assert signing[1:] == [s.secret for s in earlier if s.valid_until > later]


def test_every_secret_of_the_header_verifies_and_the_last_one_alone_for_the_old_snippet():
    body, t = b'{"eventNumber":1}', 1_700_000_000
    header = signature_header([NEW, OLD], t, body)
    assert header == ",".join([webhook_signature(NEW, t, body),
                               webhook_signature(OLD, t, body).split(",")[1]])
    assert verify_signature(NEW, header, body, t) and verify_signature(OLD, header, body, t)
    assert not verify_signature("whsec_" + "2" * 64, header, body, t)
    assert not verify_signature(NEW, header, body + b" ", t)
    assert not verify_signature(NEW, header, body, t + 301)
    assert not verify_signature(NEW, "v1=abc", body, t)
    # one secret: exactly the header message webhooks have always had
    assert signature_header([OLD], t, body) == webhook_signature(OLD, t, body)


# -- the API ------------------------------------------------------------------------------------


def _url(sub: dict, path: str = "") -> str:
    return f"/v1/practices/{sub['practice']}/subscriptions/{sub['id']}{path}"


async def _deliver_one(rt, receiver, practice="acme"):  # noqa: ANN001, ANN202
    """Fan a billing event out and deliver it: the raw body and the signature received."""
    e = invoice_issued(practice)
    await _feed_consumer(rt).process(to_message(e.type, e))
    await deliverer_of(rt).run_once()
    _, headers, body = receiver.got[-1]
    return json.dumps(body, separators=(",", ":")).encode(), headers["x-ccm-signature"]


async def test_a_rotated_secret_signs_beside_the_old_one_until_the_overlap_ends(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme", payload="id-only")
    old = sub["secret"]
    r = await api.post(_url(sub, "/secret"), headers=tokens["acme"])
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new.startswith("whsec_") and len(new) == 70 and new != old
    assert r.json()["secretRotatedAt"] == clock.now.isoformat()
    assert r.json()["previousSecretsValidUntil"] == [(clock.now + 24 * H).isoformat()]
    shown = (await api.get(_url(sub), headers=tokens["acme"])).json()
    assert "secret" not in shown and new not in json.dumps(shown)
    assert shown["previousSecretsValidUntil"] == [(clock.now + 24 * H).isoformat()]

    verify = _readme_verify()  # the README's snippet, as receivers run it
    raw, header = await _deliver_one(rt, receiver)
    assert header.count("v1=") == 2
    now = clock.now.timestamp()
    assert verify(new, header, raw, now=now) and verify(old, header, raw, now=now)
    assert Receiver(new).check(header, raw, int(now)) is Verdict.NEW
    assert Receiver(old).check(header, raw, int(now)) is Verdict.NEW

    clock.now += 24 * H  # the overlap is over: the new secret alone
    raw, header = await _deliver_one(rt, receiver)
    now = clock.now.timestamp()
    assert header.count("v1=") == 1
    assert verify(new, header, raw, now=now) and not verify(old, header, raw, now=now)
    assert (await api.get(_url(sub), headers=tokens["acme"])).json()[
        "previousSecretsValidUntil"] == []


async def test_an_overlap_of_0_stops_the_replaced_secret_at_once(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    r = await api.post(_url(sub, "/secret?overlapHours=0"), headers=tokens["acme"])
    assert r.status_code == 200 and r.json()["previousSecretsValidUntil"] == []
    raw, header = await _deliver_one(rt, receiver)
    now = int(clock.now.timestamp())
    assert verify_signature(r.json()["secret"], header, raw, now)
    assert not verify_signature(sub["secret"], header, raw, now)


async def test_a_rotation_repeated_in_the_overlap_keeps_the_secret_the_receiver_has(env):
    """The first rotation's answer was lost: rotating again must not cut the receiver off."""
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    first = (await api.post(_url(sub, "/secret"), headers=tokens["acme"])).json()["secret"]
    clock.now += H
    second = (await api.post(_url(sub, "/secret?overlapHours=48"),
                             headers=tokens["acme"])).json()["secret"]
    raw, header = await _deliver_one(rt, receiver)
    now = int(clock.now.timestamp())
    assert all(verify_signature(s, header, raw, now) for s in (sub["secret"], first, second))
    assert header.split(",")[1] == signature_header([second], now, raw).split(",")[1]
    assert _readme_verify()(sub["secret"], header, raw, now=now)


async def test_a_rotated_subscription_no_longer_depends_on_the_platform_key(env):
    """Rotating CCM_SECRET_KEY changes a never-rotated subscription's secret (derived) but not
    a rotated one's (stored)."""
    rt, clock, receiver, api, tokens = env
    rotated, derived = await _subscribe(api, tokens, "acme"), await _subscribe(api, tokens, "acme")
    new = (await api.post(_url(rotated, "/secret?overlapHours=0"),
                          headers=tokens["acme"])).json()["secret"]
    other_key = SubscriptionDeliverer(rt.db, NotificationSettings(), "another-key-" + "9" * 32,
                                      clock, rt.state["http_client"])
    e = invoice_issued("acme")
    await _feed_consumer(rt).process(to_message(e.type, e))
    assert await other_key.run_once() == 2
    now = int(clock.now.timestamp())
    signed = {b["subscription"]: (json.dumps(b, separators=(",", ":")).encode(),
                                  h["x-ccm-signature"]) for _, h, b in receiver.got}
    raw, header = signed[rotated["id"]]
    assert verify_signature(new, header, raw, now)  # stored: the platform key is not used
    raw, header = signed[derived["id"]]
    assert not verify_signature(derived["secret"], header, raw, now)  # derived from the key


@pytest.mark.parametrize("query", ["overlapHours=-1", "overlapHours=169", "overlapHours=x"])
async def test_an_overlap_out_of_bounds_is_a_422_and_nothing_changes(env, query):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    before = await snapshot(rt, metadata)
    r = await api.post(_url(sub, f"/secret?{query}"), headers=tokens["acme"])
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert "secret" not in r.json()
    assert await snapshot(rt, metadata) == before


async def test_another_practices_subscription_cannot_be_rotated_changed_or_pinged(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    before = await snapshot(rt, metadata)
    for practice in ("acme", "birch"):
        url = f"/v1/practices/{practice}/subscriptions/{sub['id']}"
        for method, path, body in (("POST", "/secret", None), ("POST", "/test", None),
                                   ("PATCH", "", {"endpoint": "https://birch.example/x"})):
            r = await api.request(method, url + path, json=body, headers=tokens["birch"])
            assert r.status_code == 404, (practice, method, path, r.text)
            assert r.headers["content-type"] == "application/problem+json"
    assert await snapshot(rt, metadata) == before and receiver.got == []


async def test_deleting_a_rotated_subscription_deletes_its_secrets(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    await api.post(_url(sub, "/secret"), headers=tokens["acme"])
    assert (await api.delete(_url(sub), headers=tokens["acme"])).status_code == 204
    async with rt.db.unit_of_work() as uow:
        assert (await uow.session.execute(select(subscription_secrets))).all() == []


# -- PATCH ------------------------------------------------------------------------------------


async def test_a_new_endpoint_gets_what_is_waiting_and_the_failures_start_again(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    receiver.down = True
    e = invoice_issued("acme")
    await _feed_consumer(rt).process(to_message(e.type, e))
    assert await deliverer_of(rt).run_once() == 1  # failed: retried after the backoff
    status = (await api.get(_url(sub, "/status"), headers=tokens["acme"])).json()
    assert status["consecutiveFailures"] == 1 and status["nextAttemptAt"] > clock.now.isoformat()
    receiver.down = False
    r = await api.patch(_url(sub), headers=tokens["acme"],
                        json={"endpoint": "https://fixed.example/hook"})
    assert r.status_code == 200, r.text
    assert r.json()["endpoint"] == "https://fixed.example/hook"
    assert r.json()["events"] == sub["events"] and r.json()["description"] is None
    status = (await api.get(_url(sub, "/status"), headers=tokens["acme"])).json()
    assert status["consecutiveFailures"] == 0 and status["nextAttemptAt"] == clock.now.isoformat()
    assert await deliverer_of(rt).run_once() == 1  # at once, not after the backoff
    [(host, _, body)] = receiver.got
    assert host == "fixed.example" and body["eventNumber"] == 1


async def test_a_new_event_filter_applies_to_the_events_fanned_out_after_it(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme", events=["billing.invoice.issued.v1"])
    feed = _feed_consumer(rt)
    issued = invoice_issued("acme")
    await feed.process(to_message(issued.type, issued))
    r = await api.patch(_url(sub), headers=tokens["acme"], json={
        "events": ["billing.payment.recorded.v1", "billing.payment.recorded.v1"],
        "description": "payments only"})
    assert r.status_code == 200, r.text
    assert r.json()["events"] == ["billing.payment.recorded.v1"]
    assert r.json()["description"] == "payments only"
    for e in (invoice_issued("acme"), payment_recorded("acme", "inv")):
        await feed.process(to_message(e.type, e))
    await deliverer_of(rt).run_once()
    # the one numbered before the change is still delivered; after it, payments only
    assert [(b["eventNumber"], b["event"]["type"]) for _, _, b in receiver.got] == [
        (1, "billing.invoice.issued.v1"), (2, "billing.payment.recorded.v1")]
    cleared = await api.patch(_url(sub), headers=tokens["acme"], json={"description": None})
    assert cleared.status_code == 200 and cleared.json()["description"] is None
    assert cleared.json()["events"] == ["billing.payment.recorded.v1"]


async def test_a_paused_subscription_stays_paused_when_its_endpoint_changes(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    receiver.down = True
    e = invoice_issued("acme")
    await _feed_consumer(rt).process(to_message(e.type, e))
    for _ in range(3):  # paused after 3 (the env's setting)
        await deliverer_of(rt).run_once()
        clock.now += 2 * H
    r = await api.patch(_url(sub), headers=tokens["acme"],
                        json={"endpoint": "https://fixed.example/hook"})
    assert r.status_code == 200 and r.json()["status"] == "paused"
    receiver.down = False
    assert await deliverer_of(rt).run_once() == 0
    assert (await api.post(_url(sub, "/resume"), headers=tokens["acme"])).status_code == 200
    assert await deliverer_of(rt).run_once() == 1
    assert receiver.got[-1][0] == "fixed.example"


@pytest.mark.parametrize("body, fragment", [
    ({"endpoint": "http://acme.example/hook"}, "https"),
    ({"endpoint": "https://user:pw@acme.example/hook"}, "credentials"),
    ({"endpoint": "https://acme.example/ho ok"}, "spaces"),
    ({"endpoint": "https://127.0.0.1/hook"}, "not a public internet address"),
    ({"endpoint": None}, "endpoint may not be null"),
    ({"events": None}, "events may not be null"),
    ({"events": []}, "events"),
    ({"events": ["billing.invoice.exploded.v1"]}, "events"),
    ({"payload": "id-only"}, "payload"),  # not changeable
    ({"description": "x" * 201}, "description"),
    ({"description": "bad\u0000text"}, "NUL"),
])
async def test_a_bad_change_is_a_422_and_nothing_changes(env, body, fragment):
    rt, clock, receiver, api, tokens = env
    rt.settings = rt.settings.model_copy(update={"outbound_allow_private": False})  # production
    sub = await _subscribe(api, tokens, "acme")
    before = await snapshot(rt, metadata)
    r = await api.patch(_url(sub), headers=tokens["acme"], json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json" and fragment in r.text
    assert await snapshot(rt, metadata) == before


async def test_http_is_taken_where_the_setting_allows_it(env, monkeypatch):
    rt, clock, receiver, api, tokens = env
    monkeypatch.setenv("CCM_NOTIFICATION_SUBSCRIPTION_REQUIRE_HTTPS", "false")
    rt.state.pop("settings", None)  # read again from the environment
    sub = await _subscribe(api, tokens, "acme")
    r = await api.patch(_url(sub), headers=tokens["acme"],
                        json={"endpoint": "http://localhost:9000/hook"})
    assert r.status_code == 200, r.text


# -- the test delivery --------------------------------------------------------------------------


async def _numbers(rt, sub_id: str) -> tuple:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        row = (await uow.session.execute(
            select(subscriptions).where(subscriptions.c.id == sub_id))).one()
        counters = (await uow.session.execute(
            select(event_sequences.c.subject, event_sequences.c["last"]).order_by(
                event_sequences.c.subject))).all()
    return row.last_event_number, row.delivered_through, row.consecutive_failures, counters


async def test_a_ping_is_signed_sent_at_once_and_numbers_nothing(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    await _deliver_one(rt, receiver)  # event 1 delivered
    before = await _numbers(rt, sub["id"])
    log_before = (await api.get(_url(sub, "/deliveries"), headers=tokens["acme"])).json()
    r = await api.post(_url(sub, "/test"), headers=tokens["acme"])
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["delivered"], result["status"], result["signatures"]) == (True, 200, 1)
    assert isinstance(result["latencyMs"], int) and result["response"].startswith("http 200")
    host, headers, body = receiver.got[-1]
    assert host == "acme.example" and body["type"] == "ping" and "eventNumber" not in body
    assert (body["subscription"], body["practice"], body["id"]) == (sub["id"], "acme",
                                                                     result["ping"])
    raw = json.dumps(body, separators=(",", ":")).encode()
    now = int(clock.now.timestamp())
    assert Receiver(sub["secret"]).check(headers["x-ccm-signature"], raw, now) is Verdict.PING
    assert Receiver(sub["secret"]).receive(headers["x-ccm-signature"], raw, now,
                                           lambda _: pytest.fail("no work for a ping")) == 200
    assert "x-ccm-event-number" not in headers
    assert await _numbers(rt, sub["id"]) == before  # no number, no practiceSequence used
    assert (await api.get(_url(sub, "/deliveries"), headers=tokens["acme"])).json() == \
        log_before
    # the next real event is number 2, its feed number the next one
    raw, _ = await _deliver_one(rt, receiver)
    assert json.loads(raw)["eventNumber"] == 2 and json.loads(raw)["event"][
        "practiceSequence"] == 2


async def test_a_ping_reports_a_failing_receiver_and_changes_nothing(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    receiver.down = True
    before = await _numbers(rt, sub["id"])
    result = (await api.post(_url(sub, "/test"), headers=tokens["acme"])).json()
    assert (result["delivered"], result["status"]) == (False, 503)
    assert "maintenance" in result["response"]
    assert await _numbers(rt, sub["id"]) == before  # no failure counted, nothing paused


async def test_a_ping_reports_an_endpoint_that_does_not_answer(env):
    rt, clock, receiver, api, tokens = env

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    rt.state["http_client"] = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    sub = await _subscribe(api, tokens, "acme")
    result = (await api.post(_url(sub, "/test"), headers=tokens["acme"])).json()
    assert result["delivered"] is False and result["status"] is None
    assert "ConnectError" in result["response"]


async def test_a_ping_during_an_overlap_carries_both_signatures(env):
    rt, clock, receiver, api, tokens = env
    sub = await _subscribe(api, tokens, "acme")
    new = (await api.post(_url(sub, "/secret"), headers=tokens["acme"])).json()["secret"]
    result = (await api.post(_url(sub, "/test"), headers=tokens["acme"])).json()
    assert result["signatures"] == 2
    _, headers, body = receiver.got[-1]
    raw, now = json.dumps(body, separators=(",", ":")).encode(), int(clock.now.timestamp())
    assert all(verify_signature(s, headers["x-ccm-signature"], raw, now)
               for s in (new, sub["secret"]))
