"""Month close, invoices and their ChargeItems, cancel-and-reissue, payments (recorded and
voided), refunds, overdue.

Handlers take the unit of work and never commit; the request or the consumed message does.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

from sqlalchemy import bindparam, func, insert, or_, select, update

from ccm_billing.adapters import fhir, filed, orm
from ccm_billing.domain.model import Decision, Month
from ccm_billing.domain.payments import (
    ZERO,
    balance_of,
    payment_state,
    refundable,
    reopened_overdue,
    takes_payment,
)
from ccm_billing.domain.rules import ruleset_for
from ccm_billing.domain.rules.ruleset import RulesetMissing
from ccm_billing.service_layer import corrections, decision_cache
from ccm_billing.service_layer.charges import (
    PricedLine,
    charge_item_stub,
    entered,
    entered_suffix,
)
from ccm_billing.service_layer.common import (
    SOURCE,
    PracticeInfo,
    bulk_insert,
    next_practice_sequence,
    practice_info,
)
from ccm_billing.service_layer.ehr import has_endpoint_clause, queue_delivery
from ccm_shared.db import UnitOfWork, xact_locks
from ccm_shared.errors import Conflict, InvalidInput, NotFound
from ccm_shared.events import CloudEvent
from ccm_shared.jsontext import compact
from ccm_shared.tables import practices

ISSUED = "billing.invoice.issued.v1"
PAID = "billing.invoice.paid.v1"
OVERDUE = "billing.invoice.overdue.v1"
CLOSED = "billing.period.closed.v1"
PAYMENT_RECORDED = "billing.payment.recorded.v1"
PAYMENT_VOIDED = "billing.payment.voided.v1"
PAYMENT_REFUNDED = "billing.payment.refunded.v1"


@dataclass(frozen=True)
class DecisionGroup:
    """Decisions alike in codes, blockers and billability, summed: what a summary counts."""

    codes: dict[str, int]
    blockers: tuple[str, ...]
    billable: bool
    patients: int
    staff_seconds: int
    practitioner_seconds: int

    @classmethod
    def of(cls, d: Decision) -> DecisionGroup:
        return cls(d.codes, d.blockers, d.billable, 1, d.seconds["staff"], d.seconds["practitioner"])

    @classmethod
    def of_doc(cls, d: dict) -> DecisionGroup:
        """The same of a filed decision document (``Decision.to_dict``)."""
        return cls(d["codes"], tuple(d["blockers"]), d["billable"], 1, d["seconds"]["staff"],
                   d["seconds"]["practitioner"])


def summary(month: Month, decisions: list[Decision], total_net: Decimal, invoice_id: str | None) -> dict:
    return summary_of(month, [DecisionGroup.of(d) for d in decisions], total_net, invoice_id)


def summary_of(month: Month, groups: list[DecisionGroup], total_net: Decimal,
               invoice_id: str | None) -> dict:
    codes: Counter = Counter()
    blockers: Counter = Counter()
    for g in groups:
        codes.update({c: n * g.patients for c, n in g.codes.items()})
        blockers.update({b: g.patients for b in g.blockers})
    return {
        "month": str(month),
        "invoiceId": invoice_id,
        "patientsEnrolled": sum(g.patients for g in groups),
        "patientsBillable": sum(g.patients for g in groups if g.billable),
        "patientsBlocked": sum(g.patients for g in groups if not g.billable),
        "minutes": {
            "staff": sum(g.staff_seconds for g in groups) // 60,
            "practitioner": sum(g.practitioner_seconds for g in groups) // 60,
        },
        "codes": dict(sorted(codes.items())),
        "blockers": dict(sorted(blockers.items())),
        "totalNet": f"{total_net:.2f}",
    }


def _event(topic: str, practice: str, subject: str, data: dict, now: datetime) -> CloudEvent:
    return CloudEvent(source=SOURCE, type=topic, tenant=practice, subject=subject, data=data, time=now)


def invoice_event_data(row, resource: dict, sequence: int) -> dict:  # noqa: ANN001
    return {
        "invoiceId": row["id"],
        "month": row["month"],
        "revision": row["revision"],
        "status": resource["status"],
        "totalNet": row["total_net"],
        "totalGross": row["total_net"],
        "invoice": resource,
        "replaces": row.get("replaces"),
        "replacedBy": row.get("replaced_by"),
        "reason": row.get("cancel_reason"),
        "paid": row["paid"],
        "balance": f"{balance_of(row['total_net'], row['paid'], resource['status'], row.get('replaced_by')):.2f}",
        "practiceSequence": sequence,
    }


def _invoice_event(topic: str, row: dict, resource: dict, sequence: int,
                   now: datetime) -> tuple[str, CloudEvent]:
    return topic, _event(topic, row["practice"], f"Invoice/{row['id']}",
                         invoice_event_data(row, resource, sequence), now)


async def _publish_invoice(uow: UnitOfWork, topic: str, row: dict, resource: dict, now: datetime) -> None:
    seq = await next_practice_sequence(uow.session, row["practice"])
    await uow.outbox.add(*_invoice_event(topic, row, resource, seq, now))


async def issue_invoice(
    uow: UnitOfWork, info: PracticeInfo, month: Month, lines: list[PricedLine], *,
    revision: int, now: datetime, replaces: str | None = None,
) -> dict:
    """Create the ChargeItems and the issued Invoice of one revision; outbox its event. A
    replacement carries the payments and refunds of the Invoice it ``replaces`` (each recorded
    against it too, naming the one it carries; a voided payment carried voided, counting
    nowhere): paid in full by them, it is issued balanced."""
    inv_id = fhir.invoice_id(info.id, month, revision)
    items, refs = [], []
    # In (patient, code) order, as a read of the Invoice lists them (filed.invoice_resource).
    for line in sorted(lines, key=lambda x: (x.patient, x.code)):
        ci_id, stub = charge_item_stub(info.id, month, line, revision)
        items.append({
            "id": ci_id, "practice": info.id, "invoice_id": inv_id, "patient": line.patient,
            "month": str(month), "code": line.code, "status": "billable",
            "amount": f"{line.amount:.2f}", "resource": entered(stub, now),
            "version_id": 1, "last_updated": now,
        })
        refs.append((ci_id, line.amount))
    await bulk_insert(uow.session, orm.charge_items, items)
    carried = await _carried(uow.session, orm.payments, replaces)
    refunds = await _carried(uow.session, orm.refunds, replaces)
    refunded = sum((Decimal(x.amount) for x in refunds), ZERO)
    counted = sum((Decimal(x.amount) for x in carried if x.voided_at is None), ZERO)
    row, resource = await _store_invoice(
        uow, info, month, fhir.InvoiceLines.of(refs), revision=revision, now=now,
        replaces=replaces, paid=counted - refunded, refunded=refunded)
    await _carry(uow.session, orm.payments, carried, inv_id)
    await _carry(uow.session, orm.refunds, refunds, inv_id)
    await _publish_invoice(uow, ISSUED, row, resource, now)
    if row["status"] == "balanced":
        await _publish_invoice(uow, PAID, row, resource, now)
    return row


async def _carried(session, table, replaces: str | None) -> list:  # noqa: ANN001
    """The payments (or refunds) of the invoice a replacement ``replaces``, in the order they
    were recorded; none without one."""
    if not replaces:
        return []
    return (await session.execute(select(table).where(table.c.invoice_id == replaces)
                                  .order_by(table.c.recorded_at, table.c.id))).all()


async def _carry(session, table, rows: list, invoice_id: str) -> None:  # noqa: ANN001
    """Copies of ``rows`` (``_carried``) on the replacement ``invoice_id``, every column as it
    is but their own id and invoice, each naming the one it carries."""
    if rows:
        await session.execute(insert(table), [
            {**x._asdict(), "id": str(uuid.uuid4()), "invoice_id": invoice_id,
             "carried_from": x.carried_from or x.id} for x in rows])


async def _store_invoice(
    uow: UnitOfWork, info: PracticeInfo, month: Month, lines: fhir.InvoiceLines, *,
    revision: int, now: datetime, replaces: str | None = None, has_endpoint: bool | None = None,
    paid: Decimal = ZERO, refunded: Decimal = ZERO,
) -> tuple[dict, dict]:
    """(row, FHIR resource) of the issued Invoice, stored (without its lines: its ChargeItems
    give them, ``filed.invoice_resource``) and queued for the EHR push; its event is the caller's.
    ``paid``: what the payments it carries paid net of the ``refunded`` it carries (a
    replacement's)."""
    inv_id = fhir.invoice_id(info.id, month, revision)
    due = info.today(now) + timedelta(days=info.contract().due_days)
    resource = fhir.invoice(
        id=inv_id, practice=info.id, practice_name=info.name, month=month, revision=revision,
        lines=lines, issued=now, due=due, replaces=replaces,
    )
    payment_status, resource["status"] = payment_state(lines.total - paid, paid)
    row = {
        "id": inv_id, "practice": info.id, "month": str(month), "revision": revision,
        "status": resource["status"], "payment_status": payment_status,
        "total_net": f"{lines.total:.2f}", "paid": f"{paid:.2f}", "refunded": f"{refunded:.2f}",
        "issued_at": now, "due_date": due, "overdue": False, "replaces": replaces,
        "replaced_by": None, "cancel_reason": None,
        "resource": _stored(resource, True), "lines_in_place": True,
        "version_id": 1, "last_updated": now,
    }
    await uow.session.execute(insert(orm.invoices), row)
    await queue_delivery(uow, info.id, inv_id, now, has_endpoint=has_endpoint)
    return row, resource


@functools.cache
def _period_statement():  # noqa: ANN202 - built once
    p = orm.billing_periods
    return select(p).where(p.c.practice == bindparam("practice", type_=p.c.practice.type),
                           p.c.month == bindparam("month", type_=p.c.month.type))


async def get_period(session, practice: str, month: Month):  # noqa: ANN001, ANN201
    """The closed period's row (its decisions are its filings: ``evidence.filed_decisions``)."""
    return (await session.execute(_period_statement(),
                                  {"practice": practice, "month": str(month)})).first()


def view_columns() -> list:
    """The invoice columns ``invoice_view`` shows: all but the FHIR resource (hundreds of KB)."""
    return [c for c in orm.invoices.c if c.name != "resource"]


@functools.cache
def _invoice_statement(resource: bool, practice: bool):  # noqa: ANN202 - built once per kind
    i = orm.invoices
    stmt = select(*(i.c if resource else view_columns())).where(
        i.c.id == bindparam("id", type_=i.c.id.type))
    if practice:
        stmt = stmt.where(i.c.practice == bindparam("practice", type_=i.c.practice.type))
    return stmt


async def get_invoice_row(session, invoice_id: str, practice: str | None = None, *,  # noqa: ANN001, ANN201
                          resource: bool = True):
    """The invoice's row; without its resource when ``resource`` is False (for invoice_view)."""
    return (await session.execute(_invoice_statement(resource, practice is not None),
                                  {"id": invoice_id, "practice": practice})).first()


def revised(table, now: datetime) -> dict:  # noqa: ANN001
    """The values that mark a row of ``table`` (``invoices``, ``charge_items``) changed in what
    /fhir serves of it: its next ``meta.versionId``, ``now`` its ``meta.lastUpdated``."""
    return {"version_id": table.c.version_id + 1, "last_updated": now}


def _stored(resource: dict, lines_in_place: bool) -> str:
    """The text ``invoices.resource`` keeps of an Invoice (billing_0016)."""
    return compact(fhir.without_line_items(resource) if lines_in_place else resource)


def close_result(period, invoice_row) -> dict:  # noqa: ANN001
    return {
        "practice": period.practice,
        "month": period.month,
        "status": period.status,
        "closedAt": period.closed_at.astimezone(UTC).isoformat(),
        "summary": json.loads(period.summary),
        "invoice": invoice_view(invoice_row) if invoice_row is not None else None,
    }


def invoice_view(row) -> dict:  # noqa: ANN001
    return {
        "id": row.id,
        "practice": row.practice,
        "month": row.month,
        "revision": row.revision,
        "status": row.status,
        "paymentStatus": row.payment_status,
        "overdue": row.overdue,
        "totalNet": row.total_net,
        "paid": row.paid,
        "refunded": row.refunded,
        "balance": f"{balance_of(row.total_net, row.paid, row.status, row.replaced_by):.2f}",
        "issuedAt": row.issued_at.astimezone(UTC).isoformat(),
        "dueDate": row.due_date.isoformat(),
        "replaces": row.replaces,
        "replacedBy": row.replaced_by,
        "cancelReason": row.cancel_reason,
        "fhir": f"/fhir/Invoice/{row.id}",
    }


@functools.cache
def _groups_statement():  # noqa: ANN202 - built once (a close runs it per practice)
    """The month's cached decisions summed by codes, blockers and billability (DecisionGroup)."""
    md = orm.month_decisions
    return (select(md.c.codes, md.c.blockers, md.c.billable, func.count().label("n"),
                   func.sum(md.c.staff_seconds).label("staff"),
                   func.sum(md.c.practitioner_seconds).label("practitioner"))
            .where(md.c.practice == bindparam("practice", type_=md.c.practice.type),
                   md.c.month == bindparam("month", type_=md.c.month.type))
            .group_by(md.c.codes, md.c.blockers, md.c.billable))


@functools.cache
def _close_context_statement():  # noqa: ANN202 - built once (every close)
    r = orm.practitioner_roles
    return (select(practices, *decision_cache.role_columns(),
                   has_endpoint_clause(practices.c.id).label("has_endpoint"))
            .select_from(practices.outerjoin(r, r.c.practice == practices.c.id))
            .where(practices.c.id == bindparam("id", type_=practices.c.id.type)))


async def _close_context(session, practice: str) -> tuple[PracticeInfo, list[tuple], bool]:  # noqa: ANN001
    """What a close needs to know of the practice, in one statement: its settings, its
    performer roles (decision_cache.context_of) and whether it has an EHR endpoint."""
    rows = (await session.execute(_close_context_statement(), {"id": practice})).all()
    if not rows:
        raise NotFound(f"practice {practice!r} not found")
    names = [c.name for c in decision_cache.role_columns()]
    roles = [tuple(r._mapping[n] for n in names) for r in rows if r.role_id is not None]
    return PracticeInfo.of_row(rows[0]), roles, bool(rows[0].has_endpoint)


async def close_period(uow: UnitOfWork, practice: str, month: Month, now: datetime) -> dict:
    """Close a practice-month: decide, lock its time, issue ChargeItems and the Invoice.

    Idempotent: closing a closed month answers the result of the first close. Every patient's
    decision comes from the decision cache after it is made current (decision_cache.refresh);
    the month is then filed in place: those decisions are its filings and their priced lines its
    ChargeItems (adapters/filed.py), so the close writes only the Invoice, the period and events.
    """
    # Refused before any lock is asked for: a close too early (the current month, which the
    # decider refreshes every pass) or without rules never waits for a refresh.
    info, roles, has_endpoint = await _close_context(uow.session, practice)
    if info.today(now) <= month.last_day:
        raise Conflict(
            f"{month} has not ended in the practice's time zone ({info.timezone}); "
            f"it can be closed from {month.next().first_day}"
        )
    try:
        ruleset_for(month)
    except RulesetMissing as exc:
        raise InvalidInput(str(exc)) from None
    # Held exclusively against the projections (corrections.hold_practice), and the month's
    # decisions against the decider (decision_cache.refresh finds its lock taken): one statement.
    await xact_locks(uow.session, [corrections.practice_lock(practice),
                                   decision_cache.decide_lock(practice, str(month))])
    existing = await get_period(uow.session, practice, month)
    if existing is not None:
        inv = (await get_invoice_row(uow.session, existing.invoice_id, resource=False)
               if existing.invoice_id else None)
        return close_result(existing, inv)
    await decision_cache.refresh(uow, info, month, now, closing=True,
                                 context=decision_cache.context_of(info, month, roles))
    # Filed in place (adapters/filed.py): the current cached decisions become the month's
    # filings and their lines the Invoice's ChargeItems when the period row below commits.
    session, m = uow.session, str(month)
    lines = await decision_cache.invoice_lines(session, practice, m)
    inv_row = resource = None
    if lines.count:
        inv_row, resource = await _store_invoice(uow, info, month, lines, revision=0, now=now,
                                                 has_endpoint=has_endpoint)
    # The month's time is now locked: its filings record every entry as decided (an entry logged
    # or revised later is marked late, or corrects the month; corrections.locked_at_close).
    groups = [
        DecisionGroup(json.loads(r.codes), tuple(json.loads(r.blockers)), r.billable, r.n,
                      r.staff or 0, r.practitioner or 0)
        for r in (await session.execute(_groups_statement(), {"practice": practice, "month": m}))
    ]
    total_net = Decimal(inv_row["total_net"]) if inv_row else ZERO  # the Invoice summed the lines
    data = summary_of(month, groups, total_net, inv_row["id"] if inv_row else None)
    # The Invoice's event, then the period's: their practice sequences in one statement, the
    # events in one outbox insert.
    last = await next_practice_sequence(session, practice, count=2 if inv_row else 1)
    data["practiceSequence"] = last
    period = {
        "practice": practice, "month": m, "status": "closed", "closed_at": now,
        "invoice_id": inv_row["id"] if inv_row else None, "summary": json.dumps(data),
        "filed_in_place": True, "line_invoice": inv_row["id"] if inv_row else None,
        "line_entered": entered_suffix(now), "terms": info.terms_json()}
    await session.execute(insert(orm.billing_periods), period)
    events = [_invoice_event(ISSUED, inv_row, resource, last - 1, now)] if inv_row else []
    events.append((CLOSED, _event(CLOSED, practice, f"Organization/{practice}", data, now)))
    await uow.outbox.add_many(events)
    # What was just written, as a repeated close reads it back (get_period, get_invoice_row).
    return close_result(SimpleNamespace(**period),
                        SimpleNamespace(**inv_row) if inv_row else None)


async def cancel_invoice(uow: UnitOfWork, row, reason: str, replaced_by: str | None, now: datetime) -> None:  # noqa: ANN001
    resource = fhir.cancelled(await filed.invoice_resource(uow.session, row), reason, replaced_by)
    await filed.materialise_line_items(uow.session, row.id)  # its ChargeItems change below
    i, ci = orm.invoices, orm.charge_items
    await uow.session.execute(
        update(i).where(i.c.id == row.id).values(
            status="cancelled", cancel_reason=reason, replaced_by=replaced_by,
            resource=_stored(resource, row.lines_in_place), **revised(i, now),
        )
    )
    for item_id, item in (await uow.session.execute(
            select(ci.c.id, ci.c.resource).where(ci.c.invoice_id == row.id))).all():
        voided = {**json.loads(item), "status": "entered-in-error"}
        await uow.session.execute(update(ci).where(ci.c.id == item_id).values(
            status="entered-in-error", resource=compact(voided), **revised(ci, now)))
    data = {**row._asdict(), "cancel_reason": reason, "replaced_by": replaced_by}
    await _publish_invoice(uow, "billing.invoice.cancelled.v1", data, resource, now)
    await queue_delivery(uow, row.practice, row.id, now)


async def replace_cancelled(uow: UnitOfWork, practice: str, month: str, replaced_by: str,
                            now: datetime) -> str | None:
    """The month's invoice cancelled without replacement (a correction left nothing to bill),
    locked and marked replaced by ``replaced_by`` (its stored FHIR resource names it, and it is
    pushed to the EHR again), so that the month's new invoice replaces it and carries its
    payments and refunds (``issue_invoice``); None when the month has none (closed with nothing
    to bill). The newest such invoice: the chain's end."""
    i = orm.invoices
    last = (await uow.session.execute(
        select(i.c.id).where(i.c.practice == practice, i.c.month == month,
                             i.c.status == "cancelled", i.c.replaced_by.is_(None))
        .order_by(i.c.revision.desc()).limit(1))).scalar()
    if last is None:
        return None
    # Locked as a payment or refund of it locks it: one paying back a refund owed meanwhile
    # commits first and is carried, or waits and finds it replaced (409, naming this one).
    row = await locked_invoice(uow.session, i.c.id == last)
    resource = fhir.cancelled(await filed.invoice_resource(uow.session, row), row.cancel_reason,
                              replaced_by)
    await uow.session.execute(update(i).where(i.c.id == last).values(
        replaced_by=replaced_by, resource=_stored(resource, row.lines_in_place),
        **revised(i, now)))
    await queue_delivery(uow, practice, last, now)
    return last


# -- payments and overdue ----------------------------------------------------------------------


# US dollars as the API takes them: digits, and at most two decimals (no sign, exponent,
# spaces, "_" or digits of other scripts, which Decimal() would read).
_AMOUNT = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,2})?")


