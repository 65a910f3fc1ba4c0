"""Decisions kept current during the month, so that closing a month is set-based.

The projections bump a patient's *fact generation* in the transaction that changes the patient's
facts. ``refresh`` decides every enrolled patient of a practice-month whose cached decision is
missing or no longer current — its generation, its duplicate-biller fact or the practice context
(rules data, practice options, pricing, time zone, performer roles) differ — and stores the
decision, the entries it was decided on and its priced ChargeItem lines. The generation is read
before the facts, so a change committed while a refresh runs leaves the cached decision behind its
generation: it is decided again, never used stale.

The billing scheduler refreshes open months in the background; a month close refreshes first
(whatever is still not current is decided then) and then files, prices and invoices from the
cache with set-based statements. For open months the cache is an accelerator, never a source of
truth: emptied, the close decides every patient itself and reaches the same result. A closed
month's rows are its filings and ChargeItems (adapters/filed.py): never refreshed nor dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Numeric, and_, bindparam, case, cast, delete, func, select, true
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_billing.adapters import fhir, filed, orm
from ccm_billing.compliance.evidence import entries_of
from ccm_billing.domain.model import Month
from ccm_billing.domain.rules import PROGRAMS, ruleset_for
from ccm_billing.service_layer import corrections
from ccm_billing.service_layer.charges import (
    PricedLine,
    billed_line,
    charge_item_stub,
    priced_lines,
)
from ccm_billing.service_layer.common import PracticeInfo, bulk_insert
from ccm_billing.service_layer.decisions import (
    NOT_ENROLLING,
    duplicates_statement,
    load_facts,
    practice_options,
)
from ccm_shared.db import UnitOfWork, dialect_insert, xact_lock
from ccm_shared.jsontext import compact

# Bump when a code change alters what is decided for the same facts: every cached decision then
# stops being current and is decided again.
CACHE_VERSION = "5"
CHUNK = 2000  # patients decided per round trip of fact loading


@functools.cache
def _bump_statement(dialect: str):  # noqa: ANN202
    g = orm.fact_generations
    ins = dialect_insert(dialect)(g).values(
        practice=bindparam("practice", type_=g.c.practice.type),
        patient=bindparam("patient", type_=g.c.patient.type), generation=1)
    return ins.on_conflict_do_update(index_elements=["practice", "patient"],
                                     set_={"generation": g.c.generation + 1})


async def bump_generation(uow: UnitOfWork, practice: str, patient: str | None) -> None:
    """Record that a patient's facts changed (call in the transaction that changes them)."""
    if patient:
        await uow.session.execute(_bump_statement(uow.session.bind.dialect.name),
                                  {"practice": practice, "patient": patient})


def role_columns() -> tuple:
    """The columns of a performer role the cached decisions depend on (``context_of``)."""
    r = orm.practitioner_roles
    return r.c.role_id, r.c.practitioner, r.c.classification, r.c.active


@functools.cache
def _roles_statement():  # noqa: ANN202 - built once (every refresh and close)
    r = orm.practitioner_roles
    return select(*role_columns()).where(
        r.c.practice == bindparam("practice", type_=r.c.practice.type))


async def context_key(session: AsyncSession, info: PracticeInfo, month: Month) -> str:
    """What, besides a patient's own facts, a decision and its lines depend on."""
    roles = (await session.execute(_roles_statement(), {"practice": info.id})).all()
    return context_of(info, month, [tuple(x) for x in roles])


