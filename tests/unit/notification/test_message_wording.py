"""What the default templates say: a replacement invoice tells the practice what it replaces,
what was already paid and what is owed either way; a reminder sent while a review is overdue
says it is overdue (embedded SQLite, in-process bus)."""

import uuid

import pytest
from sqlalchemy import select

from ccm_notification.adapters.orm import messages, practice_contacts
from ccm_notification.adapters.sql import upsert
from ccm_notification.domain.kinds import KINDS
from ccm_notification.service_layer.handlers import invoice_values
from ccm_shared.events import CloudEvent, to_message
from tests.unit.notification.conftest import NOW

INVOICE = "billing.invoice.issued.v1"


def issued(invoice_id: str, *, revision: int, total: str, replaces: str | None = None,
           paid: str | None = None, balance: str | None = None) -> CloudEvent:
    data = {"invoiceId": invoice_id, "month": "2026-10", "revision": revision,
            "status": "issued", "totalNet": total, "totalGross": total, "invoice": {},
            "replaces": replaces, "replacedBy": None, "reason": None}
    if paid is not None:
        data |= {"paid": paid, "balance": balance}
    return CloudEvent(source="/ccm/billing", type=INVOICE, tenant="acme",
                      subject=f"Invoice/{invoice_id}", data=data)


async def _messages(rt) -> list:  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        return (await uow.session.execute(
            select(messages).where(messages.c.practice == "acme")
            .order_by(messages.c.created_at))).all()


async def _deliver(rt, event: CloudEvent) -> None:  # noqa: ANN001
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    await alerts.process(to_message(event.type, event))
    assert alerts.stats.dead_lettered == 0


@pytest.fixture
async def acme_contact(acme):
    """acme with doc-1 (one@acme.test) as its summary recipient."""
    async with acme.db.unit_of_work() as uow:
        await upsert(uow.session, practice_contacts, {"practice": "acme"},
                     {"supervisor": None, "on_call": None, "summary_recipients": ["doc-1"],
                      "updated_at": NOW})
        await uow.commit()
    return acme


async def test_a_replacement_that_leaves_the_practice_overpaid_says_it_is_owed_back(acme_contact):
    """The walkthrough's correction: $1890 paid on inv-old, the replacement totals $1806."""
    await _deliver(acme_contact, issued("inv-new", revision=5, total="1806.00",
                                        replaces="inv-old", paid="1890.00", balance="-84.00"))
    [message] = await _messages(acme_contact)
    assert message.subject == "Invoice inv-new for 2026-10 issued (replaces inv-old)"
    text = message.text_body
    assert "$1806.00 net, $1806.00 gross" in text  # what it said before, still said
    assert "It replaces invoice inv-old, which is cancelled: do not pay invoice inv-old." in text
    assert "Already paid: $1890.00" in text
    assert "Nothing is due: $84.00 was paid beyond this invoice's total and is owed back" in text
    assert "Balance due" not in text
    assert "owed back" in message.html_body and "inv-old" in message.html_body


async def test_a_replacement_partly_paid_says_what_is_still_due(acme_contact):
    await _deliver(acme_contact, issued("inv-r1", revision=1, total="1848.00",
                                        replaces="inv-r0", paid="1000.00", balance="848.00"))
    [message] = await _messages(acme_contact)
    assert "Already paid: $1000.00" in message.text_body
    assert "Balance due: $848.00." in message.text_body
    assert "owed back" not in message.text_body


async def test_a_first_invoice_says_what_is_due_and_nothing_of_a_replacement(acme_contact):
    await _deliver(acme_contact, issued("inv-0", revision=0, total="839.80", paid="0.00",
                                        balance="839.80"))
    [message] = await _messages(acme_contact)
    assert message.subject == "Invoice inv-0 for 2026-10 issued"
    assert "replaces" not in message.text_body and "Already paid" not in message.text_body
    assert "Balance due: $839.80." in message.text_body


@pytest.mark.parametrize("replaces", [None, "inv-r0"])
async def test_a_refund_owed_back_is_said_so_not_as_a_negative_amount_paid(acme_contact, replaces):
    """Billing's ``paid`` is negative after a payment was voided once its overpayment had been
    refunded: the practice owes the refund back. It said "Already paid: $-33.33"."""
    await _deliver(acme_contact, issued("inv-r1", revision=1, total="124.50", replaces=replaces,
                                        paid="-33.33", balance="157.83"))
    [message] = await _messages(acme_contact)
    for body in (message.text_body, message.html_body):
        assert "$-" not in body and "Already paid" not in body
        assert "Refund owed back: $33.33 was refunded to Acme Clinic for an overpayment" in body
        assert "the refund is owed back, and is part of the balance below" in body
    assert "Balance due: $157.83." in message.text_body
    assert ("of the invoice it replaces" in message.text_body) == (replaces is not None)