def parse_amount(text: str) -> Decimal:
    if not isinstance(text, str) or not _AMOUNT.fullmatch(text):
        raise InvalidInput("amount must be US dollars written as digits with at most two "
                           "decimals and below a trillion, e.g. \"120.50\"",
                           expression=["amount"])
    amount = Decimal(text)
    if amount <= 0:
        raise InvalidInput("amount must be positive", expression=["amount"])
    return amount


class Answer(dict):
    """What a payment or refund answers; ``replayed``: it recorded nothing, the request was one
    already recorded (the same Idempotency-Key, or reference, with the same details): 200, not
    201."""

    replayed = False

    @classmethod
    def again(cls, doc: dict) -> Answer:
        answer = cls(doc)
        answer.replayed = True
        return answer


async def _keyed(session, table, invoice_id: str, key: str | None, amount: Decimal,  # noqa: ANN001
                 day: date, reference: str | None):  # noqa: ANN202
    """The payment or refund (``table``'s row) the invoice recorded for the Idempotency-Key
    ``key``, when it was sent with the same amount, date and reference; None when the key is
    new (or none). 422 when it was sent with other details: a key names one request."""
    if key is None:
        return None
    same = (await session.execute(select(table).where(
        table.c.invoice_id == invoice_id, table.c.idempotency_key == key))).first()
    if same is not None and (Decimal(same.amount), same.date, same.reference) != (
            amount, day, reference):
        raise InvalidInput(f"Idempotency-Key {key!r} was sent with another request (amount, "
                           "date or reference) to this invoice: a key names one request; send "
                           "a new key for a new one", expression=["Idempotency-Key"])
    return same


