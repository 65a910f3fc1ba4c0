"""A care-plan message nobody is configured to receive yet (a new practice's first escalation,
before its clinical supervisor is set) is held, not failed: listed with its reason, sent once
as soon as a recipient is configured (embedded SQLite, in-process bus)."""

import json
import uuid

from sqlalchemy import select

from ccm_notification.adapters.orm import messages, outbox, practice_contacts
from ccm_notification.adapters.sql import upsert
from ccm_notification.entrypoints.workers import notifier_of, sweep_and_release
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.events import CloudEvent, to_message
from tests.unit.notification.conftest import NOW

KEY = "acme:tr-1:escalated:2026-06-01:5"


def escalated(supervisor: str | None = None, *, key: str = KEY, kind: str = "escalated",
              days: int = 180) -> CloudEvent:
    return CloudEvent(
        source="/ccm/careplan", type=f"careplan.review.{kind}.v1", tenant="acme",
        subject="Patient/p1", id=str(uuid.uuid4()),
        data={"tracker": "tr-1", "carePlan": "CarePlan/cp1", "patient": "Patient/p1",
              "dueDate": "2026-06-01", "daysOverdue": days,
              "responsibleProvider": "Practitioner/doc-1", "supervisor": supervisor, "step": 5,
              "idempotencyKey": key})


async def deliver(rt, event: CloudEvent, consumer: str = "notification-alerts") -> None:  # noqa: ANN001
    runtime = next(c for c in rt.consumers if c.name == consumer)
    await runtime.process(to_message(event.type, event))
    assert runtime.stats.dead_lettered == 0


async def all_messages(rt) -> list:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        return (await uow.session.execute(select(messages).order_by(messages.c.created_at))).all()


async def failed_events(rt) -> list[dict]:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(outbox.c.payload).where(
            outbox.c.event_type == "notification.message.failed.v1"))).scalars().all()
    return [json.loads(p)["data"] for p in rows]


async def add_lead(rt) -> None:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        await edit_provider(uow, "acme", "lead", {"name": "Dr. Lead", "email": "lead@acme.test"},
                            (), actor="test", now=NOW, if_match=None)
        await uow.commit()


async def test_an_escalation_with_nobody_to_receive_it_is_held_not_failed(api):
    rt, client, headers = api
    await deliver(rt, escalated())
    [message] = await all_messages(rt)
    assert message.status == "pending" and message.next_attempt_at is None
    assert message.provider_id is None and message.recipient is None
    assert message.last_error.startswith("no recipient yet")
    assert message.ack_due_at is None  # the acknowledgement clock has not started
    assert await failed_events(rt) == []
    listed = (await client.get("/v1/practices/acme/notifications?status=pending",
                               headers=headers)).json()
    assert [(m["id"], m["waiting_for_recipient"]) for m in listed] == [(message.id, True)]
    assert "no recipient yet" in listed[0]["last_error"]
    failed = (await client.get("/v1/practices/acme/notifications?status=failed",
                               headers=headers)).json()
    assert failed == []
    # Held is for nobody configured: a supervisor named but unknown is a directory error, and
    # fails at once as before.
    await deliver(rt, escalated("Practitioner/ghost", key="acme:tr-2:escalated:2026-06-01:5"))
    ghost = (await client.get("/v1/practices/acme/notifications?status=failed",
                              headers=headers)).json()
    assert [m["provider"] for m in ghost] == ["ghost"]
    assert "not in the directory" in ghost[0]["last_error"]
    assert not ghost[0]["waiting_for_recipient"]


async def test_setting_the_practices_supervisor_sends_the_held_escalation_once(api):
    rt, client, headers = api
    await deliver(rt, escalated())
    await add_lead(rt)
    r = await client.put("/v1/practices/acme/contacts", headers=headers,
                         json={"supervisor": "lead", "summary_recipients": []})
    assert r.status_code == 200, r.text
    [message] = await all_messages(rt)
    assert message.status == "pending" and message.next_attempt_at is not None
    assert (message.provider_id, message.recipient) == ("lead", "lead@acme.test")
    assert message.subject == "[Escalation] Care-plan review for Patient/p1 is 180 days overdue"
    assert message.text_body.startswith("Dear Dr. Lead,") and message.last_error is None
    assert message.ack_state == "pending" and message.ack_due_at is not None
    # the same step again (careplan re-published it): still the one message
    await deliver(rt, escalated())
    await client.put("/v1/practices/acme/contacts", headers=headers,
                     json={"supervisor": "lead", "summary_recipients": []})
    assert [m.id for m in await all_messages(rt)] == [message.id]
    assert await failed_events(rt) == []


