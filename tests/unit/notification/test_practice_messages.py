"""Practice-level messages (invoice issued or cancelled, utilization summary, consent expiring)
go to the practice's contacts. Before it has any, they are held, not failed: listed with their
reason, sent once to every contact as soon as one is configured, withdrawn when what they
announce is no longer so. A correction that leaves nothing to bill tells the practice what was
cancelled and what is owed back (embedded SQLite, in-process bus)."""

import json
import uuid
from datetime import date
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from ccm_notification.adapters.orm import messages, outbox, practice_contacts
from ccm_notification.adapters.rendering import Renderer, default_source
from ccm_notification.adapters.sql import upsert
from ccm_notification.domain import practice_messages as pm
from ccm_notification.domain.kinds import KINDS
from ccm_notification.entrypoints.workers import notifier_of, sweep_and_release
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.events import CloudEvent, to_message
from tests.unit.notification.conftest import NOW

NEW_YORK = ZoneInfo("America/New_York")


# -- events ------------------------------------------------------------------------------------


def issued(invoice_id: str = "inv-1", *, revision: int = 0, total: str = "839.80",
           replaces: str | None = None, paid: str = "0.00",
           balance: str | None = None) -> CloudEvent:
    return CloudEvent(
        source="/ccm/billing", type="billing.invoice.issued.v1", tenant="acme",
        subject=f"Invoice/{invoice_id}", id=str(uuid.uuid4()),
        data={"invoiceId": invoice_id, "month": "2026-10", "revision": revision,
              "status": "issued", "totalNet": total, "totalGross": total, "invoice": {},
              "replaces": replaces, "replacedBy": None, "reason": None, "paid": paid,
              "balance": balance if balance is not None else total})


def cancelled(invoice_id: str = "inv-1", *, replaced_by: str | None = None, paid: str = "0.00",
              balance: str = "0.00", total: str = "839.80", omit_replaced_by: bool = False,
              reason: str = "corrected: Encounter/e1 entered-in-error") -> CloudEvent:
    data = {"invoiceId": invoice_id, "month": "2026-10", "revision": 0, "status": "cancelled",
            "totalNet": total, "totalGross": total, "invoice": {}, "replaces": None,
            "replacedBy": replaced_by, "reason": reason, "paid": paid, "balance": balance}
    if omit_replaced_by:
        del data["replacedBy"]
    return CloudEvent(source="/ccm/billing", type="billing.invoice.cancelled.v1", tenant="acme",
                      subject=f"Invoice/{invoice_id}", id=str(uuid.uuid4()), data=data)


def expiring(consent: str = "Consent/cs1", expires_on: str = "2026-12-01",
             patient: str = "Patient/p1") -> CloudEvent:
    source = {"resourceType": "Consent", "id": consent.split("/")[1], "versionId": "2",
              "lastUpdated": "2026-11-01T00:00:00+00:00", "sha256": "0" * 64,
              "receivedAt": "2026-11-01T00:00:00+00:00", "connection": "ehr"}
    return CloudEvent(source="/ccm/ingest/consent-expiry", type="ingest.consent.expiring.v1",
                      tenant="acme", subject=patient, id=str(uuid.uuid4()), data={
        "source": source, "consent": consent, "patient": patient, "expiresOn": expires_on,
        "daysLeft": 4, "leadDays": 30})


def consent(kind: str, consent_ref: str = "Consent/cs1", *, end: str | None = "2026-12-01",
            provision: str = "permit", patient: str = "Patient/p1") -> CloudEvent:
    status = {"granted": "active", "revoked": "inactive", "declined": "rejected",
              "voided": "entered-in-error"}[kind]
    source = expiring(consent_ref).data["source"]
    return CloudEvent(
        source="/ccm/ingest", type=f"ingest.consent.{kind}.v1", tenant="acme", subject=patient,
        id=str(uuid.uuid4()),
        data={"source": source, "consent": consent_ref, "patient": patient, "status": status,
              "obtainedAt": "2025-12-01T10:00:00+00:00", "method": "written",
              "period": {"start": "2025-12-01", "end": end}, "provision": provision,
              "practitioners": [], "categories": [], "effectiveUntil": None})