async def record_payment(
    uow: UnitOfWork, practice: str, invoice_id: str, *, amount: Decimal, paid_on: date,
    reference: str | None, now: datetime, idempotency_key: str | None = None,
) -> Answer:
    """Record a payment: issued → partially-paid → balanced (paid). The request's
    Idempotency-Key sent again with the same details: the payment it recorded (voided since or
    not), nothing recorded; with other details 422. The reference of a payment that counts,
    sent again with the same details: that payment (no-op). Either answers ``replayed``. A
    cancelled invoice takes a payment only while it owes refunded money back
    (``takes_payment``)."""
    i, p = orm.invoices, orm.payments
    row, again = await _locked_unless_replayed(uow.session, p, practice, invoice_id,
                                               key=idempotency_key, amount=amount, day=paid_on,
                                               reference=reference)
    if again is not None:
        return again
    balance = balance_of(row.total_net, row.paid, row.status, row.replaced_by)
    if not takes_payment(row.status, row.replaced_by, balance):
        raise Conflict(f"invoice {invoice_id} is cancelled: "
                       f"{await _instead(uow.session, row)}")
    _check_day(row, paid_on, now)
    if amount > balance:
        raise InvalidInput(f"amount {amount} exceeds the balance {balance:.2f}",
                           expression=["amount"])
    paid = Decimal(row.paid) + amount
    values, resource = await _paid_now(uow.session, row, paid, now)
    payment = (await uow.session.execute(insert(p).values(
        id=str(uuid.uuid4()), practice=practice, invoice_id=invoice_id, amount=f"{amount:.2f}",
        date=paid_on, reference=reference, recorded_at=now,
        idempotency_key=idempotency_key).returning(*p.c))).one()
    updated = (await uow.session.execute(update(i).where(i.c.id == invoice_id).values(**values)
                                         .returning(*view_columns()))).one()
    new_balance = balance_of(updated.total_net, updated.paid, updated.status,
                             updated.replaced_by)
    payment_status = payment_state(new_balance, paid)[0]
    seq = await next_practice_sequence(uow.session, practice)
    await uow.outbox.add(
        PAYMENT_RECORDED,
        _event(PAYMENT_RECORDED, practice, f"Invoice/{invoice_id}", {
            "invoiceId": invoice_id, "paymentId": payment.id, "amount": payment.amount,
            "date": paid_on.isoformat(), "reference": reference, "paid": updated.paid,
            "balance": f"{new_balance:.2f}", "status": payment_status,
            "invoiceStatus": updated.status, "practiceSequence": seq,
        }, now),
    )
    # Paid in full: its status changed (issued → balanced), so ``resource`` is the new one.
    if updated.status == "balanced":
        await _publish_invoice(uow, PAID, updated._asdict(), resource, now)
    return Answer({"payment": payment_view(payment), "invoice": invoice_view(updated)})


