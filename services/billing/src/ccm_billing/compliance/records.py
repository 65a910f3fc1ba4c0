"""Reading the compliance records: consent tracker, time log per patient-month, audit packet.

All of it comes from billing's own tables (projections, filings, source versions, reviews,
ChargeItems and Invoices) and the platform's audit log; nothing is asked of another service.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, date, datetime, time

from sqlalchemy import select, union
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_billing.adapters import filed, orm
from ccm_billing.compliance import domain
from ccm_billing.compliance.evidence import entries_of
from ccm_billing.domain.model import Month
from ccm_billing.service_layer.common import PracticeInfo, consent_renewal_months
from ccm_billing.service_layer.decisions import decide_month_with_facts
from ccm_shared.audit import as_fhir_audit_event, audit_log
from ccm_shared.errors import NotFound

MAX_MONTHS = 36


def _iso(value) -> str | None:  # noqa: ANN001
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    return value.isoformat()


def _source_view(row) -> dict:  # noqa: ANN001
    return {
        "resourceType": row.resource_type, "id": row.resource_id, "versionId": row.version_id,
        "lastUpdated": _iso(row.last_updated), "sha256": row.sha256,
        "receivedAt": _iso(row.received_at), "connection": row.connection,
        "event": row.event_type, "recordedAt": _iso(row.recorded_at),
    }


def _version_order(row) -> tuple:  # noqa: ANN001
    vid = row.version_id
    return (_utc(row.last_updated), vid.zfill(20) if vid.isdigit() else vid)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def source_versions(session: AsyncSession, practice: str, *, patient: str | None = None,
                          resource_type: str | None = None) -> list:
    s = orm.source_versions
    stmt = select(s).where(s.c.practice == practice)
    if patient is not None:
        stmt = stmt.where(s.c.patient == patient)
    if resource_type is not None:
        stmt = stmt.where(s.c.resource_type == resource_type)
    return sorted((await session.execute(stmt)).all(), key=_version_order)


# -- consents --------------------------------------------------------------------------------------


async def consent_facts(session: AsyncSession, info: PracticeInfo, *, patient: str | None = None
                        ) -> dict[str, list[tuple[domain.ConsentFact, object]]]:
    """Per patient: each consent's newest version (as billing projects it) and its source row."""
    c = orm.consents
    stmt = select(c).where(c.c.practice == info.id)
    if patient is not None:
        stmt = stmt.where(c.c.patient == patient)
    latest: dict[str, object] = {}
    for row in await source_versions(session, info.id, patient=patient, resource_type="Consent"):
        latest[row.resource_id] = row  # sorted oldest first: the last one wins
    out: dict[str, list] = defaultdict(list)
    for row in (await session.execute(stmt)).all():
        src = latest.get(row.consent_id)
        method = json.loads(src.data).get("method", "unknown") if src is not None else "unknown"
        obtained = row.obtained_at
        fact = domain.ConsentFact(
            consent_id=row.consent_id, status=row.status, provision=row.provision,
            obtained_on=_utc(obtained).astimezone(info.tz).date() if obtained else None,
            effective_until=row.effective_until, method=method,
            valid_from=row.valid_from, valid_until=row.valid_until,
        )
        out[row.patient].append((fact, src))
    return out


async def enrolled_patients(session: AsyncSession, practice: str) -> dict[str, str | None]:
    """Patients billing knows for the practice (active Patient, a consent, or time) → MBI."""
    p, c, t = orm.patients, orm.consents, orm.time_entries
    known = union(
        select(p.c.patient_id.label("patient")).where(p.c.practice == practice, p.c.active.is_(True)),
        select(c.c.patient).where(c.c.practice == practice),
        select(t.c.patient).where(t.c.practice == practice, t.c.patient.is_not(None)),
    ).subquery()
    mbis = dict((await session.execute(
        select(p.c.patient_id, p.c.mbi).where(p.c.practice == practice))).all())
    return {r[0]: mbis.get(r[0]) for r in (await session.execute(select(known.c.patient))).all()}