def closed() -> CloudEvent:
    return CloudEvent(
        source="/ccm/billing", type="billing.period.closed.v1", tenant="acme",
        subject="Organization/acme", id=str(uuid.uuid4()),
        data={"month": "2026-10", "invoiceId": "inv-1", "patientsEnrolled": 3,
              "patientsBillable": 2, "patientsBlocked": 1,
              "minutes": {"staff": 60, "practitioner": 30}, "codes": {"99490": 2},
              "blockers": {"no-consent": 1}, "totalNet": "839.80", "practiceSequence": 2})


# -- helpers -----------------------------------------------------------------------------------


async def deliver(rt, event: CloudEvent) -> None:  # noqa: ANN001
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    await alerts.process(to_message(event.type, event))
    assert alerts.stats.dead_lettered == 0


async def all_messages(rt) -> list:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        return (await uow.session.execute(
            select(messages).order_by(messages.c.created_at, messages.c.idempotency_key))).all()


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


async def set_contacts(rt, supervisor: str | None, recipients: list[str]) -> None:  # noqa: ANN001
    """Contacts written without the API (no release): the sweep's case."""
    async with rt.db.unit_of_work() as uow:
        await upsert(uow.session, practice_contacts, {"practice": "acme"},
                     {"supervisor": supervisor, "on_call": None,
                      "summary_recipients": recipients, "updated_at": NOW})
        await uow.commit()


def held(row) -> bool:  # noqa: ANN001
    return row.status == "pending" and row.next_attempt_at is None


# -- a practice without contacts: held, then sent once -----------------------------------------


@pytest.mark.parametrize("event", [issued(), closed(), expiring()],
                         ids=["invoice-issued", "utilization-summary", "consent-expiring"])
async def test_a_practice_message_before_any_contact_is_held_not_failed(api, event):
    rt, client, headers = api
    await deliver(rt, event)
    [message] = await all_messages(rt)
    assert held(message) and message.provider_id is None and message.recipient is None
    assert "no summary recipients or clinical supervisor" in message.last_error
    assert await failed_events(rt) == []
    listed = (await client.get("/v1/practices/acme/notifications?status=pending",
                               headers=headers)).json()
    assert [(m["id"], m["waiting_for_recipient"]) for m in listed] == [(message.id, True)]
    assert (await client.get("/v1/practices/acme/notifications?status=failed",
                             headers=headers)).json() == []


async def test_configuring_contacts_sends_the_held_invoice_once_to_each(api):
    rt, client, headers = api
    await deliver(rt, issued())
    [first] = await all_messages(rt)
    await add_lead(rt)
    for _ in range(2):  # saved twice: nothing more
        r = await client.put("/v1/practices/acme/contacts", headers=headers,
                             json={"supervisor": None, "summary_recipients": ["doc-1", "lead"]})
        assert r.status_code == 200, r.text
    await deliver(rt, issued())  # billing re-published it (new event id): nothing more
    assert await sweep_and_release(rt, notifier_of(rt)) == 0
    rows = await all_messages(rt)
    assert sorted((r.provider_id, r.recipient, r.status, r.next_attempt_at is not None)
                  for r in rows) == [("doc-1", "one@acme.test", "pending", True),
                                     ("lead", "lead@acme.test", "pending", True)]
    again = next(r for r in rows if r.id == first.id)  # the held row itself went out
    assert again.provider_id == "doc-1" and again.last_error is None
    assert again.subject == "Invoice inv-1 for 2026-10 issued"
    assert again.text_body.startswith("Dear Dr. One,")
    assert "Balance due: $839.80." in again.text_body
    assert {r.idempotency_key for r in rows} == {"acme:invoice:inv-1:0:no-recipient",
                                                  "acme:invoice:inv-1:0:lead"}
    assert await failed_events(rt) == []