async def _locked_unless_replayed(session, table, practice: str, invoice_id: str, *,  # noqa: ANN001, ANN202
                                  key: str | None, amount: Decimal, day: date,
                                  reference: str | None):
    """The invoice a payment or refund (``table``: ``payments`` or ``refunds``) is recorded
    against, locked, and the answer to a request recorded before, else None: (row, answer).
    Replayed: its Idempotency-Key with the same details (other details: 422), or its reference
    with the same amount and date (other details: 409) among the payments that count (a voided
    one leaves its reference to the payment that replaces it, billing_0022) or the refunds.
    404 when the practice has no such invoice."""
    i = orm.invoices
    kind, view = ("payment", payment_view) if table is orm.payments else ("refund", refund_view)
    # One payment or refund of an invoice at a time: each reads the balance and references the
    # one before it left. Read first, concurrent payments each added their amount to the same
    # old balance (the last write won: an invoice paid several times over, its rows summing to
    # more than `paid`), and concurrent refunds could pay back more than was overpaid. The same
    # request sent twice at once: the second waits here, then finds the first's by its key.
    row = await locked_invoice(session, i.c.id == invoice_id, i.c.practice == practice)
    if row is None:
        raise NotFound(f"invoice {invoice_id!r} not found")
    same = await _keyed(session, table, invoice_id, key, amount, day, reference)
    if same is None and reference:
        counts = [table.c.voided_at.is_(None)] if "voided_at" in table.c else []
        same = (await session.execute(select(table).where(
            table.c.invoice_id == invoice_id, table.c.reference == reference, *counts))).first()
        if same is not None and (Decimal(same.amount) != amount or same.date != day):
            raise Conflict(f"{kind} reference {reference!r} was recorded with other details")
    if same is None:
        return row, None
    return row, Answer.again({kind: view(same), "invoice": invoice_view(row)})


