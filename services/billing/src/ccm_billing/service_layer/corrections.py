"""Corrections after close: recompute the month; never edit an issued Invoice — cancel it and
issue a replacement that points back to it."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import UTC, datetime

from sqlalchemy import and_, insert, or_, select, update

from ccm_billing.adapters import filed, orm
from ccm_billing.domain.model import BACKDATED_ENTRY, DUPLICATE_BILLER, Month
from ccm_billing.domain.pricing import total
from ccm_billing.service_layer.charges import PricedLine, billed_line, priced_lines
from ccm_shared.db import UnitOfWork, xact_lock, xact_locks
from ccm_shared.jsontext import compact


async def hold_practice(session, practice: str, *, exclusive: bool) -> None:  # noqa: ANN001
    """Serialise closes with the projections of the same practice (PostgreSQL; SQLite has one
    writer anyway). A close holds the practice exclusively until it commits; each projected
    event holds it shared, before reading anything: an event that arrives while a month closes
    waits, then sees the month closed (late, or a correction) instead of slipping past both."""
    await xact_lock(session, practice_lock(practice), shared=not exclusive)


def practice_lock(practice: str) -> str:
    """The name of the advisory lock ``hold_practice`` takes."""
    return f"close:{practice}"


async def hold_months(session, months: Iterable[tuple[str, str]]) -> dict:  # noqa: ANN001
    """Lock the closed periods' rows of ``months`` ((practice, month) pairs) until the
    transaction ends, in (practice, month) order, in one statement; answers them by pair (a
    month not closed has none). Every correction holds its practice-month this way before it
    reads anything of it, so two corrections of one month run one after the other, the second
    on what the first left (READ COMMITTED: each statement after the lock sees the first's
    commit), and a unit of work that corrects several months takes them all at once, in the
    order every other one does: they wait for each other instead of deadlocking. (SQLite: one
    writer at a time anyway.)"""
    pairs = sorted(set(months))
    if not pairs:
        return {}
    p = orm.billing_periods
    rows = (await session.execute(
        select(p).where(or_(*(and_(p.c.practice == practice, p.c.month == month)
                              for practice, month in pairs)))
        .order_by(p.c.practice, p.c.month).with_for_update())).all()
    return {(r.practice, r.month): r for r in rows}


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
    months = sorted((await uow.session.execute(stmt.distinct())).scalars().all())
    await hold_months(uow.session, [(practice, m) for m in months])  # all at once, in order
    for month in months:
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
    # The practice-month first: a correction running meanwhile (the consumer's, another
    # recompute) is waited for, and everything below is read as it left it.
    period = (await hold_months(uow.session, [(practice, month_text)])).get(
        (practice, month_text))
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
    current = await invoicing.locked_live_invoice(uow.session, practice, month_text)
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
        replaces = current.id if current is not None else None
        if current is not None:
            await invoicing.cancel_invoice(uow, current, f"corrected: {reason}", new_id, now)
        elif lines:
            # Billable again after a correction left nothing to bill: the new invoice replaces
            # the one cancelled without replacement and carries its payments and refunds, as a
            # reissue does (else that one went on owing back what it was paid while this one
            # billed in full).
            replaces = await invoicing.replace_cancelled(uow, practice, month_text, new_id, now)
        if lines:
            invoice_ref = (await invoicing.issue_invoice(
                uow, info, month, lines, revision=revision, now=now, replaces=replaces,
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


async def _latest_filings(session, practice: str, month: str, patients: Collection[str]) -> dict:  # noqa: ANN001
    """Each of ``patients``' newest filing of the closed month (revision, decision, entries)."""
    f = filed.filings
    latest: dict = {}
    for row in (await session.execute(
            select(f.c.patient, f.c.revision, f.c.decision, f.c.entries).where(
                f.c.practice == practice, f.c.month == month,
                f.c.patient.in_(list(patients))))).all():
        if row.patient not in latest or row.revision > latest[row.patient].revision:
            latest[row.patient] = row
    return latest


# -- time logged after close ---------------------------------------------------------------------

_NEVER = datetime.max.replace(tzinfo=UTC)


def with_late_entries(doc: dict, entries: list[dict], fresh: dict,
                      fresh_entries: list[dict]) -> tuple[dict, list[dict]]:
    """A filed decision ``doc`` (and the ``entries`` filed with it) as it stands with the time
    logged after the close as it is now: ``fresh`` (the patient decided now, ``fresh_entries``
    its entries) says what becomes of each entry logged late — not counted
    (``logged-after-close``), with the ``backdated-entry`` warning — and nothing else of it is
    taken: late time bills nothing, so codes, minutes and blockers stay as filed. Late entries
    the filing listed that are late no more (moved to another patient) leave it. Not-counted
    entries are in the decider's order (start, then id)."""
    late = [e for e in fresh_entries if e["late"]]
    ids = {e["entry"] for e in late} | {e["entry"] for e in entries if e["late"]}
    refs = {f"Encounter/{i}" for i in ids}
    merged = [e for e in entries if e["entry"] not in ids] + late
    starts = {e["entry"]: datetime.fromisoformat(e["start"]) for e in merged}

    def order(item: dict) -> tuple:
        entry = item["entry"].removeprefix("Encounter/")
        return starts.get(entry, _NEVER), entry

    not_counted = sorted([n for n in doc["notCounted"] if n["entry"] not in refs]
                         + [n for n in fresh["notCounted"] if n["entry"] in refs], key=order)
    warnings = set(doc["warnings"]) - {BACKDATED_ENTRY}
    if BACKDATED_ENTRY in fresh["warnings"]:
        warnings.add(BACKDATED_ENTRY)
    return {**doc, "notCounted": not_counted, "warnings": sorted(warnings)}, merged