async def test_a_supervisor_alone_receives_it_and_the_sweep_catches_a_direct_write(acme):
    await deliver(acme, closed())
    await add_lead(acme)
    await set_contacts(acme, "lead", [])
    [still] = await all_messages(acme)
    assert held(still)
    assert await sweep_and_release(acme, notifier_of(acme)) == 1
    [message] = await all_messages(acme)
    assert (message.provider_id, message.recipient) == ("lead", "lead@acme.test")
    assert message.subject == "CCM utilization summary 2026-10 for Acme Clinic"
    assert not held(message)
    assert await sweep_and_release(acme, notifier_of(acme)) == 0


async def test_a_contact_without_an_address_fails_the_released_message_with_its_reason(api):
    rt, client, headers = api
    await deliver(rt, issued())
    r = await client.put("/v1/practices/acme/contacts", headers=headers,
                         json={"supervisor": "ghost", "summary_recipients": []})
    assert r.status_code == 200
    [message] = await all_messages(rt)
    assert message.status == "failed" and "not in the directory" in message.last_error
    assert [f["provider"] for f in await failed_events(rt)] == ["Practitioner/ghost"]


async def test_an_intent_already_sent_is_not_held_again_when_the_contacts_are_gone(acme):
    await set_contacts(acme, None, ["doc-1"])
    await deliver(acme, issued())
    await set_contacts(acme, None, [])
    await deliver(acme, issued())  # re-published after the contacts were removed
    [message] = await all_messages(acme)
    assert message.provider_id == "doc-1" and not held(message)


# -- obsolete while held: withdrawn ------------------------------------------------------------


@pytest.mark.parametrize(("event", "why"), [
    (cancelled(replaced_by="inv-1-r1"), " (replaced by invoice inv-1-r1)"),
    (cancelled(), " (a correction left nothing to bill)"),
    (cancelled(omit_replaced_by=True), ""),
], ids=["replaced", "nothing-to-bill", "cannot-tell"])
async def test_a_held_invoice_cancelled_meanwhile_is_withdrawn_not_sent(api, event, why):
    rt, client, headers = api
    await deliver(rt, issued())
    await deliver(rt, event)
    rows = await all_messages(rt)
    announced = next(r for r in rows if r.kind == "invoice-issued")
    assert announced.status == "failed"
    assert announced.last_error == (f"not sent: invoice inv-1 was cancelled{why} before "
                                    "anyone was configured to receive this message")
    assert [f["message"] for f in await failed_events(rt)] == [announced.id]
    await client.put("/v1/practices/acme/contacts", headers=headers,
                     json={"supervisor": "doc-1", "summary_recipients": []})
    rows = await all_messages(rt)
    assert next(r for r in rows if r.id == announced.id).provider_id is None  # never sent
    # replaced: the replacement's own message says so; nothing replacing it: the practice is
    # told of the cancellation (held with the rest, sent now)
    assert [(r.kind, r.provider_id) for r in rows if r.kind == "invoice-cancelled"] == (
        [("invoice-cancelled", "doc-1")] if why.endswith("nothing to bill)") else [])


async def test_a_held_invoice_of_another_invoice_stays_held(acme):
    await deliver(acme, issued("inv-1"))
    await deliver(acme, cancelled("inv-2", replaced_by="inv-2-r1"))
    [message] = await all_messages(acme)
    assert held(message)


