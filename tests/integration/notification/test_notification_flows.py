"""Notification service on real PostgreSQL (and Kafka), with a real SMTP server and a real HTTP
receiver: content, signatures, retries, acknowledgement and escalation, calls, exactly-once."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import messages, outbox
from ccm_notification.bootstrap import SERVICE
from ccm_notification.domain.signing import verify_webhook
from ccm_notification.entrypoints.workers import dispatcher_of
from ccm_notification.service_layer import acks
from ccm_notification.service_layer.handlers import alerts_handler, directory_handler
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.integration.conftest import eventually
from tests.integration.notification.servers import start_http, start_smtp

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw) -> None:  # noqa: ANN003
        self.now += timedelta(**kw)


@pytest.fixture(scope="session")
def receivers():
    controller, sink = start_smtp()
    http = start_http()
    env = {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(controller.port),
        "SMTP_STARTTLS": "false",
        "RETRY_BACKOFF_SECONDS": "10",
        "PUBLIC_BASE_URL": "http://notify.test",
        "DISPATCH_INTERVAL_SECONDS": "0.1",
        "ACK_SWEEP_INTERVAL_SECONDS": "0.2",
        "ACK_SLA_MINUTES": "60",
        "WEBHOOK_MAX_ATTEMPTS": "4",
        "MAIL_FROM": "CCM <ccm@vendor.test>",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(f"CCM_NOTIFICATION_{key}", value)
        yield sink, http
    controller.stop()
    http.close()


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def migrated(infra):
    await upgrade_async(infra.database_url, SERVICE.schema, SERVICE.migrations_package)
    return infra


class Ctx:
    """One practice, its token, an HTTP client on the service and the receivers."""

    def __init__(self, runtime, clock, client, practice, token, sink, http) -> None:  # noqa: ANN001
        self.runtime, self.clock, self.client = runtime, clock, client
        self.practice, self.token, self.sink, self.http = practice, token, sink, http
        self.auth = {"Authorization": f"Bearer {token}"}

    def url(self, path: str) -> str:
        return f"/v1/practices/{self.practice}{path}"

    async def provider(self, pid: str, **fields) -> dict:  # noqa: ANN003
        r = await self.client.put(self.url(f"/providers/{pid}"), json=fields, headers=self.auth)
        assert r.status_code in (200, 201), r.text
        return r.json()

    async def dispatch(self) -> int:
        return await dispatcher_of(self.runtime).run_once()

    async def outbound(self) -> list[tuple]:
        """This practice's messages as stored (kind, recipient, status, attempts, last error,
        next attempt, the test clock): what a failed delivery assertion needs to be read."""
        async with self.runtime.db.unit_of_work() as uow:
            rows = (await uow.session.execute(
                select(messages.c.kind, messages.c.recipient, messages.c.status,
                       messages.c.attempts, messages.c.last_error, messages.c.next_attempt_at)
                .where(messages.c.practice == self.practice))).all()
        return [(*tuple(r), self.clock.now) for r in rows]

    async def message(self, message_id: str) -> dict:
        r = await self.client.get(self.url(f"/notifications/{message_id}"), headers=self.auth)
        assert r.status_code == 200, r.text
        return r.json()

    async def consume(self, handler, event: CloudEvent) -> None:  # noqa: ANN001
        async with self.runtime.db.unit_of_work() as uow:
            await handler(event, uow)
            await uow.commit()

    def mail(self, address: str) -> str:
        return f"{address}-{self.practice}@clinic.test"


async def _ctx(infra, receivers, clock: Clock, runtime: ServiceRuntime):  # noqa: ANN001, ANN202
    sink, http = receivers
    practice = f"np-{uuid.uuid4().hex[:10]}"
    await create_practice(
        runtime.db.engine,
        practice_id=practice,
        name="Maple Family Practice",
        timezone="America/Chicago",
        pricing=Pricing(),
    )
    token = await create_token(runtime.db.engine, practice_id=practice)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=runtime.app()), base_url="http://notify.test"
    )
    return Ctx(runtime, clock, client, practice, token, sink, http)


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(migrated, kafka, receivers):
    clock = Clock()
    settings = load_settings(
        database_url=migrated.database_url,
        kafka_bootstrap_servers=migrated.kafka_bootstrap_servers,
        secret_key="integration-secret-key-0123456789abcdef",
    )
    runtime = ServiceRuntime.build(SERVICE, settings, transport=kafka, clock=clock)
    c = await _ctx(migrated, receivers, clock, runtime)
    yield c
    await c.client.aclose()
    if "http_client" in runtime.state:
        await runtime.state["http_client"].aclose()
    await runtime.db.dispose()


def review_event(
    practice: str,
    type_: str,
    *,
    responsible: str,
    supervisor: str | None,
    step: int = 1,
    days_overdue: int = 12,
    tracker: str = "t-1",
) -> CloudEvent:
    kind = type_.split(".")[2]
    return CloudEvent(
        source="/ccm/careplan",
        type=type_,
        tenant=practice,
        subject="Patient/p-77",
        data={
            "tracker": tracker,
            "carePlan": "CarePlan/cp-9",
            "patient": "Patient/p-77",
            "dueDate": "2026-11-01",
            "daysOverdue": days_overdue,
            "responsibleProvider": f"Practitioner/{responsible}",
            "supervisor": f"Practitioner/{supervisor}" if supervisor else None,
            "step": step,
            "idempotencyKey": f"{practice}:{tracker}:{kind}:2026-11-01:{step}",
        },
    )


# -- Kafka end to end --------------------------------------------------------------------------


async def test_careplan_escalation_over_kafka_ends_as_exactly_one_email(migrated, kafka, receivers):
    clock = Clock()
    settings = load_settings(
        database_url=migrated.database_url, kafka_bootstrap_servers=migrated.kafka_bootstrap_servers
    )
    runtime = ServiceRuntime.build(SERVICE, settings, clock=clock)  # its own Kafka transport
    c = await _ctx(migrated, receivers, clock, runtime)
    await c.provider("doc-1", name="Dr. Ada Byron", email=c.mail("doc"))
    await c.provider("sup-1", name="Dr. Grace Hopper", email=c.mail("sup"))
    event = review_event(
        c.practice, "careplan.review.escalated.v1", responsible="doc-1", supervisor="sup-1"
    )
    # the same event twice, and the producer re-publishing the same intent under a new id
    again = event.model_copy(update={"id": str(uuid.uuid4())})
    await runtime.start()
    try:
        await kafka.send_batch([to_message(event.type, e) for e in (event, event, again)])

        async def arrived() -> bool:
            return bool(c.sink.to(c.mail("sup")))

        await eventually(arrived, timeout=90, what="the escalation email")
        alerts = runtime.consumers[1]

        async def all_consumed() -> bool:
            async with runtime.db.unit_of_work() as uow:
                rows = (
                    await uow.session.execute(
                        select(messages.c.id).where(messages.c.practice == c.practice)
                    )
                ).all()
            return len(rows) >= 1 and alerts.stats.applied + alerts.stats.duplicates >= 3

        await eventually(all_consumed, timeout=60, what="all three deliveries consumed")
        await asyncio.sleep(1.0)  # give a second email every chance to show up
    finally:
        await runtime.stop()
        await c.client.aclose()
    mails = c.sink.to(c.mail("sup"))
    assert len(mails) == 1
    mail = mails[0]
    assert mail["Subject"] == "[Escalation] Care-plan review for Patient/p-77 is 12 days overdue"
    text = mail.get_body(preferencelist=("plain",)).get_content()
    assert "Dear Dr. Grace Hopper" in text and "Maple Family Practice" in text
    assert "responsible provider (Practitioner/doc-1)" in text
    assert "http://notify.test/v1/ack/" in text
    assert mail["X-CCM-Idempotency-Key"].endswith(":t-1:escalated:2026-11-01:1")
    assert not c.sink.to(c.mail("doc"))


# -- webhooks, retries, failures ---------------------------------------------------------------


async def test_webhook_failing_twice_then_succeeding_is_accepted_exactly_once(ctx):
    hook = f"{ctx.http.url}/hooks/{uuid.uuid4().hex}"
    await ctx.provider(
        "doc-2",
        name="Dr. Who",
        webhook_url=hook,
        email=ctx.mail("doc2"),
        preferred_channel="webhook",
    )
    ctx.http.fail_with = [500, 503]
    r = await ctx.client.post(
        ctx.url("/notifications"),
        headers=ctx.auth,
        json={
            "kind": "care-gap-alert",
            "provider": "doc-2",
            "patient": "Patient/p-1",
            "fields": {"patient": "Patient/p-1", "gap": "HbA1c not measured in 6 months"},
        },
    )
    assert r.status_code == 201, r.text
    mid = r.json()["id"]
    await ctx.dispatch()
    assert (await ctx.message(mid))["status"] == "pending"
    assert await ctx.dispatch() == 0  # not due before its backoff
    ctx.clock.advance(seconds=10)
    await ctx.dispatch()
    ctx.clock.advance(seconds=20)
    await ctx.dispatch()
    delivered_at = int(ctx.clock().timestamp())
    ctx.clock.advance(hours=1)
    assert await ctx.dispatch() == 0
    got = [x for x in ctx.http.received if x.path == hook.removeprefix(ctx.http.url)]
    assert [x.status for x in got] == [500, 503, 200]
    assert len([x for x in got if x.status == 200]) == 1
    message = await ctx.message(mid)
    assert message["status"] == "sent" and message["attempts"] == 3
    assert [d["outcome"] for d in message["deliveries"]] == ["retry", "retry", "delivered"]
    secret = (await ctx.client.get(ctx.url("/webhook-secret"), headers=ctx.auth)).json()["secret"]
    accepted = got[-1]
    now = delivered_at
    assert verify_webhook(secret, accepted.headers["X-CCM-Signature"], accepted.body, now)
    assert not verify_webhook(
        secret, accepted.headers["X-CCM-Signature"], accepted.body.replace(b"HbA1c", b"HbA1C"), now
    )
    assert not verify_webhook(
        secret, accepted.headers["X-CCM-Signature"], accepted.body, now + 3600
    )  # a replay an hour later
    body = accepted.json()
    assert body["kind"] == "care-gap-alert" and body["requiresAcknowledgement"] is True
    assert "HbA1c not measured in 6 months" in body["text"]


async def test_a_message_that_finally_fails_raises_an_event_and_lists_as_failed(ctx):
    hook = f"{ctx.http.url}/hooks/{uuid.uuid4().hex}"
    await ctx.provider("doc-3", name="Dr. No", webhook_url=hook)
    ctx.http.fail_with = [500, 500, 500, 500]
    r = await ctx.client.post(
        ctx.url("/notifications"),
        headers=ctx.auth,
        json={
            "kind": "attestation-reminder",
            "provider": "doc-3",
            "fields": {"month": "2026-11", "due_date": "2026-12-05"},
        },
    )
    mid = r.json()["id"]
    for _ in range(4):
        await ctx.dispatch()
        ctx.clock.advance(hours=2)
    failed = (
        await ctx.client.get(ctx.url("/notifications?status=failed"), headers=ctx.auth)
    ).json()
    assert [m["id"] for m in failed] == [mid]
    assert failed[0]["attempts"] == 4 and "http 500" in failed[0]["last_error"]
    async with ctx.runtime.db.unit_of_work() as uow:
        events = (
            (
                await uow.session.execute(
                    select(outbox.c.payload).where(
                        outbox.c.tenant == ctx.practice,
                        outbox.c.event_type == "notification.message.failed.v1",
                    )
                )
            )
            .scalars()
            .all()
        )
    assert [json.loads(e)["data"]["message"] for e in events] == [mid]


async def test_fhir_communication_is_pushed_to_the_ehr_endpoint(ctx):
    base = f"{ctx.http.url}/fhir/{uuid.uuid4().hex}"
    await ctx.provider("doc-4", name="Dr. Strange", fhir_endpoint=base, preferred_channel="fhir")
    r = await ctx.client.post(
        ctx.url("/notifications"),
        headers=ctx.auth,
        json={
            "kind": "deterioration-escalation",
            "provider": "doc-4",
            "patient": "Patient/p-2",
            "fields": {"patient": "Patient/p-2", "finding": "weight up 3 kg in 2 days"},
        },
    )
    await ctx.dispatch()
    got = [x for x in ctx.http.received if x.path.startswith(base.removeprefix(ctx.http.url))]
    assert len(got) == 1 and got[0].path.endswith("/Communication")
    resource = got[0].json()
    assert resource["resourceType"] == "Communication" and resource["priority"] == "urgent"
    assert resource["subject"] == {"reference": "Patient/p-2"}
    assert resource["recipient"] == [{"reference": "Practitioner/doc-4"}]
    assert "weight up 3 kg in 2 days" in resource["payload"][0]["contentString"]
    assert got[0].headers["If-None-Exist"].endswith(r.json()["id"])


# -- acknowledgements --------------------------------------------------------------------------


async def _alert(ctx, provider: str = "doc-5") -> str:  # noqa: ANN001
    await ctx.provider("sup-5", name="Dr. Supervisor", email=ctx.mail("sup5"))
    await ctx.provider(provider, name="Dr. Busy", email=ctx.mail(provider), supervisor="sup-5")
    r = await ctx.client.post(
        ctx.url("/notifications"),
        headers=ctx.auth,
        json={
            "kind": "care-gap-alert",
            "provider": provider,
            "patient": "Patient/p-3",
            "fields": {"patient": "Patient/p-3", "gap": "no eye exam this year"},
        },
    )
    assert r.status_code == 201, r.text
    await ctx.dispatch()
    return r.json()["id"]


def _ack_link(mail) -> str:  # noqa: ANN001
    text = mail.get_body(preferencelist=("plain",)).get_content()
    return next(w for w in text.split() if "/v1/ack/" in w).removeprefix("http://notify.test")


async def test_acknowledged_in_time_means_no_reminder_and_no_escalation(ctx):
    mid = await _alert(ctx)
    pending = (await ctx.client.get(ctx.url("/notifications?ack=pending"), headers=ctx.auth)).json()
    assert [(p["id"], p["provider_name"]) for p in pending] == [(mid, "Dr. Busy")]
    link = _ack_link(ctx.sink.to(ctx.mail("doc-5"))[0])
    page = await ctx.client.get(link)
    assert page.status_code == 200 and "<form" in page.text
    assert (await ctx.message(mid))["ack_state"] == "pending"  # a GET never acknowledges
    ctx.clock.advance(minutes=30)
    assert (await ctx.client.post(link)).status_code == 200
    ctx.clock.advance(hours=5)
    await acks.sweep(ctx.runtime.db, ctx.runtime.state["notifier"])
    await ctx.dispatch()
    assert len(ctx.sink.to(ctx.mail("doc-5"))) == 1 and not ctx.sink.to(ctx.mail("sup5"))
    assert (await ctx.message(mid))["ack_state"] == "acknowledged"
    assert (
        await ctx.client.get(ctx.url("/notifications?ack=pending"), headers=ctx.auth)
    ).json() == []


async def test_no_acknowledgement_renotifies_then_escalates_to_the_supervisor(ctx):
    mid = await _alert(ctx)
    notifier = ctx.runtime.state["notifier"]
    ctx.clock.advance(minutes=59)
    await acks.sweep(ctx.runtime.db, notifier)  # SLA (60 min) not yet over
    await ctx.dispatch()
    assert len(ctx.sink.to(ctx.mail("doc-5"))) == 1
    ctx.clock.advance(minutes=2)
    await acks.sweep(ctx.runtime.db, notifier)
    await ctx.dispatch()
    to_doc = ctx.sink.to(ctx.mail("doc-5"))
    assert [m["Subject"].strip().startswith("[Reminder]") for m in to_doc] == [False, True], [
        m["Subject"] for m in to_doc
    ]
    assert not ctx.sink.to(ctx.mail("sup5"))
    ctx.clock.advance(minutes=61)
    await acks.sweep(ctx.runtime.db, notifier)
    await ctx.dispatch()
    to_sup = ctx.sink.to(ctx.mail("sup5"))
    assert len(to_sup) == 1, await ctx.outbound()  # failed once under load: say what was stored
    assert (
        to_sup[0]["Subject"].strip()
        == "[Escalation] Not acknowledged: [Action needed] Care gap for "
        "Patient/p-3: no eye exam this year"
    )
    assert "sent to Dr. Busy" in to_sup[0].get_body(preferencelist=("plain",)).get_content()
    pending = (await ctx.client.get(ctx.url("/notifications?ack=pending"), headers=ctx.auth)).json()
    assert [(p["id"], p["escalation_level"]) for p in pending] == [(mid, 2)]
    # the supervisor acknowledging through the API closes the alert
    r = await ctx.client.post(f"/v1/notifications/{mid}/ack", headers=ctx.auth)
    assert r.status_code == 200 and r.json()["ack_state"] == "acknowledged"
    ctx.clock.advance(days=2)
    await acks.sweep(ctx.runtime.db, notifier)
    await ctx.dispatch()
    assert len(ctx.sink.to(ctx.mail("doc-5"))) == 2 and len(ctx.sink.to(ctx.mail("sup5"))) == 1
    assert (
        await ctx.client.get(ctx.url("/notifications?ack=pending"), headers=ctx.auth)
    ).json() == []


async def test_expired_or_tampered_links_are_refused(ctx):
    mid = await _alert(ctx)
    link = _ack_link(ctx.sink.to(ctx.mail("doc-5"))[0])
    body, mac = link.removeprefix("/v1/ack/").split(".")
    tampered = f"/v1/ack/{body[:-2]}{'A' if body[-2] != 'A' else 'B'}{body[-1]}.{mac}"
    assert (await ctx.client.post(tampered)).status_code == 404
    assert (await ctx.client.post("/v1/ack/not-a-token")).status_code == 404
    ctx.clock.advance(hours=73)
    expired = await ctx.client.post(link)
    assert expired.status_code == 410 and expired.json()["title"] == "Gone"
    assert (await ctx.message(mid))["ack_state"] == "pending"


async def test_another_practice_cannot_see_or_acknowledge_alerts(ctx, migrated):
    mid = await _alert(ctx)
    other = f"np-{uuid.uuid4().hex[:10]}"
    await create_practice(
        ctx.runtime.db.engine,
        practice_id=other,
        name="Other",
        timezone="America/Chicago",
        pricing=Pricing(),
    )
    auth = {
        "Authorization": f"Bearer {await create_token(ctx.runtime.db.engine, practice_id=other)}"
    }
    assert (await ctx.client.post(f"/v1/notifications/{mid}/ack", headers=auth)).status_code == 404
    assert (await ctx.client.get(ctx.url(f"/notifications/{mid}"), headers=auth)).status_code == 404
    assert (await ctx.client.get(ctx.url("/providers/doc-5"), headers=auth)).status_code == 404


# -- templates, fields, exactly once -----------------------------------------------------------


async def test_missing_template_field_is_refused_before_anything_is_sent(ctx):
    await ctx.provider("doc-6", email=ctx.mail("doc6"))
    r = await ctx.client.post(
        ctx.url("/notifications"),
        headers=ctx.auth,
        json={"kind": "care-gap-alert", "provider": "doc-6", "fields": {"patient": "Patient/p-4"}},
    )
    assert r.status_code == 422 and "gap" in r.json()["detail"]
    assert (await ctx.client.get(ctx.url("/notifications"), headers=ctx.auth)).json() == []


async def test_same_idempotency_key_records_one_message(ctx):
    await ctx.provider("doc-7", email=ctx.mail("doc7"))
    body = {
        "kind": "attestation-reminder",
        "provider": "doc-7",
        "idempotency_key": "att-2026-11",
        "fields": {"month": "2026-11", "due_date": "2026-12-05"},
    }
    first = await ctx.client.post(ctx.url("/notifications"), headers=ctx.auth, json=body)
    second = await ctx.client.post(ctx.url("/notifications"), headers=ctx.auth, json=body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    await ctx.dispatch()
    assert len(ctx.sink.to(ctx.mail("doc7"))) == 1


async def test_practice_template_override_is_used_and_a_bad_one_refused(ctx):
    await ctx.provider("doc-8", name="Dr. Override", email=ctx.mail("doc8"))
    bad = await ctx.client.put(
        ctx.url("/templates/attestation-reminder"),
        headers=ctx.auth,
        json={"source": "{% block subject %}{{ secret }}{% endblock %}"},
    )
    assert bad.status_code == 422
    source = (
        "{% block subject %}Sign {{ month }} <now>{% endblock %}"
        "{% block text %}Hi {{ provider_name }}, sign by {{ due_date }}.{% endblock %}"
        "{% block html %}<p>Hi {{ provider_name }} & co</p>{% endblock %}"
    )
    ok = await ctx.client.put(
        ctx.url("/templates/attestation-reminder"), headers=ctx.auth, json={"source": source}
    )
    assert ok.status_code == 200, ok.text
    await ctx.provider("doc-8", name="Dr. <b>Override</b>")
    await ctx.client.post(
        ctx.url("/notifications"),
        headers=ctx.auth,
        json={
            "kind": "attestation-reminder",
            "provider": "doc-8",
            "fields": {"month": "2026-11", "due_date": "2026-12-05"},
        },
    )
    await ctx.dispatch()
    mail = ctx.sink.to(ctx.mail("doc8"))[0]
    assert mail["Subject"] == "Sign 2026-11 <now>"
    assert (
        mail.get_body(preferencelist=("plain",)).get_content().strip()
        == "Hi Dr. <b>Override</b>, sign by 2026-12-05."
    )
    assert (
        "Hi Dr. &lt;b&gt;Override&lt;/b&gt; & co"
        in mail.get_body(preferencelist=("html",)).get_content()
    )


# -- directory ---------------------------------------------------------------------------------


def practitioner_event(practice: str, pid: str, email: str, last_updated: str) -> CloudEvent:
    return CloudEvent(
        source="/ccm/ingest",
        type="ingest.practitioner.upserted.v1",
        tenant=practice,
        subject=f"Practitioner/{pid}",
        data={
            "source": {
                "resourceType": "Practitioner",
                "id": pid,
                "versionId": "1",
                "lastUpdated": last_updated,
                "sha256": "0" * 64,
                "receivedAt": last_updated,
            },
            "practitioner": f"Practitioner/{pid}",
            "active": True,
            "name": {"family": "Curie", "given": ["Marie"], "prefix": ["Dr."]},
            "npi": "1234567893",
            "telecom": [{"system": "email", "value": email, "use": "work"}],
            "qualifications": [],
            "deleted": False,
        },
    )


async def test_manual_correction_survives_a_later_ehr_update_until_released(ctx):
    handle = directory_handler(ctx.clock)
    await ctx.consume(
        handle,
        practitioner_event(ctx.practice, "mc-1", "old@ehr.test", "2026-11-01T10:00:00+00:00"),
    )
    record = (await ctx.client.get(ctx.url("/providers/mc-1"), headers=ctx.auth)).json()
    assert (record["name"], record["email"]) == ("Dr. Marie Curie", "old@ehr.test")
    fixed = await ctx.client.put(
        ctx.url("/providers/mc-1"),
        headers=ctx.auth | {"If-Match": '"1"'},
        json={"email": "marie@clinic.test"},
    )
    assert fixed.status_code == 200 and fixed.json()["pinned"] == ["email"]
    stale = await ctx.client.put(
        ctx.url("/providers/mc-1"), headers=ctx.auth | {"If-Match": '"1"'}, json={"phone": "555"}
    )
    assert stale.status_code == 412
    await ctx.consume(
        handle,
        practitioner_event(ctx.practice, "mc-1", "newer@ehr.test", "2026-11-02T10:00:00+00:00"),
    )
    record = (await ctx.client.get(ctx.url("/providers/mc-1"), headers=ctx.auth)).json()
    assert record["email"] == "marie@clinic.test"
    assert record["conflicts"] == {"email": "newer@ehr.test"}
    history = (await ctx.client.get(ctx.url("/providers/mc-1/history"), headers=ctx.auth)).json()
    assert [h["origin"] for h in history] == ["fhir", "manual", "fhir"]
    assert history[-1]["held"] == {"email": "newer@ehr.test"}
    released = await ctx.client.put(
        ctx.url("/providers/mc-1"), headers=ctx.auth, json={"release": ["email"]}
    )
    assert released.json()["email"] == "newer@ehr.test" and released.json()["pinned"] == []
    # an older EHR version arriving late changes nothing
    await ctx.consume(
        handle,
        practitioner_event(ctx.practice, "mc-1", "oldest@ehr.test", "2026-10-01T10:00:00+00:00"),
    )
    record = (await ctx.client.get(ctx.url("/providers/mc-1"), headers=ctx.auth)).json()
    assert record["email"] == "newer@ehr.test"


# -- scheduled summary, calls ------------------------------------------------------------------


async def test_period_closed_sends_the_monthly_utilization_summary(ctx):
    await ctx.provider("lead-1", name="Dr. Lead", email=ctx.mail("lead"))
    r = await ctx.client.put(
        ctx.url("/contacts"),
        headers=ctx.auth,
        json={"supervisor": "lead-1", "summary_recipients": ["lead-1"]},
    )
    assert r.status_code == 200
    event = CloudEvent(
        source="/ccm/billing",
        type="billing.period.closed.v1",
        tenant=ctx.practice,
        data={
            "month": "2026-10",
            "invoiceId": "inv-10",
            "patientsEnrolled": 120,
            "patientsBillable": 97,
            "patientsBlocked": 4,
            "minutes": {"staff": 2650, "practitioner": 310},
            "codes": {"99490": 80, "99439": 35, "99491": 9},
            "blockers": {"consent-missing": 3, "no-care-plan": 1},
            "totalNet": "7421.50",
        },
    )
    handle = alerts_handler(ctx.runtime.state["notifier"])
    await ctx.consume(handle, event)
    await ctx.consume(handle, event.model_copy(update={"id": str(uuid.uuid4())}))
    await ctx.dispatch()
    mails = ctx.sink.to(ctx.mail("lead"))
    assert len(mails) == 1
    text = mails[0].get_body(preferencelist=("plain",)).get_content()
    assert mails[0]["Subject"] == "CCM utilization summary 2026-10 for Maple Family Practice"
    for expected in (
        "Patients enrolled: 120",
        "Patients billable: 97",
        "2650 / 310",
        "99439 x35, 99490 x80, 99491 x9",
        "consent-missing (3)",
        "$7421.50",
    ):
        assert expected in text


async def test_call_request_and_chosen_slot_send_ics_to_both_sides(ctx):
    await ctx.provider("doc-9", name="Dr. Call", email=ctx.mail("doc9"))
    start = ctx.clock() + timedelta(days=1)
    r = await ctx.client.post(
        ctx.url("/calls"),
        headers=ctx.auth,
        json={
            "provider": "doc-9",
            "reason": "Discuss rising BNP",
            "patient": "Patient/p-5",
            "slots": [start.isoformat(), (start + timedelta(hours=2)).isoformat()],
            "requester_name": "Nurse Joy",
            "requester_email": ctx.mail("nurse"),
        },
    )
    assert r.status_code == 201, r.text
    await ctx.dispatch()
    request_mail = ctx.sink.to(ctx.mail("doc9"))[0]
    text = request_mail.get_body(preferencelist=("plain",)).get_content()
    links = [w for w in text.split() if "/v1/calls/choose/" in w]
    assert len(links) == 2
    chosen = await ctx.client.post(links[1].removeprefix("http://notify.test"))
    assert chosen.status_code == 200, chosen.text
    again = await ctx.client.post(links[1].removeprefix("http://notify.test"))
    assert again.status_code == 200
    other = await ctx.client.post(links[0].removeprefix("http://notify.test"))
    assert other.status_code == 409
    await ctx.dispatch()
    for address in (ctx.mail("doc9"), ctx.mail("nurse")):
        confirmed = [m for m in ctx.sink.to(address) if m["Subject"].startswith("Call confirmed")]
        assert len(confirmed) == 1, address
        ics = next(
            p for p in confirmed[0].iter_attachments() if p.get_content_type() == "text/calendar"
        ).get_content()
        ics = ics.decode() if isinstance(ics, bytes) else ics
        expected = (start + timedelta(hours=2)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        assert f"DTSTART:{expected}" in ics and "METHOD:REQUEST" in ics
        assert f"call-{r.json()['id']}@ccm-platform" in ics
