"""Corrections after close: recompute the month; never edit an issued Invoice — cancel it and
issue a replacement that points back to it."""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import select, update

from ccm_billing.adapters import filed, orm
from ccm_billing.domain.model import Month
from ccm_billing.domain.pricing import total
from ccm_billing.service_layer.charges import PricedLine, billed_line, priced_lines
from ccm_shared.db import UnitOfWork, xact_lock


async def hold_practice(session, practice: str, *, exclusive: bool) -> None:  # noqa: ANN001
    """Serialise closes with the projections of the same practice (PostgreSQL; SQLite has one
    writer anyway). A close holds the practice exclusively until it commits; each projected
    event holds it shared, before reading anything: an event that arrives while a month closes
    waits, then sees the month closed (late, or a correction) instead of slipping past both."""
    await xact_lock(session, practice_lock(practice), shared=not exclusive)


def practice_lock(practice: str) -> str:
    """The name of the advisory lock ``hold_practice`` takes."""
    return f"close:{practice}"


async def is_closed(session, practice: str, month: str | None) -> bool:  # noqa: ANN001
    if not month:
        return False
    p = orm.billing_periods
    row = (
        await session.execute(select(p.c.status).where(p.c.practice == practice, p.c.month == month))
    ).first()
    return row is not None


async def locked_at_close(session, practice: str, patient: str | None, month: str,  # noqa: ANN001
                          entry_id: str) -> bool:
    """Whether the entry was locked by the month's close: finished, on time, and so filed with
    its patient's decision (the close's filing is the lock record of the month's time)."""
    f = filed.filings
    filing = (await session.execute(
        select(f.c.entries).where(f.c.practice == practice, f.c.patient == patient,
                                  f.c.month == month, f.c.revision == 0))).scalar()
    return any(e["entry"] == entry_id and e["status"] == "finished" and not e["late"]
               for e in json.loads(filing or "[]"))


async def recompute_patient_months(uow: UnitOfWork, practice: str, patients: Collection[str],
                                   reason: str, now: datetime, *, decided: bool = False,
                                   since: str | None = None) -> None:
    """Recompute, for ``patients`` together, every closed month in which one of them was
    billed; with ``decided``, every closed month that decided one of them (billed or not: a
    fact that can unblock it); with ``since``, only those from that month on."""
    patients = list(patients)
    if decided:
        f = filed.filings
        stmt = select(f.c.month).where(f.c.practice == practice, f.c.patient.in_(patients))
        month = f.c.month
    else:
        ci = filed.charge_items
        stmt = select(ci.c.month).where(ci.c.practice == practice, ci.c.patient.in_(patients),
                                        ci.c.status == "billable")
        month = ci.c.month
    if since is not None:
        stmt = stmt.where(month >= since)
    months = (await uow.session.execute(stmt.distinct())).scalars().all()
    for month in sorted(months):
        await recompute(uow, practice, month, reason, now, patients=patients)


def _line_key(line: PricedLine) -> tuple:
    """What a reissue compares of a line: patient, code, amount, units, performer and, for a
    line of one day (G0506), that day and the Encounters it cites (its visit can change)."""
    return (line.patient, line.code, f"{line.amount:.2f}", line.units, line.practitioner, line.day,
            line.encounters if line.day else ())


async def recompute(uow: UnitOfWork, practice: str, month_text: str, reason: str, now: datetime,
                    *, patients: Collection[str] | None = None) -> bool:
    """Recompute a closed month; cancel and reissue its Invoice when the lines changed.

    With ``patients`` (what a correction concerns) only they are decided again: every other
    patient's filed decision and billed lines are carried over as they were, so a correction
    never picks up unrelated late facts or a changed contract for anyone else (both would make a
    closed month depend on the order events arrived in); they are decided and priced under the
    terms the month is billed under (contract and rule options: of its close, or of its last
    explicit recompute), as everyone else was. Without, the whole month is decided again and
    priced with the current contract (the explicit ``recompute`` API), which become its terms."""
    from ccm_billing.compliance.evidence import file_decisions, filed_decisions
    from ccm_billing.service_layer import invoicing
    from ccm_billing.service_layer.common import practice_info
    from ccm_billing.service_layer.decisions import decide_month_with_facts

    month = Month.parse(month_text)
    period = await invoicing.get_period(uow.session, practice, month)
    if period is None:
        return False
    info = await practice_info(uow.session, practice)
    scope = None if patients is None else set(patients)
    if scope is not None:  # a correction: the terms the month is billed under
        info = info.under(period.terms)
    facts, decisions = await decide_month_with_facts(uow.session, info, month, patients=scope)
    filed_before = await filed_decisions(uow.session, practice, month_text)
    # Everyone else's filings stand as they are (the explicit recompute: nobody else's).
    previous, kept = [], []
    for d in filed_before:
        (previous if scope is None or d["patient"].removeprefix("Patient/") in scope
         else kept).append(d)
    # Never an edit: each patient whose decision changed gets a new filing revision.
    refiled = await file_decisions(uow, practice, month, facts, decisions, reason=reason, now=now,
                                   previous=previous)
    lines = priced_lines(info, month, decisions)
    i = orm.invoices
    # The issued invoice is read as it is locked, as a payment locks it: a payment committed
    # between a plain read and the cancel was carried into the replacement but left out of the
    # cancelled event built from the read (its paid and balance stale).
    current = await invoicing.locked_invoice(
        uow.session, i.c.practice == practice, i.c.month == month_text, i.c.status != "cancelled")
    ci = filed.charge_items
    old, billed = set(), []
    if current is not None:
        billed = (await uow.session.execute(select(ci).where(ci.c.invoice_id == current.id))).all()
        old = {_line_key(billed_line(r)) for r in billed}
    if scope is not None:
        lines = sorted([*(billed_line(r) for r in billed if r.patient not in scope), *lines],
                       key=lambda x: (x.patient, x.code))
    new = {_line_key(x) for x in lines}
    reissue = old != new
    if scope is None:  # the explicit recompute: today's contract and options are the month's now
        bp = orm.billing_periods
        await uow.session.execute(update(bp).where(
            bp.c.practice == practice, bp.c.month == month_text).values(terms=info.terms_json()))
    if not reissue and not refiled:
        return False
    new_id, invoice_ref = (current.id if current is not None else None), None
    if reissue:
        revision = (
            await uow.session.execute(
                select(i.c.revision).where(i.c.practice == practice, i.c.month == month_text)
                .order_by(i.c.revision.desc()).limit(1)
            )
        ).scalar()
        revision = 0 if revision is None else revision + 1
        from ccm_billing.adapters.fhir import invoice_id

        new_id = invoice_id(practice, month, revision) if lines else None
        if current is not None:
            await invoicing.cancel_invoice(uow, current, f"corrected: {reason}", new_id, now)
        if lines:
            invoice_ref = (await invoicing.issue_invoice(
                uow, info, month, lines, revision=revision, now=now,
                replaces=current.id if current is not None else None,
            ))["id"]
    else:
        invoice_ref = new_id  # the lines stand; only the decisions (and so the summary) moved
    # The month's decisions as now filed: the corrected patients' new ones and everyone else's.
    summary = invoicing.summary_of(
        month, [*map(invoicing.DecisionGroup.of_doc, kept),
                *map(invoicing.DecisionGroup.of, decisions)],
        total([x.amount for x in lines]), new_id)
    p = orm.billing_periods
    await uow.session.execute(
        update(p).where(p.c.practice == practice, p.c.month == month_text).values(
            invoice_id=invoice_ref,
            summary=json.dumps({**json.loads(period.summary), **summary}),
        )
    )
    return reissue