def consent_view(fact: domain.ConsentFact, src) -> dict:  # noqa: ANN001
    return {
        "consent": f"Consent/{fact.consent_id}", "status": fact.status, "provision": fact.provision,
        "method": fact.method, "obtainedOn": _iso(fact.obtained_on),
        "effectiveUntil": _iso(fact.effective_until),
        "source": _source_view(src) if src is not None else None,
    }


async def consent_tracker(session: AsyncSession, info: PracticeInfo, *, states: set[str],
                          today: date, renewal: int | None, within_days: int) -> list[dict]:
    """One row per patient in one of ``states``, most urgent first."""
    patients = await enrolled_patients(session, info.id)
    facts = await consent_facts(session, info)
    rows = []
    for patient in sorted(patients):
        entries = facts.get(patient, [])
        st = domain.standing([f for f, _ in entries], today, renewal_months=renewal,
                             within_days=within_days)
        if st.state not in states:
            continue
        src = next((s for f, s in entries if st.consent is not None and f == st.consent), None)
        rows.append({
            "patient": f"Patient/{patient}", "mbi": patients[patient], "state": st.state,
            "expiresOn": _iso(st.expires_on), "daysLeft": st.days_left,
            **(consent_view(st.consent, src) if st.consent else {"consent": None}),
        })
    order = {s: i for i, s in enumerate(domain.ATTENTION + ("active",))}
    return sorted(rows, key=lambda r: (order[r["state"]], r["daysLeft"] if r["daysLeft"] is not None
                                       else 10**6, r["patient"]))


TRACKER_CSV_COLUMNS = ("patient", "mbi", "state", "consent", "status", "provision", "method",
                       "obtainedOn", "effectiveUntil", "expiresOn", "daysLeft", "versionId", "sha256")


def tracker_csv_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        src = r.get("source") or {}
        out.append([r["patient"], r["mbi"] or "", r["state"], r.get("consent") or "",
                    r.get("status", ""), r.get("provision", ""), r.get("method", ""),
                    r.get("obtainedOn") or "", r.get("effectiveUntil") or "", r["expiresOn"] or "",
                    "" if r["daysLeft"] is None else r["daysLeft"], src.get("versionId", ""),
                    src.get("sha256", "")])
    return out


# -- time log --------------------------------------------------------------------------------------


async def require_patient(session: AsyncSession, practice: str, patient: str) -> str | None:
    """The patient's MBI; NotFound when billing knows no such patient in this practice."""
    p, c, t = orm.patients, orm.consents, orm.time_entries
    row = (await session.execute(select(p.c.mbi).where(p.c.practice == practice,
                                                        p.c.patient_id == patient))).first()
    if row is not None:
        return row.mbi
    for table, key in ((c, c.c.patient), (t, t.c.patient)):
        if (await session.execute(select(key).where(table.c.practice == practice, key == patient)
                                  .limit(1))).first() is not None:
            return None
    raise NotFound(f"patient {patient!r} not found")


def _month_bounds(info: PracticeInfo, month: Month) -> tuple[datetime, datetime]:
    start = datetime.combine(month.first_day, time(), info.tz)
    end = datetime.combine(month.next().first_day, time(), info.tz)
    return start.astimezone(UTC), end.astimezone(UTC)


