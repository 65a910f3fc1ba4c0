"""The live worklist, the audit report (JSON and CSV) and mid-month threshold alerts."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select

from ccm_billing.adapters import filed, orm
from ccm_billing.compliance.evidence import filed_decisions
from ccm_billing.domain.model import Decision, Month
from ccm_billing.service_layer import decision_cache, invoicing
from ccm_billing.service_layer.charges import billed_line
from ccm_billing.service_layer.common import SOURCE, PracticeInfo, insert_for
from ccm_billing.service_layer.decisions import decide_month
from ccm_shared.db import UnitOfWork
from ccm_shared.events import CloudEvent

FILTERS = ("all", "billable", "blocked", "near-threshold")


def worklist_row(d: dict) -> dict:
    nxt = d["nextThreshold"]
    return {
        "patient": d["patient"],
        "seconds": d["seconds"],
        "minutes": d["minutes"],
        "codes": d["codes"],
        "potentialCodes": d["potentialCodes"],
        "billable": d["billable"],
        "blockers": d["blockers"],
        "warnings": d["warnings"],
        "nextThreshold": nxt,
        "minutesToNextThreshold": nxt["minutes"] if nxt else None,
        "explanation": {
            **{k: d[k] for k in ("counted", "notCounted", "chosen", "alternatives", "notes",
                                 "ruleset", "dateOfService")},
            # Decisions filed before visits were tracked do not name one.
            "initiatingVisit": d.get("initiatingVisit"),
        },
    }


async def month_decisions(session, info: PracticeInfo, month: Month) -> tuple[str, list[dict]]:  # noqa: ANN001
    """('closed', the decisions billed at close) or ('open', live decisions: the decider's where
    current, decided now where not)."""
    if await invoicing.get_period(session, info.id, month) is not None:
        return "closed", await filed_decisions(session, info.id, str(month))
    return "open", await decision_cache.current_documents(session, info, month)


def keep(row: dict, status: str, near_minutes: int) -> bool:
    if status == "billable":
        return row["billable"]
    if status == "blocked":
        return not row["billable"]
    if status == "near-threshold":
        m = row["minutesToNextThreshold"]
        return m is not None and m <= near_minutes
    return True


async def worklist(session, info: PracticeInfo, month: Month, *, status: str = "all",  # noqa: ANN001
                   near_minutes: int = 10) -> dict:
    state, decisions = await month_decisions(session, info, month)
    rows = [worklist_row(d) for d in decisions]
    return {
        "practice": info.id,
        "month": str(month),
        "period": state,
        "filter": status,
        "count": sum(1 for r in rows if keep(r, status, near_minutes)),
        "patients": [r for r in rows if keep(r, status, near_minutes)],
    }


async def report(session, info: PracticeInfo, month: Month) -> dict:  # noqa: ANN001
    """Per patient: minutes by role, codes, amounts, blockers; totals equal the Invoice's."""
    period = await invoicing.get_period(session, info.id, month)
    invoice, charged = None, []
    if period is not None:  # closed: the decisions filed and the lines billed
        state, decisions = "closed", await filed_decisions(session, info.id, str(month))
        if period.invoice_id:
            inv = await invoicing.get_invoice_row(session, period.invoice_id, resource=False)
            invoice = invoicing.invoice_view(inv)
            ci = filed.charge_items
            charged = [billed_line(r) for r in
                       (await session.execute(select(ci).where(ci.c.invoice_id == inv.id))).all()]
    else:  # the lines a close would bill now (the decider's where current)
        state = "open"
        decisions, charged = await decision_cache.current_month(session, info, month)
    amounts = {(x.patient, x.code): (f"{x.amount:.2f}", f"{x.medicare_amount:.2f}", x.units)
               for x in charged}
    by_patient: dict[str, list[dict]] = defaultdict(list)  # each patient's lines, by code
    for (p, code), (amt, med, units) in sorted(amounts.items()):
        by_patient[p].append({"code": code, "units": units, "amount": amt, "medicareAmount": med})
    patients = []
    grand = Decimal("0.00")
    for d in decisions:
        lines = by_patient.get(d["patient"].removeprefix("Patient/"), [])
        amount = sum((Decimal(x["amount"]) for x in lines), Decimal("0.00"))
        grand += amount
        patients.append({
            "patient": d["patient"], "minutes": d["minutes"], "seconds": d["seconds"],
            "codes": d["codes"], "lines": lines, "amount": f"{amount:.2f}",
            "blockers": d["blockers"], "warnings": d["warnings"],
            "entriesCounted": len(d["counted"]), "entriesNotCounted": len(d["notCounted"]),
        })
    return {
        "practice": info.id,
        "month": str(month),
        "period": state,
        "pricing": (info.under(period.terms) if period is not None else info).pricing.get(
            "model", "per-code"),
        "invoice": invoice,
        "patients": patients,
        "totals": {
            "patients": len(patients),
            "billable": sum(1 for d in decisions if d["billable"]),
            "minutes": {
                "staff": sum(d["seconds"]["staff"] for d in decisions) // 60,
                "practitioner": sum(d["seconds"]["practitioner"] for d in decisions) // 60,
            },
            "amount": f"{grand:.2f}",
        },
    }