def context_of(info: PracticeInfo, month: Month, roles: list[tuple]) -> str:
    """``context_key`` of the practice's performer roles as read (``role_columns``)."""
    # The options, not only the pricing they come from: the consent renewal interval may be the
    # service's default (an environment setting), which no practice row shows.
    parts = [CACHE_VERSION, repr(ruleset_for(month)), info.timezone,
             json.dumps(info.pricing, sort_keys=True), repr(practice_options(info)), sorted(roles)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def enrolled_query(practice: str, month: str):  # noqa: ANN201
    """Patients with time in the month or a consent on file (whom load_facts decides)."""
    t, c = orm.time_entries, orm.consents
    timed = select(t.c.patient.label("patient")).where(
        t.c.practice == practice, t.c.month == month, t.c.patient.is_not(None),
        t.c.start.is_not(None)).distinct()
    consented = select(c.c.patient).where(c.c.practice == practice, c.c.status.not_in(NOT_ENROLLING))
    return timed.union(consented)


async def _delete(session: AsyncSession, practice: str, month: str, patients: list[str],
                  everyone: bool) -> None:
    for table in (orm.month_decisions, orm.month_decision_lines):
        where = [table.c.practice == practice, table.c.month == month]
        if everyone:
            await session.execute(delete(table).where(*where))
            continue
        for i in range(0, len(patients), CHUNK):
            await session.execute(delete(table).where(*where, table.c.patient.in_(patients[i:i + CHUNK])))


@functools.cache
def _status_statement():  # noqa: ANN202 - built once (a close runs it per practice)
    g, md = orm.fact_generations, orm.month_decisions
    practice = bindparam("practice", type_=md.c.practice.type)
    month = bindparam("month", type_=md.c.month.type)
    enrolled = enrolled_query(practice, month).subquery()
    cache = select(md).where(md.c.practice == practice, md.c.month == month).subquery()
    generation = func.coalesce(g.c.generation, 0)
    # A cached patient no longer enrolled is never current (it is gone, whatever else holds).
    current = and_(cache.c.patient.is_not(None), enrolled.c.patient.is_not(None),
                   cache.c.generation == generation,
                   cache.c.context == bindparam("context", type_=md.c.context.type),
                   # The duplicate-biller fact, found in the same statement.
                   cache.c.duplicate == enrolled.c.patient.in_(
                       duplicates_statement().subquery().select()))
    every = (select(enrolled.c.patient.label("patient"), generation.label("generation"),
                    current.label("current"), cache.c.patient.label("cached"),
                    func.count(enrolled.c.patient).over().label("enrolled"))
             .select_from(enrolled.outerjoin(cache, cache.c.patient == enrolled.c.patient,
                                             full=True))
             .outerjoin(g, and_(g.c.practice == practice, g.c.patient == enrolled.c.patient))
             .subquery())
    # Only the rows that are not current come back (none once the decider has run): the count
    # of enrolled patients rides along on each.
    return (select(every.c.patient, every.c.generation, every.c.cached, every.c.enrolled)
            .where(every.c.current.is_not(true())))


async def _status(session: AsyncSession, info: PracticeInfo, m: str, context: str):  # noqa: ANN202
    """(how many patients are enrolled — 0 when all are current —, those whose cached decision
    is not current, cached patients no longer enrolled, the generation of each stale patient)
    in one pass."""
    # Generations are read here, before any fact is loaded: a fact committed after this makes
    # the decision stored from the facts not current (decided again), never current but stale.
    rows = (await session.execute(_status_statement(), {
        "practice": info.id, "month": m, "context": context})).all()
    gone = [cached for patient, _, cached, _ in rows if patient is None]
    stale = sorted(p for p, _, _, _ in rows if p is not None)
    generations = {p: gen for p, gen, _, _ in rows if p is not None}
    return (rows[0].enrolled if rows else 0), stale, gone, generations


async def _decide(session: AsyncSession, info: PracticeInfo, month: Month, stale: list[str],
                  enrolled: int):  # noqa: ANN202 - yields (facts, decisions) per chunk
    # Most of the month stale (a first pass, a new ruleset): load the practice at once.
    whole = len(stale) * 2 > enrolled
    chunks = [None] if whole else [stale[i:i + CHUNK] for i in range(0, len(stale), CHUNK)]
    wanted = set(stale)
    ruleset, options, decide = ruleset_for(month), practice_options(info), PROGRAMS["CCM"]
    for chunk in chunks:
        facts = await load_facts(session, info, month, patients=chunk)
        if whole:
            facts = [f for f in facts if f.patient in wanted]
        yield facts, [decide(f, ruleset, options) for f in facts]


async def current_documents(session: AsyncSession, info: PracticeInfo, month: Month) -> list[dict]:
    """Every enrolled patient's decision document, in patient order: the cached one where it is
    current, decided now where not (nothing is written: for reads such as the worklist)."""
    return (await current_month(session, info, month, lines=False))[0]


async def current_month(session: AsyncSession, info: PracticeInfo, month: Month, *,
                        lines: bool = True) -> tuple[list[dict], list[PricedLine]]:
    """``current_documents`` and the month's priced lines as a close would bill them now: the
    cached ones where the decision is current, priced now where it was decided now. Only the
    patients not current are decided (the open-month report decided every patient again)."""
    m = str(month)
    md, ln = orm.month_decisions, orm.month_decision_lines
    enrolled, stale, gone, _ = await _status(session, info, m, await context_key(session, info, month))
    docs, priced, left = {}, [], set(gone) | set(stale)
    async for _, decisions in _decide(session, info, month, stale, enrolled):
        docs.update((d.patient, d.to_dict()) for d in decisions)
        if lines:
            priced += priced_lines(info, month, decisions)
    for patient, decision in (await session.execute(
            select(md.c.patient, md.c.decision).where(md.c.practice == info.id, md.c.month == m))):
        if patient not in left:
            docs.setdefault(patient, json.loads(decision))
    if lines:
        priced += [billed_line(r) for r in (await session.execute(
            select(ln.c.patient, ln.c.code, ln.c.amount, ln.c.resource)
            .where(ln.c.practice == info.id, ln.c.month == m))).all() if r.patient not in left]
    return [docs[p] for p in sorted(docs)], sorted(priced, key=lambda x: (x.patient, x.code))


def decide_lock(practice: str, month: str) -> str:
    """The name of the advisory lock under which a practice-month's decisions are refreshed."""
    return f"decide:{practice}:{month}"


async def refresh(uow: UnitOfWork, info: PracticeInfo, month: Month, now: datetime, *,
                  wait: bool = True, closing: bool = False, context: str | None = None) -> int:
    """Decide the enrolled patients whose cached decision is not current; drop cached decisions
    of patients no longer enrolled. Returns how many patients were decided. Raises InvalidInput
    when the practice's contract cannot price a billable line. ``wait`` False: skip (0) when
    another refresh of the practice-month is running (the decider on several replicas).
    ``closing``: called by the month's close, which holds the practice and has found the month
    open (not checked again). ``context``: its ``context_key``, when the caller has read it."""
    session, m = uow.session, str(month)
    # One refresh of a practice-month at a time (the decider's, a replica's, a close's).
    if not await xact_lock(session, decide_lock(info.id, m), wait=wait):
        return 0
    if not closing and await corrections.is_closed(session, info.id, m):
        return 0  # closed: its rows are its filings now (adapters/filed.py), never refreshed
    if context is None:
        context = await context_key(session, info, month)
    enrolled, stale, gone, generations = await _status(session, info, m, context)
    if not stale and not gone:
        return 0
    everyone = len(stale) == enrolled
    await _delete(session, info.id, m, stale + gone, everyone)
    async for facts, decisions in _decide(session, info, month, stale, enrolled):
        await _store(session, info, month, facts, decisions, generations, context, now)
    return len(stale)


async def _store(session: AsyncSession, info: PracticeInfo, month: Month, facts: list,
                 decisions: list, generations: dict, context: str, now: datetime) -> None:
    m = str(month)
    rows = []
    for f, d in zip(facts, decisions, strict=True):
        rows.append({
            "practice": info.id, "month": m, "patient": d.patient,
            "generation": generations.get(d.patient, 0), "context": context,
            "duplicate": f.duplicate_biller, "billable": d.billable,
            "codes": compact(dict(sorted(d.codes.items()))),
            "blockers": compact(list(d.blockers)),
            "staff_seconds": d.seconds["staff"], "practitioner_seconds": d.seconds["practitioner"],
            "decision": compact(d.to_dict()),
            "entries": compact(entries_of(f)),
            "decided_at": now,
        })
    lines = []
    for line in priced_lines(info, month, decisions):
        ci_id, stub = charge_item_stub(info.id, month, line, revision=0)
        lines.append({"practice": info.id, "month": m, "patient": line.patient, "code": line.code,
                      "charge_item_id": ci_id, "amount": f"{line.amount:.2f}", "resource": stub})
    await bulk_insert(session, orm.month_decisions, rows)
    await bulk_insert(session, orm.month_decision_lines, lines)


# How the decider writes a line's amount (``f"{amount:.2f}"``), which PostgreSQL enforces
# (billing_0015's check): an optional minus, at most 13 integer digits, two decimals.
AMOUNT_FORM = r"^-?(0|[1-9][0-9]{0,12})[.][0-9]{2}$"


@functools.cache
def _invoice_lines_statement():  # noqa: ANN202 - built once (a close runs it per practice)
    ln = orm.month_decision_lines
    # The amount as JSON, as ``fhir.line_items`` writes it (``repr(float(Decimal(amount)))``):
    # for an amount of AMOUNT_FORM, its text less a final zero ("12.30" → 12.3, "5.00" → 5.0,
    # "12.34" → 12.34). Under 10 ** 13 such a decimal has at most 15 significant digits, so it
    # is the shortest text of its float, which is what repr writes.
    value = case((func.right(ln.c.amount, 1) == "0", func.left(ln.c.amount, -1)), else_=ln.c.amount)
    return select(
        func.count(), func.sum(cast(ln.c.amount, Numeric)),
        func.array_agg(postgresql.aggregate_order_by(  # code points, as Python sorts
            ln.c.charge_item_id + " " + value, ln.c.patient.collate("C"), ln.c.code.collate("C"))),
    ).where(ln.c.practice == bindparam("practice", type_=ln.c.practice.type),
            ln.c.month == bindparam("month", type_=ln.c.month.type))


async def invoice_lines(session: AsyncSession, practice: str, month: str, *,
                        aggregated: bool = True) -> fhir.InvoiceLines:
    """The month's cached ChargeItem lines, in (patient, code) order, as the Invoice has them.

    On PostgreSQL the database orders the lines, sums them and writes each amount's JSON, and
    sends them as one array: a close's Python then formats one string per line instead of
    reading a row and a Decimal per line (1,780 lines for 1,000 patients). Its check
    (billing_0015) holds every amount to AMOUNT_FORM. ``aggregated`` False, or on SQLite: read
    here (the same result; a test compares the two)."""
    if aggregated and session.bind.dialect.name == "postgresql":
        count, total, pairs = (await session.execute(
            _invoice_lines_statement(), {"practice": practice, "month": month})).one()
        if not count:
            return fhir.InvoiceLines.of([])
        return fhir.InvoiceLines(
            fhir.valued_line_items(pair.split(" ", 1) for pair in pairs), count, total)
    ln = orm.month_decision_lines
    rows = sorted(tuple(r) for r in (await session.execute(
        select(ln.c.patient, ln.c.code, ln.c.charge_item_id, ln.c.amount)
        .where(ln.c.practice == practice, ln.c.month == month))).all())
    return fhir.InvoiceLines.of([(item, Decimal(amount)) for _, _, item, amount in rows])


async def forget_months_except(uow: UnitOfWork, practice: str, keep: list[str]) -> None:
    """Drop the practice's cached decisions of every month but ``keep`` and those closed in place
    (their filings: adapters/filed.py); a month closed late decides its patients at close.

    Holds the practice shared, as the projections do, exclusive to a close: a month being closed
    (and so filed in place) is seen closed here once its close commits, never forgotten under
    the close's feet."""
    await corrections.hold_practice(uow.session, practice, exclusive=False)
    for table in (orm.month_decisions, orm.month_decision_lines):
        await uow.session.execute(
            delete(table).where(table.c.practice == practice, table.c.month.not_in(keep),
                                table.c.month.not_in(filed.filed_months(practice))))
