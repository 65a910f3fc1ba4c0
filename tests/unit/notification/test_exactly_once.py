"""Consumed events become messages exactly once (embedded SQLite, in-process bus)."""

import json
import uuid

import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import messages, outbox, practice_contacts
from ccm_notification.adapters.sql import upsert
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.events import CloudEvent, to_message
from tests.unit.notification.conftest import NOW


@pytest_asyncio.fixture
async def runtime(acme):
    return acme


def overdue(responsible: str, step: int = 1) -> CloudEvent:
    return CloudEvent(
        source="/ccm/careplan",
        type="careplan.review.overdue.v1",
        tenant="acme",
        subject="Patient/p1",
        data={
            "tracker": "tr-1",
            "carePlan": "CarePlan/cp1",
            "patient": "Patient/p1",
            "dueDate": "2026-11-01",
            "daysOverdue": 5,
            "responsibleProvider": f"Practitioner/{responsible}",
            "supervisor": None,
            "step": step,
            "idempotencyKey": f"acme:tr-1:overdue:2026-11-01:{step}",
        },
    )


async def rows(rt, table, *where):  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        return (await uow.session.execute(select(table).where(*where))).all()


async def test_a_redelivered_or_republished_event_records_one_message(runtime):
    alerts = next(c for c in runtime.consumers if c.name == "notification-alerts")
    event = overdue("doc-1")
    await alerts.process(to_message(event.type, event))
    await alerts.process(to_message(event.type, event))  # redelivery: the inbox drops it
    republished = event.model_copy(update={"id": str(uuid.uuid4())})
    await alerts.process(to_message(event.type, republished))  # same intent, new event id
    found = await rows(runtime, messages, messages.c.practice == "acme")
    assert len(found) == 1
    assert found[0].status == "pending" and found[0].recipient == "one@acme.test"
    assert found[0].subject == "Care-plan review overdue by 5 days for Patient/p1"
    assert alerts.stats.applied == 2 and alerts.stats.duplicates == 1


async def test_an_event_for_an_unknown_provider_is_a_failed_message_not_a_silent_drop(runtime):
    alerts = next(c for c in runtime.consumers if c.name == "notification-alerts")
    event = overdue("nobody")
    await alerts.process(to_message(event.type, event))
    [message] = await rows(runtime, messages, messages.c.practice == "acme")
    assert message.status == "failed" and "not in the directory" in message.last_error
    [failed] = await rows(runtime, outbox, outbox.c.event_type == "notification.message.failed.v1")
    data = json.loads(failed.payload)["data"]
    assert data["message"] == message.id and data["provider"] == "Practitioner/nobody"
    assert alerts.stats.dead_lettered == 0


def role_event(role: str, practitioner: str, email: str | None) -> CloudEvent:
    return CloudEvent(
        source="/ccm/ingest", type="ingest.practitioner-role.upserted.v1", tenant="acme",
        subject=f"PractitionerRole/{role}",
        data={"source": {"resourceType": "PractitionerRole", "id": role, "versionId": "1",
                         "lastUpdated": "2026-11-01T00:00:00+00:00", "sha256": "0" * 64,
                         "receivedAt": "2026-11-01T00:00:00+00:00"},
              "practitionerRole": f"PractitionerRole/{role}",
              "practitioner": f"Practitioner/{practitioner}", "organization": "Organization/o1",
              "active": True, "codes": [], "specialties": [], "classification": "unknown",
              "telecom": [{"system": "email", "value": email}] if email else [],
              "deleted": False})


async def test_a_role_supplies_organization_and_an_email_and_routes_role_references(runtime):
    directory = next(c for c in runtime.consumers if c.name == "notification-directory")
    alerts = next(c for c in runtime.consumers if c.name == "notification-alerts")
    org = CloudEvent(source="/ccm/ingest", type="ingest.organization.upserted.v1", tenant="acme",
                     subject="Organization/o1",
                     data={"source": role_event("r0", "x", None).data["source"],
                           "organization": "Organization/o1", "active": True,
                           "name": "Acme Cardiology", "npi": None, "telecom": [],
                           "partOf": None, "deleted": False})
    for event in (org, role_event("r1", "doc-2", "two@acme.test")):
        await directory.process(to_message(event.type, event))
    event = overdue("doc-2").model_copy(update={"data": {
        **overdue("doc-2").data, "responsibleProvider": "PractitionerRole/r1"}})
    await alerts.process(to_message(event.type, event))
    [message] = await rows(runtime, messages, messages.c.practice == "acme")
    assert message.provider_id == "doc-2" and message.recipient == "two@acme.test"
    assert directory.stats.dead_lettered == 0