async def time_log(session: AsyncSession, info: PracticeInfo, patient: str, month: Month, *,
                   encounters: list | None = None) -> dict:
    """The patient-month's time entries as filed at close (or live while open), with corrections."""
    f, per, t = filed.filings, orm.billing_periods, orm.time_entries
    period = (await session.execute(select(per.c.closed_at).where(
        per.c.practice == info.id, per.c.month == str(month)))).first()
    filings = (await session.execute(
        select(f).where(f.c.practice == info.id, f.c.patient == patient, f.c.month == str(month))
        .order_by(f.c.revision))).all()
    if encounters is None:
        encounters = await source_versions(session, info.id, patient=patient,
                                           resource_type="Encounter")
    versions: dict[str, list] = defaultdict(list)
    for row in encounters:
        versions[row.resource_id].append(row)
    projected = {r.entry_id: r for r in (await session.execute(
        select(t.c.entry_id, t.c.late, t.c.status).where(
            t.c.practice == info.id, t.c.patient == patient, t.c.month == str(month)))).all()}
    if filings:
        current = filings[-1]
        decision = json.loads(current.decision)
        entries = json.loads(current.entries)
        filed_at = _utc(filings[0].filed_at)
        status = "closed"
    else:
        facts, decisions = await decide_month_with_facts(session, info, month, patient=patient)
        decision = decisions[0].to_dict() if decisions else None
        entries = [e for fm in facts for e in entries_of(fm)]
        filed_at = None
        status = "closed" if period is not None else "open"
    counted = set((decision or {}).get("counted", []))
    why = {n["entry"].removeprefix("Encounter/"): n["reason"]
           for n in (decision or {}).get("notCounted", [])}
    rows, seen = [], set()
    for e in entries:
        seen.add(e["entry"])
        rows.append(_entry_row(e, versions.get(e["entry"], []), filed_at,
                               e["entry"] in counted, why.get(e["entry"])))
    for entry_id, p in sorted(projected.items()):  # logged after the last filing
        if entry_id in seen:
            continue
        rows.append(_entry_row({"entry": entry_id, "seconds": None, "start": None, "role": None,
                                "status": p.status, "practitioner": None, "late": p.late},
                               versions.get(entry_id, []), filed_at, False,
                               "logged-after-close" if p.late else "not-yet-decided"))
    rows.sort(key=lambda r: (r["start"] or "", r["entry"]))
    return {
        "patient": f"Patient/{patient}", "month": str(month), "status": status,
        "lockedAt": _iso(filed_at), "closedAt": _iso(period.closed_at) if period else None,
        "entries": rows,
        "totals": {
            "countedSeconds": sum(r["seconds"] or 0 for r in rows if r["counted"]),
            "countedMinutes": sum(r["seconds"] or 0 for r in rows if r["counted"]) // 60,
        },
        "decision": decision,
        "filings": [_filing_view(x, filings[i - 1] if i else None) for i, x in enumerate(filings)],
    }


def _entry_row(e: dict, versions: list, filed_at: datetime | None, counted: bool,
               reason: str | None) -> dict:
    as_filed = [v for v in versions if filed_at is None or _utc(v.recorded_at) <= filed_at]
    later = [v for v in versions if filed_at is not None and _utc(v.recorded_at) > filed_at]
    source = as_filed[-1] if as_filed else (versions[-1] if versions else None)
    seconds = e["seconds"]
    return {
        "entry": e["entry"], "start": e["start"], "status": e["status"],
        "performer": e["practitioner"], "role": e["role"],
        "seconds": seconds, "minutes": None if seconds is None else round(seconds / 60, 2),
        "counted": counted, "reason": None if counted else reason,
        "source": _source_view(source) if source is not None else None,
        "corrections": [_source_view(v) for v in later],  # versions received after the lock
    }


def _filing_view(row, before) -> dict:  # noqa: ANN001
    doc = json.loads(row.decision) or {}
    view = {"revision": row.revision, "filedAt": _iso(row.filed_at), "reason": row.reason,
            "codes": doc.get("codes", {}), "billable": doc.get("billable", False),
            "counted": doc.get("counted", [])}
    if before is not None:
        prev = json.loads(before.decision) or {}
        view["countedAdded"] = sorted(set(view["counted"]) - set(prev.get("counted", [])))
        view["countedRemoved"] = sorted(set(prev.get("counted", [])) - set(view["counted"]))
        view["codesBefore"] = prev.get("codes", {})
    return view


# -- audit packet ----------------------------------------------------------------------------------


def months_between(first: Month, last: Month) -> list[Month]:
    out, m = [], first
    while m <= last:
        out.append(m)
        m = m.next()
    return out


def _local_day(info: PracticeInfo, value: datetime) -> date:
    return _utc(value).astimezone(info.tz).date()