def _check_day(row, day: date, now: datetime) -> None:  # noqa: ANN001
    """A payment (or refund) of this month's services is not made before the month began, nor a
    year ahead (0001-01-01 and 9999-12-31 were taken: a typing error, not a payment)."""
    first, latest = Month.parse(row.month).first_day, now.date() + timedelta(days=366)
    if not first <= day <= latest:
        raise InvalidInput(f"date must be from {first} (the invoice's month) to {latest}",
                           expression=["date"])


async def locked_invoice(session, *where):  # noqa: ANN001, ANN201
    """The invoice row ``where`` names, read as it locks it (written unchanged, in one
    statement): one payment or correction of an invoice at a time, each reading what the one
    before it left."""
    i = orm.invoices
    return (await session.execute(
        update(i).where(*where).values(paid=i.c.paid).returning(*i.c))).first()


async def locked_live_invoice(session, practice: str, month: str):  # noqa: ANN001, ANN201
    """The month's invoice that is not cancelled, locked as a correction locks it; None when
    every invoice of the month is cancelled. A correction that cancels the one this waited for
    issues its replacement in the same transaction, which this statement's snapshot cannot see
    (PostgreSQL re-checks only the row it waited for, now cancelled): looked for again, until
    what is found is locked or none is live."""
    i = orm.invoices
    live = (i.c.practice == practice, i.c.month == month, i.c.status != "cancelled")
    while True:
        row = await locked_invoice(session, *live)
        if row is not None:
            return row
        if (await session.execute(select(i.c.id).where(*live).limit(1))).first() is None:
            return None