async def test_a_re_announced_escalation_naming_a_supervisor_sends_the_held_one(acme):
    """careplan announces an escalation again when its rules get a supervisor (same step key,
    new event id): the held message goes to that supervisor; a sent one is not sent again."""
    await deliver(acme, escalated())
    await add_lead(acme)
    await deliver(acme, escalated("Practitioner/lead", days=181))  # announced the next day
    [message] = await all_messages(acme)
    assert message.provider_id == "lead" and message.next_attempt_at is not None
    assert message.subject == "[Escalation] Care-plan review for Patient/p1 is 181 days overdue"
    await deliver(acme, escalated("Practitioner/doc-1"))  # another supervisor later: no change
    [again] = await all_messages(acme)
    assert (again.provider_id, again.next_attempt_at) == ("lead", message.next_attempt_at)


async def test_a_provider_given_a_supervisor_releases_their_held_escalations(api):
    rt, client, headers = api
    await deliver(rt, escalated())
    await add_lead(rt)
    r = await client.put("/v1/practices/acme/providers/doc-1", headers=headers,
                         json={"supervisor": "lead"})
    assert r.status_code == 200, r.text
    [message] = await all_messages(rt)
    assert message.provider_id == "lead" and message.recipient == "lead@acme.test"


async def test_the_periodic_sweep_releases_what_a_direct_change_did_not(acme):
    await deliver(acme, escalated())
    await add_lead(acme)
    async with acme.db.unit_of_work() as uow:  # contacts written without the API
        await upsert(uow.session, practice_contacts, {"practice": "acme"},
                     {"supervisor": "lead", "on_call": None, "summary_recipients": [],
                      "updated_at": NOW})
        await uow.commit()
    [held] = await all_messages(acme)
    assert held.next_attempt_at is None
    assert await sweep_and_release(acme, notifier_of(acme)) == 1
    [message] = await all_messages(acme)
    assert message.provider_id == "lead" and message.next_attempt_at is not None
    assert await sweep_and_release(acme, notifier_of(acme)) == 0


async def test_a_review_done_before_anyone_was_configured_withdraws_the_held_message(api):
    rt, client, headers = api
    await deliver(rt, escalated())
    await deliver(rt, escalated(kind="completed", key="acme:tr-1:completed:2026-06-01:0"))
    [message] = await all_messages(rt)
    assert message.status == "failed" and "review was recorded" in message.last_error
    [failed] = await failed_events(rt)
    assert failed["message"] == message.id and failed["idempotencyKey"] == f"acme:careplan:{KEY}"
    await add_lead(rt)
    await client.put("/v1/practices/acme/contacts", headers=headers,
                     json={"supervisor": "lead", "summary_recipients": []})
    [still] = await all_messages(rt)
    assert still.status == "failed" and still.provider_id is None  # never sent


async def test_a_held_message_is_not_picked_up_by_the_dispatcher(acme):
    from ccm_notification.entrypoints.workers import dispatcher_of, http_client_of

    await deliver(acme, escalated())
    try:
        assert await dispatcher_of(acme).claim() == []
    finally:
        await http_client_of(acme).aclose()
    [message] = await all_messages(acme)
    assert message.status == "pending" and message.attempts == 0


async def test_a_role_named_as_supervisor_releases_the_escalation_once_the_ehr_sends_it(acme):
    """careplan's rules may name a PractitionerRole the directory does not know yet: the
    escalation waits for the role (from the EHR) to say who the supervisor is."""
    from tests.unit.notification.test_exactly_once import role_event

    await add_lead(acme)
    await deliver(acme, escalated("PractitionerRole/r-sup"))
    [held] = await all_messages(acme)
    assert held.next_attempt_at is None and held.provider_id is None
    await deliver(acme, role_event("r-other", "doc-1", None), "notification-directory")
    [still] = await all_messages(acme)
    assert still.next_attempt_at is None  # a role no held message names changes nothing
    await deliver(acme, role_event("r-sup", "lead", None), "notification-directory")
    [message] = await all_messages(acme)
    assert (message.provider_id, message.recipient) == ("lead", "lead@acme.test")
    assert message.next_attempt_at is not None