@pytest.mark.parametrize("paid, owed", [("-33.33", "33.33"), ("-0.01", "0.01"), ("0.00", None),
                                        ("12.00", None), (None, None), ("x", None)])
def test_the_refund_owed_back_is_minus_a_negative_paid(paid, owed):
    data = issued("i", revision=1, total="10.00", paid=paid or "0.00", balance="1.00").data
    assert invoice_values({**data, "paid": paid})["refund_owed"] == owed


def test_invoice_values_keep_every_earlier_field_and_split_the_balance_by_sign():
    data = issued("i", revision=2, total="10.00", replaces="h", paid="12.50",
                  balance="-2.50").data
    values = invoice_values(data)
    assert {k: values[k] for k in ("invoice_id", "month", "revision", "total_net",
                                   "total_gross")} == {
        "invoice_id": "i", "month": "2026-10", "revision": 2, "total_net": "10.00",
        "total_gross": "10.00"}
    assert (values["owed_back"], values["amount_due"]) == ("2.50", None)
    assert invoice_values({**data, "balance": "7.25"})["amount_due"] == "7.25"
    assert invoice_values({**data, "balance": "0.00"})["amount_due"] is None
    before = {k: v for k, v in data.items() if k not in ("paid", "balance")}
    assert invoice_values(before)["owed_back"] is None  # an event without paid/balance


async def test_a_practice_template_written_for_the_old_fields_still_renders(api):
    """Overrides written before the new fields keep rendering, and may now use them."""
    rt, client, headers = api
    old = ("{% block subject %}Inv {{ invoice_id }}{% endblock %}"
           "{% block text %}{{ total_net }} for {{ month }} (r{{ revision }}, "
           "{{ total_gross }}){% endblock %}{% block html %}{{ invoice_id }}{% endblock %}")
    new = old.replace("{% endblock %}{% block html %}",
                      "{% if owed_back %} back {{ owed_back }}{% endif %}"
                      "{% endblock %}{% block html %}", 1)
    async with rt.db.unit_of_work() as uow:
        await upsert(uow.session, practice_contacts, {"practice": "acme"},
                     {"supervisor": None, "on_call": None, "summary_recipients": ["doc-1"],
                      "updated_at": NOW})
        await uow.commit()
    for n, source in enumerate((old, new)):
        r = await client.put("/v1/practices/acme/templates/invoice-issued", headers=headers,
                             json={"source": source})
        assert r.status_code in (200, 201), r.text
        await _deliver(rt, issued(f"inv-{n}", revision=3, total="5.00", replaces="inv-w",
                                  paid="9.00", balance="-4.00"))
    first, second = await _messages(rt)
    assert first.status == "pending" and first.text_body.strip() == "5.00 for 2026-10 (r3, 5.00)"
    assert second.text_body.strip() == "5.00 for 2026-10 (r3, 5.00) back 4.00"


def test_the_new_fields_are_optional_and_the_defaults_pass_the_override_checks():
    from ccm_notification.adapters.rendering import Renderer, default_source

    kind = KINDS["invoice-issued"]
    assert set(kind.required) == {"invoice_id", "month", "revision", "total_net", "total_gross"}
    assert {"replaces", "paid", "balance", "amount_due", "owed_back"} <= set(kind.optional)
    assert "days_overdue" in KINDS["review-due"].optional
    for name in ("invoice-issued", "review-due"):  # raises TemplateInvalid if not
        Renderer().validate(KINDS[name], default_source(name))


def reminder(days_overdue: int, step: int) -> CloudEvent:
    key = f"acme:tr-9:reminder:2026-06-01:{step}"
    return CloudEvent(
        source="/ccm/careplan", type="careplan.review.reminder.v1", tenant="acme",
        subject="Patient/p9", id=str(uuid.uuid4()),
        data={"tracker": "tr-9", "carePlan": "CarePlan/cp9", "patient": "Patient/p9",
              "dueDate": "2026-06-01", "daysOverdue": days_overdue,
              "responsibleProvider": "Practitioner/doc-1", "supervisor": None, "step": step,
              "idempotencyKey": key})


async def test_a_reminder_says_due_before_the_due_date_and_overdue_after_it(acme):
    """The walkthrough's reminder number 28, 180 days late, read "is due for review on …"."""
    await _deliver(acme, reminder(0, 2))
    await _deliver(acme, reminder(180, 28))
    await _deliver(acme, reminder(1, 29))
    before, late, one_day = await _messages(acme)
    assert before.subject == "Care-plan review due 2026-06-01 for Patient/p9"
    assert "is due for review on 2026-06-01." in before.text_body
    assert "overdue" not in before.text_body
    assert late.subject == "Care-plan review overdue by 180 days for Patient/p9"
    assert "was due for review on 2026-06-01 and is 180 days overdue" in late.text_body
    assert "is due for review on" not in late.text_body
    assert "180 days overdue" in late.html_body
    assert one_day.subject == "Care-plan review overdue by 1 day for Patient/p9"