async def _paid_now(session, row, paid: Decimal,  # noqa: ANN001
                    now: datetime) -> tuple[dict, dict | None]:
    """The invoice row's new values once what it was paid net is ``paid`` (a payment voided, a
    refund): its payment status and status (a cancelled invoice keeps its own), and its stored
    FHIR resource and next version when the status changes; (values, that resource or None)."""
    values: dict = {"paid": f"{paid:.2f}"}
    if row.status == "cancelled":
        return values, None
    values["payment_status"], values["status"] = payment_state(
        Decimal(row.total_net) - paid, paid)
    if values["status"] == row.status:
        return values, None
    resource = await filed.invoice_resource(session, row)
    resource["status"] = values["status"]
    values["resource"] = _stored(resource, row.lines_in_place)
    values.update(revised(orm.invoices, now))
    return values, resource


async def _instead(session, cancelled) -> str:  # noqa: ANN001
    """What to use instead of a cancelled invoice: its month's current invoice (the end of the
    chain of replacements, not the one that replaced it first, itself perhaps cancelled)."""
    i = orm.invoices
    live = (await session.execute(select(i.c.id).where(
        i.c.practice == cancelled.practice, i.c.month == cancelled.month,
        i.c.status != "cancelled"))).scalar()
    if live is None:
        return "its month has no current invoice (a correction left nothing to bill)"
    return f"its month's current invoice is {live}"