async def file_late_entries(uow: UnitOfWork, practice: str, month_text: str, patient: str,
                            reason: str, now: datetime) -> bool:
    """Time logged for a month after it closed is not billed into it, and the month says so at
    once: the patient's newest filing gets a revision listing the entry as not counted
    (``logged-after-close``) with the ``backdated-entry`` warning (``with_late_entries``); the
    Invoice stands. A patient the close did not decide (enrolled since) is decided as a
    correction decides its patients. True when something was filed."""
    from ccm_billing.compliance.evidence import entries_of
    from ccm_billing.service_layer.common import practice_info
    from ccm_billing.service_layer.decisions import decide_month_with_facts

    period = (await hold_months(uow.session, [(practice, month_text)])).get(
        (practice, month_text))
    if period is None:
        return False
    latest = (await _latest_filings(uow.session, practice, month_text, [patient])).get(patient)
    before = json.loads(latest.decision) if latest is not None else None
    if before is None:
        await recompute(uow, practice, month_text, reason, now, patients=[patient])
        return True
    info = (await practice_info(uow.session, practice)).under(period.terms)
    facts, decisions = await decide_month_with_facts(uow.session, info, Month.parse(month_text),
                                                     patients={patient})
    if not facts:
        return False
    entries = json.loads(latest.entries or "[]")
    doc, filed_entries = with_late_entries(before, entries, decisions[0].to_dict(),
                                           entries_of(facts[0]))
    if doc == before and filed_entries == entries:
        return False
    await uow.session.execute(insert(orm.decision_filings).values(
        practice=practice, patient=patient, month=month_text, revision=latest.revision + 1,
        filed_at=now, reason=reason, decision=compact(doc), entries=compact(filed_entries)))
    return True


# -- duplicate billers found after close -----------------------------------------------------------

# Why a closed month's duplicate-biller flag moved, as its filings and cancelled Invoice say it.
# Never another practice's ids: the reason goes to this practice.
DUPLICATE_TIME = "duplicate-biller: CCM time of the same MBI in another practice changed"
DUPLICATE_RELEASE = "duplicate-biller: a practice released or reclaimed the patient-month"
DUPLICATE_MBI = "duplicate-biller: a patient's MBI changed"


async def duplicate_plan(uow: UnitOfWork, mbis: Iterable[str | None],
                         months: Iterable[str | None] | None = None) -> dict:
    """The closed months whose duplicate-biller flags a change of ``mbis``' facts (time in a
    month, an MBI, a release) can move: {(practice, month): patients filed there with one of
    the MBIs}, only of ``months`` when given. Holds every practice involved shared first, as
    the projections hold theirs: a month of theirs being closed is waited for and then seen
    closed (its close saw this change, or it is corrected here)."""
    mbis = sorted({m for m in mbis if m})
    if not mbis:
        return {}
    pt = orm.patients
    holders = (await uow.session.execute(select(pt.c.practice, pt.c.patient_id).where(
        pt.c.mbi.in_(mbis)))).all()
    if not holders:
        return {}
    await xact_locks(uow.session, [practice_lock(p) for p in sorted({h.practice for h in holders})],
                     shared=True)
    f = filed.filings
    stmt = select(f.c.practice, f.c.month, f.c.patient).where(or_(*(
        and_(f.c.practice == h.practice, f.c.patient == h.patient_id) for h in holders)))
    if months is not None:
        wanted = sorted({m for m in months if m})
        if not wanted:
            return {}
        stmt = stmt.where(f.c.month.in_(wanted))
    plan: dict = defaultdict(set)
    for row in (await uow.session.execute(stmt.distinct())).all():
        plan[(row.practice, row.month)].add(row.patient)
    return {key: sorted(plan[key]) for key in sorted(plan)}


async def correct_duplicates(uow: UnitOfWork, plan: dict, reason: str, now: datetime) -> list:
    """Correct each patient of ``plan`` (``duplicate_plan``) whose newest filing flags
    ``duplicate-biller`` where the facts now do not, or the reverse: a closed month follows its
    duplicate-biller flag as an open month does (a blocker: flagged, the patient's lines are
    cancelled and the Invoice reissued without them; the flag lifted, they are billed again).
    Holds the months first, in order (a caller that corrects other months in the same unit of
    work holds them all together beforehand). Answers the (practice, month) pairs corrected."""
    from ccm_billing.service_layer.decisions import duplicate_patients

    await hold_months(uow.session, plan)
    corrected = []
    for (practice, month), patients in sorted(plan.items()):
        latest = await _latest_filings(uow.session, practice, month, patients)
        moved = []
        for patient in patients:
            row = latest.get(patient)
            doc = json.loads(row.decision) if row is not None else None
            if doc is None:
                continue  # not in the month (a correction took the patient out of it)
            flagged = patient in await duplicate_patients(uow.session, practice, month,
                                                          patient=patient)
            if flagged != (DUPLICATE_BILLER in doc["blockers"]):
                moved.append(patient)
        if moved:
            await recompute(uow, practice, month, reason, now, patients=moved)
            corrected.append((practice, month))
    return corrected
