"""Practice-level messages held for a contact, on real PostgreSQL: released by whichever of
several concurrent triggers comes first (the contacts saved twice at once, the periodic sweep,
the events re-published by billing), each sent once to each contact and never twice."""

import asyncio
import json
import uuid

import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import messages, outbox
from ccm_notification.bootstrap import SERVICE
from ccm_notification.entrypoints.workers import notifier_of, sweep_and_release
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.events import CloudEvent, to_message
from tests.support.infra import api_on_postgres

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    async with api_on_postgres(infra.database_url, SERVICE, "heldpr") as (rt, client, practice,
                                                                         headers):
        yield rt, client, practice, headers


def invoice_issued(practice: str) -> CloudEvent:
    return CloudEvent(
        source="/ccm/billing", type="billing.invoice.issued.v1", tenant=practice,
        subject="Invoice/inv-1", id=str(uuid.uuid4()),
        data={"invoiceId": f"{practice}-2026-10", "month": "2026-10", "revision": 0,
              "status": "issued", "totalNet": "839.80", "totalGross": "839.80", "invoice": {},
              "replaces": None, "replacedBy": None, "reason": None, "paid": "0.00",
              "balance": "839.80"})


def nothing_left_to_bill(practice: str) -> CloudEvent:
    return CloudEvent(
        source="/ccm/billing", type="billing.invoice.cancelled.v1", tenant=practice,
        subject="Invoice/inv-0", id=str(uuid.uuid4()),
        data={"invoiceId": f"{practice}-2026-09", "month": "2026-09", "revision": 0,
              "status": "cancelled", "totalNet": "120.00", "totalGross": "120.00",
              "invoice": {}, "replaces": None, "replacedBy": None,
              "reason": "corrected: time entry revised after close", "paid": "120.00",
              "balance": "-120.00"})


async def test_concurrent_releases_send_each_held_practice_message_once_to_each_contact(api):
    rt, client, practice, headers = api
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    now = rt.clock()
    async with rt.db.unit_of_work() as uow:
        for pid in ("a", "b"):
            await edit_provider(uow, practice, pid, {"name": pid, "email": f"{pid}@x.test"}, (),
                                actor="test", now=now, if_match=None)
        await uow.commit()
    events = [invoice_issued(practice), nothing_left_to_bill(practice)]
    for event in events:
        await alerts.process(to_message(event.type, event))
    async with rt.db.unit_of_work() as uow:
        held = (await uow.session.execute(select(messages).where(
            messages.c.practice == practice).order_by(messages.c.kind))).all()
    assert [(m.kind, m.status, m.next_attempt_at) for m in held] == [
        ("invoice-cancelled", "pending", None), ("invoice-issued", "pending", None)]

    contacts = {"supervisor": None, "summary_recipients": ["a", "b"]}
    republished = [e.model_copy(update={"id": str(uuid.uuid4())}) for e in events]
    answers = await asyncio.gather(
        client.put(f"/v1/practices/{practice}/contacts", headers=headers, json=contacts),
        client.put(f"/v1/practices/{practice}/contacts", headers=headers, json=contacts),
        sweep_and_release(rt, notifier_of(rt)),
        *(alerts.process(to_message(e.type, e)) for e in republished),
        sweep_and_release(rt, notifier_of(rt)),
    )
    assert [a.status_code for a in answers[:2]] == [200, 200], [a.text for a in answers[:2]]
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(messages).where(
            messages.c.practice == practice))).all()
        failed = (await uow.session.execute(select(outbox.c.payload).where(
            outbox.c.tenant == practice,
            outbox.c.event_type == "notification.message.failed.v1"))).scalars().all()
    assert sorted((r.kind, r.provider_id, r.recipient, r.status) for r in rows) == [
        ("invoice-cancelled", "a", "a@x.test", "pending"),
        ("invoice-cancelled", "b", "b@x.test", "pending"),
        ("invoice-issued", "a", "a@x.test", "pending"),
        ("invoice-issued", "b", "b@x.test", "pending"),
    ]
    assert all(r.next_attempt_at is not None for r in rows)
    assert {r.id for r in rows if r.provider_id == "a"} == {m.id for m in held}  # the held rows
    assert [json.loads(p) for p in failed] == []
    assert alerts.stats.dead_lettered == 0


async def test_a_role_event_releases_only_the_held_reviews_naming_it_on_postgres(api):
    """The role's held reviews are selected by the references in their stored fields (JSON,
    read by PostgreSQL): the one naming the role is released, the other stays held."""
    rt, _client, practice, _headers = api
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    directory = next(c for c in rt.consumers if c.name == "notification-directory")
    now = rt.clock()
    async with rt.db.unit_of_work() as uow:
        await edit_provider(uow, practice, "sup", {"name": "sup", "email": "sup@x.test"}, (),
                            actor="test", now=now, if_match=None)
        await uow.commit()
    for n, supervisor in ((1, "PractitionerRole/r-sup"), (2, "PractitionerRole/r-other")):
        event = CloudEvent(
            source="/ccm/careplan", type="careplan.review.escalated.v1", tenant=practice,
            subject="Patient/p1",
            data={"tracker": f"tr-{n}", "carePlan": "CarePlan/cp1", "patient": "Patient/p1",
                  "dueDate": "2026-06-01", "daysOverdue": 180,
                  "responsibleProvider": "Practitioner/nobody-yet", "supervisor": supervisor,
                  "step": 5, "idempotencyKey": f"{practice}:tr-{n}:escalated:2026-06-01:5"})
        await alerts.process(to_message(event.type, event))
    role = CloudEvent(
        source="/ccm/ingest", type="ingest.practitioner-role.upserted.v1", tenant=practice,
        subject="PractitionerRole/r-sup",
        data={"source": {"resourceType": "PractitionerRole", "id": "r-sup", "versionId": "1",
                         "lastUpdated": "2026-11-01T00:00:00+00:00", "sha256": "0" * 64,
                         "receivedAt": "2026-11-01T00:00:00+00:00"},
              "practitionerRole": "PractitionerRole/r-sup", "practitioner": "Practitioner/sup",
              "organization": "Organization/o1", "active": True, "codes": [],
              "specialties": [], "classification": "unknown", "telecom": [], "deleted": False})
    await directory.process(to_message(role.type, role))
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(messages).where(
            messages.c.practice == practice, messages.c.kind == "review-escalated"))).all()
    assert sorted((r.tracker, r.provider_id, r.next_attempt_at is not None) for r in rows) == [
        ("tr-1", "sup", True), ("tr-2", None, False)]
    assert directory.stats.dead_lettered == 0 and alerts.stats.dead_lettered == 0