async def lead_is_the_practice_contact(rt) -> None:  # noqa: ANN001
    """Dr. Lead (lead@acme.test) is acme's clinical supervisor, and it has no summary list."""
    async with rt.db.unit_of_work() as uow:
        await edit_provider(uow, "acme", "lead", {"name": "Dr. Lead", "email": "lead@acme.test"},
                            (), actor="test", now=NOW, if_match=None)
        await upsert(uow.session, practice_contacts, {"practice": "acme"},
                     {"supervisor": "lead", "on_call": None, "summary_recipients": [],
                      "updated_at": NOW})
        await uow.commit()


async def test_billing_events_reach_the_billing_practitioner_or_the_practice_contacts(runtime):
    alerts = next(c for c in runtime.consumers if c.name == "notification-alerts")
    await lead_is_the_practice_contact(runtime)
    at_risk = CloudEvent(source="/ccm/billing", type="billing.threshold.at-risk.v1",
                         tenant="acme", subject="Patient/p1", data={
        "patient": "Patient/p1", "month": "2026-11", "seconds": {"staff": 900, "practitioner": 0},
        "nextCode": "99490", "minutesToNext": 5, "daysLeft": 3,
        "billingPractitioner": "Practitioner/doc-1", "idempotencyKey": "acme:p1:2026-11:99490"})
    invoice = CloudEvent(source="/ccm/billing", type="billing.invoice.issued.v1", tenant="acme",
                         data={"invoiceId": "inv-1", "month": "2026-11", "revision": 0,
                               "status": "issued", "totalNet": "100.00",
                               "totalGross": "120.00", "invoice": {}})
    for event in (at_risk, invoice):
        await alerts.process(to_message(event.type, event))
    found = {r.kind: r for r in await rows(runtime, messages, messages.c.practice == "acme")}
    assert found["threshold-at-risk"].recipient == "one@acme.test"
    assert (found["threshold-at-risk"].subject
            == "Patient/p1 needs 5 more minutes for 99490 (2026-11)")
    assert found["invoice-issued"].recipient == "lead@acme.test"
    assert "$100.00 net, $120.00 gross" in found["invoice-issued"].text_body


async def test_a_completed_review_closes_its_pending_escalation(runtime):
    alerts = next(c for c in runtime.consumers if c.name == "notification-alerts")
    escalated = overdue("doc-1").model_copy(update={
        "type": "careplan.review.escalated.v1",
        "data": {**overdue("doc-1").data, "supervisor": "Practitioner/doc-1",
                 "idempotencyKey": "acme:tr-1:escalated:2026-11-01:1"}})
    await alerts.process(to_message(escalated.type, escalated))
    [alert] = await rows(runtime, messages, messages.c.practice == "acme")
    assert alert.ack_state == "pending"
    resolved = escalated.model_copy(update={"id": str(uuid.uuid4()),
                                            "type": "careplan.review.resolved.v1"})
    await alerts.process(to_message(resolved.type, resolved))
    [alert] = await rows(runtime, messages, messages.c.practice == "acme")
    assert alert.ack_state == "closed"


async def test_an_expiring_consent_reaches_the_practice_contacts_once(runtime):
    """ingest.consent.expiring.v1 (one per consent and end day) → one consent-expiring message
    per practice contact, however often it is delivered or re-sent."""
    alerts = next(c for c in runtime.consumers if c.name == "notification-alerts")
    await lead_is_the_practice_contact(runtime)
    source = {"resourceType": "Consent", "id": "cs1", "versionId": "2",
              "lastUpdated": "2026-11-01T00:00:00+00:00", "sha256": "0" * 64,
              "receivedAt": "2026-11-01T00:00:00+00:00", "connection": "ehr"}
    event = CloudEvent(source="/ccm/ingest/consent-expiry", type="ingest.consent.expiring.v1",
                       tenant="acme", subject="Patient/p1", data={
        "source": source, "consent": "Consent/cs1", "patient": "Patient/p1",
        "expiresOn": "2026-12-01", "daysLeft": 12, "leadDays": 30})
    await alerts.process(to_message(event.type, event))
    await alerts.process(to_message(event.type, event.model_copy(update={
        "id": str(uuid.uuid4())})))  # re-sent: the same notice
    [message] = await rows(runtime, messages, messages.c.practice == "acme")
    assert message.kind == "consent-expiring" and message.recipient == "lead@acme.test"
    assert message.subject == "CCM consent of Patient/p1 expires on 2026-12-01"
    assert "until 2026-12-01 (12 days after this notice was prepared)" in message.text_body
    assert message.patient == "Patient/p1"  # the Communication's subject, the webhook's patient
    assert alerts.stats.dead_lettered == 0