def payment_view(row) -> dict:  # noqa: ANN001
    return {**refund_view(row),
            "voided": {"at": row.voided_at.astimezone(UTC).isoformat(), "reason": row.void_reason,
                       "by": row.voided_by, "byLabel": row.voided_by_label}
            if row.voided_at is not None else None}


def refund_view(row) -> dict:  # noqa: ANN001
    return {"id": row.id, "invoiceId": row.invoice_id, "amount": row.amount,
            "date": row.date.isoformat(), "reference": row.reference,
            "carriedFrom": row.carried_from}


async def void_payment(
    uow: UnitOfWork, practice: str, invoice_id: str, payment_id: str, *, reason: str,
    actor: str, actor_label: str | None, now: datetime,
) -> dict:
    """Void a payment (recorded in error, or reversed by the bank): it stays, marked voided, and
    counts nowhere. A payment carried into replacements is the same money: the payment it
    carries and every copy of it are voided together, each invoice holding one losing it from
    its ``paid``; the last of them (the month's live invoice, if one holds it) changes state
    (balanced → issued, and overdue at once when past due) and is named by the event. Never
    refused: voided after its overpayment was refunded, it leaves the refund owed back (``paid``
    negative, domain/payments.py). Voiding a voided payment answers the same, with no event."""
    i, p = orm.invoices, orm.payments
    month = (await uow.session.execute(select(i.c.month).where(
        i.c.id == invoice_id, i.c.practice == practice))).scalar()
    if month is None:
        raise NotFound(f"invoice {invoice_id!r} not found")
    # The live invoice first, as payments and corrections lock it: nothing carries this payment
    # into a replacement, pays or refunds the month while the void runs.
    live = await locked_live_invoice(uow.session, practice, month)
    payment = (await uow.session.execute(select(p).where(
        p.c.id == payment_id, p.c.invoice_id == invoice_id))).first()
    if payment is None:
        raise NotFound(f"payment {payment_id!r} of invoice {invoice_id!r} not found")
    if payment.voided_at is not None:
        row = await get_invoice_row(uow.session, invoice_id, resource=False)
        return {"payment": payment_view(payment), "invoice": invoice_view(row)}
    voided, invoices = await _void_family(uow, practice, month, live, payment, reason=reason,
                                          actor=actor, actor_label=actor_label, now=now)
    return {"payment": payment_view(voided[payment_id]),
            "invoice": invoice_view(invoices[invoice_id])}


async def _void_family(uow: UnitOfWork, practice: str, month: str, live, payment, *,  # noqa: ANN001
                       reason: str, actor: str, actor_label: str | None,
                       now: datetime) -> tuple[dict, dict]:
    """Void ``payment`` and the copies of the same money in the month's invoices (the live one
    already locked); write each invoice's figures; outbox the events. (The payments as voided,
    the invoices as written (without their resource), each by id.)"""
    i, p = orm.invoices, orm.payments
    root = payment.carried_from or payment.id
    family = (await uow.session.execute(
        select(p).join(i, i.c.id == p.c.invoice_id)
        .where(i.c.practice == practice, i.c.month == month,
               or_(p.c.id == root, p.c.carried_from == root))
        .order_by(i.c.revision, p.c.id))).all()
    # The other invoices holding it are cancelled: locked in id order (a void or refund of a
    # cancelled invoice locks it; a payment or correction never waits for one).
    rows = {live.id: live} if live is not None else {}
    for invoice_id in sorted({x.invoice_id for x in family} - set(rows)):
        rows[invoice_id] = await locked_invoice(uow.session, i.c.id == invoice_id)
    voided = {x.id: x for x in (await uow.session.execute(
        update(p).where(p.c.id.in_([x.id for x in family]), p.c.voided_at.is_(None))
        .values(voided_at=now, void_reason=reason, voided_by=actor, voided_by_label=actor_label)
        .returning(*p.c))).all()}
    written, head = {}, None
    for invoice_id in dict.fromkeys(x.invoice_id for x in family):  # in revision order
        row = rows[invoice_id]
        taken = sum((Decimal(x.amount) for x in family
                     if x.invoice_id == invoice_id and x.voided_at is None), ZERO)
        values, resource = await _paid_now(uow.session, row, Decimal(row.paid) - taken, now)
        written[invoice_id] = (await uow.session.execute(
            update(i).where(i.c.id == invoice_id).values(**values)
            .returning(*view_columns()))).one()
        head = (row, resource)
    row, resource = head
    updated = written[row.id]
    balance = balance_of(updated.total_net, updated.paid, updated.status, updated.replaced_by)
    held = next(x for x in reversed(family) if x.invoice_id == row.id)
    seq = await next_practice_sequence(uow.session, practice)
    await uow.outbox.add(PAYMENT_VOIDED, _event(PAYMENT_VOIDED, practice, f"Invoice/{row.id}", {
        "invoiceId": row.id, "paymentId": held.id, "carriedFrom": held.carried_from,
        "amount": held.amount, "date": held.date.isoformat(), "reference": held.reference,
        "reason": reason, "voidedAt": now.astimezone(UTC).isoformat(),
        "voided": [{"invoiceId": x.invoice_id, "paymentId": x.id} for x in family],
        "paid": updated.paid, "balance": f"{balance:.2f}",
        "status": payment_state(balance, Decimal(updated.paid))[0],
        "invoiceStatus": updated.status, "practiceSequence": seq,
    }, now))
    # Paid in full by it, the live invoice is owed again: overdue at once when past its due date.
    if row.status != "cancelled":
        info = await practice_info(uow.session, practice)
        if reopened_overdue(row.status, updated.status, updated.due_date, info.today(now)):
            written[row.id] = (await uow.session.execute(
                update(i).where(i.c.id == row.id).values(overdue=True)
                .returning(*view_columns()))).one()
            await _publish_invoice(uow, OVERDUE, written[row.id]._asdict(), resource, now)
    return voided, written


