"""What a closed month filed, wherever it is stored: its decision filings and its ChargeItems.

A month close files in place (``invoicing.close_period``): the decisions the decider keeps current
during the month (``month_decisions``) become the month's revision-0 filings, and its priced
lines (``month_decision_lines``) the ChargeItems of its first Invoice, instead of being copied
(about 250 MB per 100,000 patients, which made most of a close's time). From then on those rows
are records: the decider never refreshes or forgets a closed month's rows. Corrections add
revisions to ``decision_filings`` and reissued ChargeItems to ``charge_items``; cancelling the
first Invoice copies its ChargeItems into ``charge_items`` before marking them entered-in-error.
Months closed before billing_0009 keep everything in ``decision_filings`` and ``charge_items``.

``filings`` and ``charge_items`` are the union of both places, with the tables' own columns:
read filings and ChargeItems through them, never through the tables. An Invoice's lines are
filed in place too (billing_0016): ``invoice_resource`` reads an Invoice whole.
"""

from __future__ import annotations

import functools
import json
from decimal import Decimal

from sqlalchemy import (
    Integer,
    Text,
    and_,
    bindparam,
    func,
    insert,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_billing.adapters import fhir, orm

_md, _ln, _p = orm.month_decisions, orm.month_decision_lines, orm.billing_periods


def _in_place(table):  # noqa: ANN001, ANN202 - the periods a cache table's rows are filed by
    return and_(_p.c.practice == table.c.practice, _p.c.month == table.c.month)


_filed_decisions = (
    select(_md.c.practice, _md.c.patient, _md.c.month, literal(0, Integer).label("revision"),
           _p.c.closed_at.label("filed_at"), literal("closed", Text).label("reason"),
           _md.c.decision, _md.c.entries)
    .join_from(_md, _p, _in_place(_md)).where(_p.c.filed_in_place)
)

_line_items = (
    select(_ln.c.charge_item_id.label("id"), _ln.c.practice, _p.c.line_invoice.label("invoice_id"),
           _ln.c.patient, _ln.c.month, _ln.c.code, literal("billable", Text).label("status"),
           _ln.c.amount,
           (func.substr(_ln.c.resource, 1, func.length(_ln.c.resource) - 1, type_=Text)
            + _p.c.line_entered).label("resource"),
           # Unchanged since the close issued it (a change materialises it first).
           literal(1, Integer).label("version_id"), _p.c.closed_at.label("last_updated"))
    .join_from(_ln, _p, _in_place(_ln)).where(_p.c.line_invoice.is_not(None))
)

filings = union_all(select(*orm.decision_filings.c), _filed_decisions).subquery("filings")
charge_items = union_all(select(*orm.charge_items.c), _line_items).subquery("charge_items_filed")


def filed_months(practice: str):  # noqa: ANN201
    """The practice's months closed in place (whose cached rows are records)."""
    return select(_p.c.month).where(_p.c.practice == practice, _p.c.filed_in_place)


async def materialise_line_items(session: AsyncSession, invoice_id: str) -> None:
    """Copy the ChargeItems of ``invoice_id`` served in place into ``charge_items`` (before they
    change: a cancelled Invoice's ChargeItems become entered-in-error) and serve them from there."""
    items = _line_items.where(_p.c.line_invoice == invoice_id)
    await session.execute(insert(orm.charge_items).from_select(
        [c.name for c in orm.charge_items.c], items))
    await session.execute(update(_p).where(_p.c.line_invoice == invoice_id).values(
        line_invoice=None, line_entered=None))


@functools.cache
def _filed_lines_statement():  # noqa: ANN202 - built once
    ci = charge_items
    return select(ci.c.invoice_id, ci.c.patient, ci.c.code, ci.c.id, ci.c.amount).where(
        ci.c.invoice_id.in_(bindparam("invoices", expanding=True)))


async def invoice_resource(session: AsyncSession, row) -> dict:  # noqa: ANN001
    """The FHIR Invoice of an ``invoices`` row (with ``resource`` and ``lines_in_place``): as
    stored, with its ``lineItem`` from its ChargeItems where it is filed in place, in (patient,
    code) order as at issue."""
    return (await invoice_resources(session, [row]))[0]


async def invoice_resources(session: AsyncSession, rows: list,
                            documents: list[dict] | None = None) -> list[dict]:
    """``invoice_resource`` of each row, in order, with one read of the lines of them all;
    ``documents``: the rows' ``resource`` already parsed."""
    if documents is None:
        documents = [json.loads(row.resource) for row in rows]
    in_place = [row.id for row in rows if row.lines_in_place]
    if not in_place:
        return documents
    lines: dict[str, list[tuple]] = {i: [] for i in in_place}
    for invoice, *line in (await session.execute(_filed_lines_statement(),
                                                 {"invoices": in_place})).all():
        lines[invoice].append(tuple(line))
    return [fhir.with_line_items(stored, fhir.InvoiceLines.of(
                [(item, Decimal(amount)) for _, _, item, amount in sorted(lines[row.id])]))
            if row.lines_in_place else stored
            for row, stored in zip(rows, documents, strict=True)]