async def audit_packet(session: AsyncSession, info: PracticeInfo, patient: str, first: Month,
                       last: Month, *, now: datetime, renewal: int | None) -> dict:
    """Everything an auditor asks about a patient for each month of the range (one document)."""
    mbi = await require_patient(session, info.id, patient)
    months = months_between(first, last)
    sources = await source_versions(session, info.id, patient=patient)
    by_type: dict[str, list] = defaultdict(list)
    for row in sources:
        by_type[row.resource_type].append(row)
    consents = (await consent_facts(session, info, patient=patient)).get(patient, [])
    rv, ci, inv = orm.care_plan_reviews, filed.charge_items, orm.invoices
    reviews = (await session.execute(select(rv).where(rv.c.practice == info.id,
                                                      rv.c.patient == patient)
                                     .order_by(rv.c.completed_at))).all()
    items = (await session.execute(select(ci).where(
        ci.c.practice == info.id, ci.c.patient == patient,
        ci.c.month.between(str(first), str(last))).order_by(ci.c.month, ci.c.id))).all()
    invoice_ids = sorted({r.invoice_id for r in items})
    invoices = {r.id: r for r in (await session.execute(
        select(inv).where(inv.c.practice == info.id, inv.c.id.in_(invoice_ids)))).all()}
    documents = dict(zip(invoices, await filed.invoice_resources(session, list(invoices.values())),
                         strict=True))
    start, _ = _month_bounds(info, first)
    _, end = _month_bounds(info, last)
    audit_rows = (await session.execute(
        select(audit_log).where(audit_log.c.practice == info.id, audit_log.c.patient == patient,
                                audit_log.c.recorded_at >= start, audit_log.c.recorded_at < end)
        .order_by(audit_log.c.id))).all()
    # A closed month is judged under the interval it was billed under (kept in its terms), not
    # today's: the practice's pricing or the service default may have changed since.
    bp = orm.billing_periods
    terms = dict((await session.execute(select(bp.c.month, bp.c.terms).where(
        bp.c.practice == info.id, bp.c.month.between(str(first), str(last)),
        bp.c.terms.is_not(None)))).all())
    sections = []
    for month in months:
        kept = terms.get(str(month))
        sections.append(await _month_section(
            session, info, patient, month, by_type, consents, reviews,
            [r for r in items if r.month == str(month)], invoices, documents,
            consent_renewal_months(info.under(kept)) if kept else renewal))
    return {
        "practice": {"id": info.id, "name": info.name, "timezone": info.timezone},
        "patient": {"id": patient, "mbi": mbi},
        "from": str(first), "to": str(last), "generatedAt": _iso(now),
        "consentRenewalMonths": renewal,
        "months": sections,
        "invoices": documents,
        "auditEvents": [as_fhir_audit_event(r) for r in audit_rows],
    }


def _in_force_versions(info: PracticeInfo, versions: list, month: Month) -> list:
    """The version current at the month's start and every version made during the month."""
    before = [v for v in versions if _local_day(info, v.last_updated) < month.first_day]
    during = [v for v in versions if month.contains(_local_day(info, v.last_updated))]
    return ([before[-1]] if before else []) + during