async def record_refund(
    uow: UnitOfWork, practice: str, invoice_id: str, *, amount: Decimal, refunded_on: date,
    reference: str | None, now: datetime, idempotency_key: str | None = None,
) -> Answer:
    """Record a refund of what the practice overpaid (a correction lowered a total it had paid):
    at most what the invoice owes back, bringing its balance toward 0; it stays balanced (a
    cancelled invoice, cancelled). Same Idempotency-Key or same reference with the same
    details: that refund, ``replayed`` (the key with other details: 422)."""
    i, r = orm.invoices, orm.refunds
    row, again = await _locked_unless_replayed(uow.session, r, practice, invoice_id,
                                               key=idempotency_key, amount=amount,
                                               day=refunded_on, reference=reference)
    if again is not None:
        return again
    if row.status == "cancelled" and row.replaced_by:
        raise Conflict(f"invoice {invoice_id} is cancelled and its payments are carried: "
                       f"{await _instead(uow.session, row)}")
    _check_day(row, refunded_on, now)
    balance = balance_of(row.total_net, row.paid, row.status, row.replaced_by)
    owed = refundable(balance)
    if not owed:
        raise Conflict(f"invoice {invoice_id} owes nothing back (balance {balance:.2f}): a "
                       "refund pays back only what the practice overpaid")
    if amount > owed:
        raise InvalidInput(f"amount {amount} exceeds what invoice {invoice_id} owes back "
                           f"({owed:.2f})", expression=["amount"])
    paid, refunded = Decimal(row.paid) - amount, Decimal(row.refunded) + amount
    # Never another state: only an overpaid invoice, balanced, is refunded, and to 0 at most.
    values, _ = await _paid_now(uow.session, row, paid, now)
    values["refunded"] = f"{refunded:.2f}"
    refund = (await uow.session.execute(insert(r).values(
        id=str(uuid.uuid4()), practice=practice, invoice_id=invoice_id, amount=f"{amount:.2f}",
        date=refunded_on, reference=reference, recorded_at=now,
        idempotency_key=idempotency_key).returning(*r.c))).one()
    updated = (await uow.session.execute(update(i).where(i.c.id == invoice_id).values(**values)
                                         .returning(*view_columns()))).one()
    new_balance = balance_of(updated.total_net, updated.paid, updated.status, updated.replaced_by)
    seq = await next_practice_sequence(uow.session, practice)
    await uow.outbox.add(PAYMENT_REFUNDED, _event(
        PAYMENT_REFUNDED, practice, f"Invoice/{invoice_id}", {
            "invoiceId": invoice_id, "refundId": refund.id, "amount": refund.amount,
            "date": refunded_on.isoformat(), "reference": reference, "paid": updated.paid,
            "refunded": updated.refunded, "balance": f"{new_balance:.2f}",
            "status": payment_state(new_balance, paid)[0], "invoiceStatus": updated.status,
            "practiceSequence": seq,
        }, now))
    return Answer({"refund": refund_view(refund), "invoice": invoice_view(updated)})


async def mark_overdue(uow: UnitOfWork, info: PracticeInfo, now: datetime) -> int:
    """Flag issued, unpaid invoices past their due date; one overdue event each."""
    i = orm.invoices
    rows = (
        await uow.session.execute(
            select(i).where(i.c.practice == info.id, i.c.status == "issued", i.c.overdue.is_(False),
                            i.c.due_date < info.today(now))
        )
    ).all()
    for row in rows:
        await uow.session.execute(update(i).where(i.c.id == row.id).values(overdue=True))
        await _publish_invoice(uow, OVERDUE, row._asdict(),
                               await filed.invoice_resource(uow.session, row), now)
    return len(rows)