@pytest.mark.parametrize(("event", "withdrawn"), [
    (consent("revoked"), "the consent was revoked"),
    (consent("declined"), "the consent was declined"),
    (consent("voided"), "the consent was voided"),
    (consent("granted", end="2027-12-01"), "covering days after this one"),  # extended
    (consent("granted", "Consent/cs2", end=None), "covering days after this one"),  # a new one
    (consent("granted", "Consent/cs2", end="2027-06"), "covering days after this one"),
    (consent("granted", end="2026-12-01"), None),  # the same end again: not a renewal
    (consent("granted", "Consent/cs2", end="2027-12-01", provision="deny"), None),
    (consent("granted", "Consent/cs2", end="2027-12-01", patient="Patient/p2"), None),
    (consent("revoked", "Consent/cs2"), None),  # another consent ended
    # 2026-12-02 01:00 UTC is still 2026-12-01 in New York: the same last day
    (consent("granted", end="2026-12-02T01:00:00Z"), None),
    (consent("granted", end="2026-12-02T06:00:00Z"), "covering days after this one"),
], ids=["revoked", "declined", "voided", "extended", "new-open-ended", "new-partial-end",
        "same-end", "deny", "other-patient", "other-consent-revoked", "same-day-in-new-york",
        "next-day-in-new-york"])
async def test_a_held_consent_notice_is_withdrawn_only_when_it_no_longer_holds(acme, event,
                                                                              withdrawn):
    await deliver(acme, expiring())
    await deliver(acme, event)
    [message] = await all_messages(acme)
    if withdrawn is None:
        assert held(message) and await failed_events(acme) == []
    else:
        assert message.status == "failed" and withdrawn in message.last_error
        assert [f["message"] for f in await failed_events(acme)] == [message.id]


async def test_a_sent_consent_notice_is_not_touched_by_a_revocation(acme):
    await set_contacts(acme, "doc-1", [])
    await deliver(acme, expiring())
    await deliver(acme, consent("revoked"))
    [message] = await all_messages(acme)
    assert message.status == "pending" and message.provider_id == "doc-1"
    assert await failed_events(acme) == []


# -- a correction that leaves nothing to bill ---------------------------------------------------


async def test_a_cancellation_with_nothing_in_its_place_tells_the_practice_what_is_owed(acme):
    await set_contacts(acme, None, ["doc-1"])
    await deliver(acme, cancelled(paid="839.80", balance="-839.80"))
    [message] = await all_messages(acme)
    assert message.kind == "invoice-cancelled" and message.recipient == "one@acme.test"
    assert message.subject == "Invoice inv-1 for 2026-10 cancelled: nothing to bill"
    text = message.text_body
    assert ("Invoice inv-1 for CCM services in 2026-10 ($839.80 net) is cancelled, and no "
            "invoice replaces it: a correction left nothing to bill for 2026-10. Do not pay "
            "invoice inv-1.") in text
    assert "Reason: corrected: Encounter/e1 entered-in-error" in text
    assert ("Already paid on it: $839.80. Nothing is due: $839.80 is owed back to Acme "
            "Clinic.") in text
    assert "owed back" in message.html_body
    await deliver(acme, cancelled(paid="839.80", balance="-839.80"))  # re-published
    assert len(await all_messages(acme)) == 1


async def test_a_cancellation_with_nothing_paid_says_nothing_is_due(acme):
    await set_contacts(acme, None, ["doc-1"])
    await deliver(acme, cancelled())
    [message] = await all_messages(acme)
    assert "Nothing was paid on it, and nothing is due." in message.text_body
    assert "owed back" not in message.text_body


@pytest.mark.parametrize("event", [cancelled(replaced_by="inv-1-r1"),
                                   cancelled(omit_replaced_by=True)],
                         ids=["replaced", "cannot-tell"])
async def test_a_replaced_cancellation_sends_nothing_of_its_own(acme, event):
    await set_contacts(acme, None, ["doc-1"])
    await deliver(acme, event)
    assert await all_messages(acme) == []


def test_the_cancellation_kind_and_its_default_template():
    kind = KINDS["invoice-cancelled"]
    assert set(kind.required) == {"invoice_id", "month", "revision", "total_net"}
    Renderer().validate(kind, default_source("invoice-cancelled"))  # raises if not


# -- the rules (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(("summary", "supervisor", "expected"), [
    (["a", "b"], "s", ["a", "b"]),
    ([], "s", ["s"]),
    (None, "s", ["s"]),
    (["a", "a", "b"], None, ["a", "b"]),
    ([], None, []),
    (None, None, []),
])
def test_practice_recipients(summary, supervisor, expected):
    assert pm.practice_recipients(summary, supervisor) == expected