async def _month_section(session, info, patient, month, by_type, consents, reviews, items,  # noqa: ANN001, PLR0913
                         invoices, documents, renewal) -> dict:
    log = await time_log(session, info, patient, month, encounters=by_type.get("Encounter", []))
    consent_rows = []
    for fact, src in consents:
        ok, note = domain.in_force(fact, month, renewal_months=renewal)
        if fact.obtained_on is not None and fact.obtained_on > month.last_day and not ok:
            continue  # not yet obtained: belongs to a later month
        consent_rows.append({**consent_view(fact, src), "inForce": ok, "note": note})
    plans: dict[str, list] = defaultdict(list)
    for row in by_type.get("CarePlan", []):
        plans[row.resource_id].append(row)
    care_plans = []
    for plan_id, versions in sorted(plans.items()):
        shown = _in_force_versions(info, versions, month)
        if not shown:
            continue
        care_plans.append({"carePlan": f"CarePlan/{plan_id}", "versions": [
            {**_source_view(v), **_plan_fields(json.loads(v.data))} for v in shown]})
    month_reviews = [
        {"carePlan": f"CarePlan/{r.care_plan_id}", "tracker": r.tracker,
         "dueDate": _iso(r.due_date), "completedAt": _iso(r.completed_at),
         "daysOverdue": r.days_overdue, "responsibleProvider": r.responsible_provider,
         "supervisor": r.supervisor}
        for r in reviews if month.contains(_local_day(info, r.completed_at))
    ]
    lines = []
    for item in items:
        invoice = invoices.get(item.invoice_id)
        resource = documents.get(item.invoice_id, {})
        line = next((x for x in resource.get("lineItem", [])
                     if x["chargeItemReference"]["reference"] == f"ChargeItem/{item.id}"), None)
        # The row's status is authoritative (a cancelled Invoice's items are entered-in-error).
        lines.append({"chargeItem": {**json.loads(item.resource), "status": item.status},
                      "status": item.status,
                      "code": item.code, "amount": item.amount, "invoice": item.invoice_id,
                      "invoiceStatus": invoice.status if invoice else None,
                      "invoiceRevision": invoice.revision if invoice else None,
                      "invoiceLine": line})
    referenced = {("Encounter", e["entry"]) for e in log["entries"]}
    initiating = _initiating_visit(log["decision"], by_type.get("Encounter", []))
    if initiating:  # the visit that initiated the CCM billed (and G0506, if billed with it)
        referenced.add(("Encounter", initiating["encounter"]))
    referenced |= {("Consent", c["consent"].split("/", 1)[1]) for c in consent_rows}
    referenced |= {("CarePlan", p["carePlan"].split("/", 1)[1]) for p in care_plans}
    shown_sources = []
    for kind in ("Patient", "Consent", "Condition"):
        for row in by_type.get(kind, []):
            if kind == "Consent" and (kind, row.resource_id) not in referenced:
                continue
            if _local_day(info, row.last_updated) > month.last_day:
                # A later version counts only for a consent, and only its newest (a revocation
                # or a void decides whether it was in force).
                newest = [v for v in by_type[kind] if v.resource_id == row.resource_id][-1]
                if kind != "Consent" or row is not newest:
                    continue
            shown_sources.append(_source_view(row))
    shown_sources += [{k: v for k, v in x.items() if k not in PLAN_FIELDS}
                      for p in care_plans for x in p["versions"]]
    shown_sources += [_source_view(row) for row in by_type.get("Encounter", [])
                      if ("Encounter", row.resource_id) in referenced]
    return {
        "month": str(month), "status": log["status"], "closedAt": log["closedAt"],
        "consents": consent_rows, "consentRenewalMonths": renewal, "timeLog": log,
        "carePlans": care_plans,
        "reviews": month_reviews, "decision": log["decision"], "filings": log["filings"],
        "charges": lines, "sources": shown_sources, "initiatingVisit": initiating,
    }


def _initiating_visit(decision: dict | None, encounters: list) -> dict | None:
    """The initiating visit the decision names, as its newest recorded version describes it."""
    named = (decision or {}).get("initiatingVisit")
    if not named:
        return None
    vid = named["encounter"].removeprefix("Encounter/")
    recorded = [r for r in encounters
                if r.resource_id == vid and r.event_type == "ingest.visit.recorded.v1"]
    data = json.loads(recorded[-1].data) if recorded else {}
    return {"encounter": vid, "date": named["date"], "codes": data.get("codes") or [],
            "performers": [p.get("practitioner") or p.get("practitionerRole")
                           for p in data.get("performers") or []
                           if p.get("practitioner") or p.get("practitionerRole")]}


PLAN_FIELDS = ("status", "intent", "created", "review")


def _plan_fields(data: dict) -> dict:
    return {"status": data.get("status"), "intent": data.get("intent"),
            "created": data.get("created"), "review": data.get("review")}