CSV_COLUMNS = ["patient", "staff_minutes", "practitioner_minutes", "staff_seconds",
               "practitioner_seconds", "code", "units", "medicare_amount", "amount", "blockers",
               "warnings"]


def report_csv(doc: dict) -> str:
    """One row per patient × code (a patient without codes gets one row); a TOTAL row last."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in doc["patients"]:
        common = [p["patient"], p["minutes"]["staff"], p["minutes"]["practitioner"],
                  p["seconds"]["staff"], p["seconds"]["practitioner"]]
        tail = [";".join(p["blockers"]), ";".join(p["warnings"])]
        if not p["lines"]:
            w.writerow([*common, "", "", "", "0.00", *tail])
        for line in p["lines"]:
            w.writerow([*common, line["code"], line["units"], line["medicareAmount"],
                        line["amount"], *tail])
    t = doc["totals"]
    w.writerow(["TOTAL", t["minutes"]["staff"], t["minutes"]["practitioner"], "", "", "", "", "",
                t["amount"], "", ""])
    return out.getvalue()


# -- threshold alerts ----------------------------------------------------------------------------


def alert_stage(days_left: int, alert_days: tuple[int, ...]) -> int | None:
    """The alert due at ``days_left`` days before month end: the smallest configured day ≥ it."""
    due = [d for d in sorted(alert_days) if days_left <= d]
    return due[0] if due else None


def at_risk(d: Decision) -> bool:
    """Still under the first threshold and blocked by nothing else: time can still make the
    month (one that bills G0506 alone is still short of every time code)."""
    return (d.chosen is None and d.next_threshold is not None
            and set(d.blockers) <= {"time-threshold-not-met"})


async def send_threshold_alerts(uow: UnitOfWork, info: PracticeInfo, now: datetime,
                                alert_days: tuple[int, ...]) -> int:
    """One billing.threshold.at-risk event per patient under a threshold, per alert stage."""
    today = info.today(now)
    month = Month.of(today)
    days_left = (month.last_day - today).days
    stage = alert_stage(days_left, alert_days)
    if stage is None:
        return 0
    a = orm.threshold_alerts
    sent = set(
        (await uow.session.execute(
            select(a.c.patient).where(a.c.practice == info.id, a.c.month == str(month),
                                      a.c.days_left == stage))).scalars()
    )
    count = 0
    for d in await decide_month(uow.session, info, month):
        if d.patient in sent or not at_risk(d):
            continue
        key = f"{info.id}:{d.patient}:{month}:{stage}"
        ins = insert_for(uow.session)(a).values(
            practice=info.id, month=str(month), patient=d.patient, days_left=stage, sent_at=now
        ).on_conflict_do_nothing()
        await uow.session.execute(ins)
        await uow.outbox.add("billing.threshold.at-risk.v1", CloudEvent(
            source=SOURCE, type="billing.threshold.at-risk.v1", tenant=info.id,
            subject=f"Patient/{d.patient}", time=now,
            data={
                "patient": f"Patient/{d.patient}", "month": str(month), "seconds": dict(d.seconds),
                "nextCode": d.next_threshold.code, "minutesToNext": d.next_threshold.minutes,
                "daysLeft": days_left, "billingPractitioner": d.practitioner, "idempotencyKey": key,
            },
        ))
        count += 1
    return count