@pytest.mark.parametrize(("end", "last_day"), [
    (None, None),
    ("", None),
    ("2026-12-01", date(2026, 12, 1)),
    ("2026", date(2026, 12, 31)),
    ("2026-02", date(2026, 2, 28)),
    ("2026-12-02T01:00:00Z", date(2026, 12, 1)),
    ("2026-12-02T05:00:00+00:00", date(2026, 12, 2)),
    ("2026-12-01T23:00:00", date(2026, 12, 1)),  # no offset: as written
])
def test_last_day_covered(end, last_day):
    assert pm.last_day_covered(end, NEW_YORK) == last_day


@pytest.mark.parametrize(("expires_on", "provision", "end", "renews"), [
    ("2026-12-01", "permit", "2026-12-02", True),
    ("2026-12-01", "permit", "2026-12-01", False),
    ("2026-12-01", "permit", "2026-11-30", False),
    ("2026-12-01", "permit", None, True),
    ("2026-12-01", "deny", None, False),
    ("2026-12-01", "permit", "not a date", False),
    ("", "permit", "2027-01-01", False),
])
def test_renews(expires_on, provision, end, renews):
    assert pm.renews(expires_on, provision, end, NEW_YORK) is renews


@given(st.decimals(min_value=-10**9, max_value=10**9, places=2, allow_nan=False))
def test_a_balance_is_either_due_or_owed_back_never_both(balance):
    due, back = pm.owed(f"{balance:.2f}")
    assert due is None or back is None
    if balance > 0:
        assert Decimal(due) == balance and back is None
    elif balance < 0:
        assert Decimal(back) == -balance and due is None
    else:
        assert (due, back) == (None, None)


@pytest.mark.parametrize(("data", "without"), [
    ({"replacedBy": None}, True),
    ({"replacedBy": "inv-r1"}, False),
    ({}, False),
])
def test_cancelled_without_replacement(data, without):
    assert pm.cancelled_without_replacement(data) is without


async def test_practices_whose_contacts_name_no_one_do_not_starve_the_sweep(acme, monkeypatch):
    """The sweep read the oldest held messages of every practice with a contacts row, a row
    naming no one included: once such practices held a batch's worth of the oldest, every pass
    read the same ones, released none, and no other practice's were ever released."""
    from ccm_notification.service_layer import handlers

    monkeypatch.setattr(handlers, "SWEEP_BATCH", 1)
    await deliver(acme, closed())  # acme's: the oldest held message
    await set_contacts(acme, None, [])  # a contacts row naming no one
    await deliver(acme, closed().model_copy(update={"tenant": "beta"}))
    async with acme.db.unit_of_work() as uow:
        await edit_provider(uow, "beta", "lead", {"name": "Dr. Lead", "email": "lead@beta.test"},
                            (), actor="test", now=NOW, if_match=None)
        await upsert(uow.session, practice_contacts, {"practice": "beta"},
                     {"supervisor": "lead", "on_call": None, "summary_recipients": [],
                      "updated_at": NOW})
        await uow.commit()
    assert await sweep_and_release(acme, notifier_of(acme)) == 1
    rows = {r.practice: r for r in await all_messages(acme)}
    assert held(rows["acme"]) and not held(rows["beta"])
    assert rows["beta"].recipient == "lead@beta.test"


def test_an_end_past_the_calendar_in_the_practices_zone_is_its_written_day():
    """An end of 9999-12-31T23:00-05:00 is in year 10000 in a zone east of it: astimezone
    raised OverflowError, which renews did not catch, and the consent event was retried, then
    dead-lettered. Read as ingest reads it: the day written."""
    from zoneinfo import ZoneInfo

    assert pm.last_day_covered("9999-12-31T23:00:00-05:00", ZoneInfo("Pacific/Kiritimati")) == (
        date(9999, 12, 31))
