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
from ccm_billing.compliance import domain, judged
from ccm_billing.compliance.evidence import entries_of
from ccm_billing.domain.model import CONSENT_MISSING, CONSENT_NOT_ACTIVE, Month
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
    """The patient-month's time entries as locked at close (or live while open). Each entry is
    shown as the close filed it (status, seconds, counted or why not); what came later is shown
    as the correction it is: the source version received after the lock and the filing that
    took it in."""
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
    # Each filing's record of every entry, revision by revision (revision 0 is the lock).
    filed_states = [_entry_states(x) for x in filings]
    if filings:
        decision = json.loads(filings[-1].decision)
        locked_entries = json.loads(filings[0].entries)
        filed_at = _utc(filings[0].filed_at)
        status = "closed"
    else:
        facts, decisions = await decide_month_with_facts(session, info, month, patient=patient)
        decision = decisions[0].to_dict() if decisions else None
        locked_entries = [e for fm in facts for e in entries_of(fm)]
        filed_states = [_entry_states(None, decision, locked_entries)]
        filed_at = None
        status = "closed" if period is not None else "open"
    rows, seen = [], set()
    later_filings = list(zip(filings[1:], filed_states[1:], filed_states[:-1], strict=True))
    for e in locked_entries:
        seen.add(e["entry"])
        counted, reason = filed_states[0][e["entry"]][1:3]
        rows.append(_entry_row(e, versions.get(e["entry"], []), filed_at, counted, reason,
                               later_filings, locked=filed_at is not None))
    # Entries the lock did not hold: filed by a later correction (as its newest filing records
    # them), or projected after the last filing (logged after close, or not decided yet).
    for entry_id in sorted({k for states in filed_states[1:] for k in states} - seen):
        newest = next(states[entry_id] for states in reversed(filed_states) if entry_id in states)
        e, counted, reason = newest
        seen.add(entry_id)
        rows.append(_entry_row(e, versions.get(entry_id, []), None, counted, reason, [],
                               locked=False))
    for entry_id, p in sorted(projected.items()):
        if entry_id in seen:
            continue
        rows.append(_entry_row({"entry": entry_id, "seconds": None, "start": None, "role": None,
                                "status": p.status, "practitioner": None, "late": p.late},
                               versions.get(entry_id, []), None, False,
                               "logged-after-close" if p.late else "not-yet-decided", [],
                               locked=False))
    rows.sort(key=lambda r: (r["start"] or "", r["entry"]))
    counted_seconds = sum(r["seconds"] or 0 for r in rows if r["counted"])
    log = {
        "patient": f"Patient/{patient}", "month": str(month), "status": status,
        "lockedAt": _iso(filed_at), "closedAt": _iso(period.closed_at) if period else None,
        "entries": rows,
        # As locked at close (live while open); after corrections, the newest filing's below.
        "totals": {"countedSeconds": counted_seconds, "countedMinutes": counted_seconds // 60},
        "decision": decision,
        "filings": [_filing_view(x, filings[i - 1] if i else None) for i, x in enumerate(filings)],
    }
    if len(filings) > 1:
        now = sum((decision or {}).get("seconds", {}).values())
        log["totalsAfterCorrections"] = {
            "revision": filings[-1].revision, "filedAt": _iso(filings[-1].filed_at),
            "countedSeconds": now, "countedMinutes": now // 60}
    return log


def _entry_states(filing, decision: dict | None = None, entries: list | None = None) -> dict:
    """entry id → (the entry as filed, counted, why not) in one filing (or a live decision)."""
    if filing is not None:
        decision, entries = json.loads(filing.decision), json.loads(filing.entries)
    counted = set((decision or {}).get("counted", []))
    why = {n["entry"].removeprefix("Encounter/"): n["reason"]
           for n in (decision or {}).get("notCounted", [])}
    return {e["entry"]: (e, e["entry"] in counted,
                         None if e["entry"] in counted else why.get(e["entry"]))
            for e in entries or []}


def _state(e: dict | None, counted: bool, reason: str | None) -> tuple:
    """What a filing says of an entry that a correction can change."""
    if e is None:
        return (None,)
    return (e["status"], e["seconds"], e["start"], e["role"], e["practitioner"], counted, reason)


def _version_change(row) -> dict:  # noqa: ANN001 - a source version of the Encounter
    """What a version received after the lock says the entry became."""
    data = json.loads(row.data)
    if row.event_type.endswith(".reversed.v1"):
        return {"status": data.get("reason"), "seconds": None}
    if row.event_type == "ingest.time-entry.logged.v1":
        return {"status": "finished", "seconds": data.get("seconds")}
    return {"status": None, "seconds": None}  # a visit: no time of its own


def _entry_row(e: dict, versions: list, filed_at: datetime | None, counted: bool,
               reason: str | None, later_filings: list, *, locked: bool) -> dict:
    """One entry: as filed at ``filed_at`` (the lock), and each version received after it as a
    correction, with the filing (revision) that took it in and what that filing recorded."""
    as_filed = [v for v in versions if filed_at is None or _utc(v.recorded_at) <= filed_at]
    later = [v for v in versions if filed_at is not None and _utc(v.recorded_at) > filed_at]
    source = as_filed[-1] if as_filed else (versions[-1] if versions else None)
    seconds = e["seconds"]
    corrections = []
    for i, v in enumerate(later):
        until = _utc(later[i + 1].recorded_at) if i + 1 < len(later) else None
        took = next(((filing, states) for filing, states, before in later_filings
                     if _utc(filing.filed_at) >= _utc(v.recorded_at)
                     and (until is None or _utc(filing.filed_at) < until)
                     and _state(*states.get(e["entry"], (None, False, None)))
                     != _state(*before.get(e["entry"], (None, False, None)))), None)
        correction = {**_source_view(v), **_version_change(v), "filing": None}
        if took is not None:
            filing, states = took
            now_e, now_counted, now_reason = states.get(e["entry"], (None, False, None))
            correction["filing"] = {
                "revision": filing.revision, "filedAt": _iso(filing.filed_at),
                "reason": filing.reason,
                "status": now_e["status"] if now_e else None,
                "seconds": now_e["seconds"] if now_e else None,
                "counted": now_counted, "notCountedReason": now_reason,
                "inMonth": now_e is not None}
        corrections.append(correction)
    return {
        "entry": e["entry"], "start": e["start"], "status": e["status"],
        "performer": e["practitioner"], "role": e["role"],
        "seconds": seconds, "minutes": None if seconds is None else round(seconds / 60, 2),
        "counted": counted, "reason": None if counted else reason,
        "locked": locked,  # as the close filed it (False: open month, or not in the lock)
        "source": _source_view(source) if source is not None else None,
        "corrections": corrections,  # versions received after the lock, and what they changed
    }


def _filing_view(row, before) -> dict:  # noqa: ANN001
    doc = json.loads(row.decision) or {}
    view = {"revision": row.revision, "filedAt": _iso(row.filed_at), "reason": row.reason,
            "codes": doc.get("codes", {}), "billable": doc.get("billable", False),
            "counted": doc.get("counted", []), "blockers": doc.get("blockers", []),
            "warnings": doc.get("warnings", [])}
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
    audit_rows, acts = await _audit_trail(session, info, patient, months)
    # A closed month is judged under the interval it was billed under (kept in its terms), not
    # today's: the practice's pricing or the service default may have changed since.
    bp = orm.billing_periods
    terms = dict((await session.execute(select(bp.c.month, bp.c.terms).where(
        bp.c.practice == info.id, bp.c.month.between(str(first), str(last)),
        bp.c.terms.is_not(None)))).all())
    history = {kind: await _history(session, info.id, patient, kind)
               for kind in ("CarePlan", "Condition")}
    sections = []
    for month in months:
        kept = terms.get(str(month))
        section = await _month_section(
            session, info, patient, month, by_type, consents, reviews,
            [r for r in items if r.month == str(month)], invoices, documents,
            consent_renewal_months(info.under(kept)) if kept else renewal, history)
        section["billedMbi"] = _billed_mbi(by_type.get("Patient", []), patient, section, mbi)
        section["decisionHistory"] = _decision_history(section["filings"],
                                                       acts.get(str(month), []))
        sections.append(section)
    return {
        "practice": {"id": info.id, "name": info.name, "timezone": info.timezone},
        "patient": {"id": patient, "mbi": mbi},
        "from": str(first), "to": str(last), "generatedAt": _iso(now),
        "consentRenewalMonths": renewal,
        "months": sections,
        "invoices": documents,
        "auditEvents": [as_fhir_audit_event(r) for r in audit_rows],
    }


# The requests that decide or re-decide a closed month (the platform's audit log names them by
# route template; the path, kept as the entry's entity, names the month and, for a resolve, the
# patient).
DECISION_ROUTES = {
    "POST /v1/practices/{practice}/billing-periods/{month}/close": "close",
    "POST /v1/practices/{practice}/billing-periods/{month}/recompute": "recompute",
    "POST /v1/practices/{practice}/billing-periods/{month}/duplicates/{patient}/resolve":
        "duplicate-biller release or reclaim",
}


def _act_paths(practice: str, patient: str, months: list[Month]) -> dict[str, str]:
    """The path of each request that can decide one of ``months`` for ``patient`` → its month."""
    paths = {}
    for month in months:
        base = f"/v1/practices/{practice}/billing-periods/{month}"
        for tail in ("close", "recompute", f"duplicates/{patient}/resolve"):
            paths[f"{base}/{tail}"] = str(month)
    return paths


async def _audit_trail(session: AsyncSession, info: PracticeInfo, patient: str,
                       months: list[Month]) -> tuple[list, dict[str, list[dict]]]:
    """The packet's audit trail, in the order recorded: every entry that names the patient from
    the first month's start until now (the packet is made from what is on record when it is
    asked for: an EHR's late write of a backdated consent included), and the requests that
    decided or re-decided one of the months (close and recompute are practice-level entries,
    linked to the month by their path; a duplicate-biller release or reclaim names the patient
    too). Also those requests by month, as the packet's decision history shows them."""
    a = audit_log
    start, _ = _month_bounds(info, months[0])
    named = (await session.execute(select(a).where(
        a.c.practice == info.id, a.c.patient == patient, a.c.recorded_at >= start))).all()
    paths = _act_paths(info.id, patient, months)
    # Closes and recomputes name no patient (a resolve names this one: it is among ``named``);
    # only those that succeeded: a refused close (409, 422) decided nothing.
    decided = (await session.execute(select(a).where(
        a.c.practice == info.id, a.c.patient.is_(None), a.c.what.in_(sorted(DECISION_ROUTES)),
        a.c.entity.in_(sorted(paths)), a.c.outcome == 0))).all()
    rows = sorted({r.id: r for r in [*named, *decided]}.values(), key=lambda r: r.id)
    acts: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.what in DECISION_ROUTES and r.entity in paths and r.outcome == 0:
            acts[paths[r.entity]].append({
                "kind": "request", "operation": DECISION_ROUTES[r.what],
                "at": _iso(r.recorded_at), "by": r.actor_label or r.actor, "token": r.actor,
                "auditEvent": f"AuditEvent/{r.id}", "sequence": r.seq})
    return rows, acts


def _decision_history(filings: list[dict], acts: list[dict]) -> list[dict]:
    """The month's decision as it was filed and re-filed (revision, when, why) and the requests
    that decided it (who: token label and id; when), in time order. Billing does not record
    which request filed a revision, so the two are listed side by side, not joined."""
    rows = [{"kind": "filing", "at": f["filedAt"], "revision": f["revision"],
             "reason": f["reason"], "billable": f["billable"], "codes": f["codes"],
             "blockers": f["blockers"]} for f in filings]
    rows += acts
    return sorted(rows, key=lambda r: (datetime.fromisoformat(r["at"]), r["kind"] == "request"))


def _billed_mbi(versions: list, patient: str, section: dict, current: str | None) -> dict:
    """The MBI the month was billed under: the patient's MBI as billing had it when the decision
    in force (its newest filing) was filed, from the Patient versions it had applied by then; for
    an open month, the MBI now. Neither the decision nor the Invoice records the MBI itself."""
    filings = section["filings"]
    at = datetime.fromisoformat(filings[-1]["filedAt"]) if filings else None
    mine = [v for v in versions if v.resource_id == patient]
    if not mine:  # projected before billing kept source versions: only today's value is known
        return {"mbi": current, "asOf": None, "patientVersion": None, "current": current,
                "basis": "current"}
    applied = [v for v in mine if at is None or _utc(v.recorded_at) <= at]
    if not applied:
        return {"mbi": None, "asOf": _iso(at), "patientVersion": None, "current": current,
                "basis": "none"}
    used = applied[-1]
    return {"mbi": json.loads(used.data).get("mbi"), "asOf": _iso(at),
            "patientVersion": used.version_id, "receivedAt": _iso(used.received_at),
            "current": current, "basis": "filing" if at is not None else "current"}


PROJECTED = {"CarePlan": (orm.care_plans, "care_plan_id"),
             "Condition": (orm.conditions, "condition_id")}


async def _history(session: AsyncSession, practice: str, patient: str, kind: str
                   ) -> tuple[dict[str, list], dict[str, object]]:
    """Every version of each care plan (or condition) that is or was the patient's, whichever
    patient each version names (one can move between patients), oldest first; and their
    projection rows, as the decisions read them."""
    s = orm.source_versions
    table, key = PROJECTED[kind]
    rows = {getattr(r, key): r for r in (await session.execute(select(table).where(
        table.c.practice == practice, table.c.patient == patient))).all()}
    ids = set(rows) | set((await session.execute(select(s.c.resource_id).where(
        s.c.practice == practice, s.c.patient == patient, s.c.resource_type == kind))).scalars())
    if not ids:
        return {}, rows
    versions: dict[str, list] = defaultdict(list)
    for row in sorted((await session.execute(select(s).where(
            s.c.practice == practice, s.c.resource_type == kind,
            s.c.resource_id.in_(sorted(ids))))).all(), key=_version_order):
        versions[row.resource_id].append(row)
    # Moved away since: the projection's row (another patient's now) says whose it is now.
    missing = ids - set(rows)
    if missing:
        rows |= {getattr(r, key): r for r in (await session.execute(select(table).where(
            table.c.practice == practice, table.c[key].in_(sorted(missing))))).all()}
    return versions, rows


def _evidence_at(log: dict) -> datetime | None:
    """The instant a month's decision was taken on: its lock at close (the close, for a
    patient the close did not decide); None while the month is open (now)."""
    at = log["lockedAt"] or (log["closedAt"] if log["status"] == "closed" else None)
    return datetime.fromisoformat(at) if at else None


def _received_after(info: PracticeInfo, row, month: Month) -> bool:  # noqa: ANN001
    return row is not None and _local_day(info, row.received_at) > month.last_day


def _care_plans(info: PracticeInfo, patient: str, month: Month, at: datetime | None,
                history: tuple[dict, dict]) -> list[dict]:
    """The care plans as the month's decision judged them (as known at its close, or now), each
    with the decision's verdict; the versions received after the close shown apart."""
    versions, rows = history
    out = []
    for plan_id in sorted(set(versions) | set(rows)):
        k = judged.known_at(plan_id, versions.get(plan_id, []), rows.get(plan_id), patient, at)
        if k is None:
            continue
        later = [v for v in k.later if v.patient == patient]
        now_in_force = False
        if k.later:  # what the plan is now, by the same rule
            now = judged.known_at(plan_id, versions[plan_id], rows.get(plan_id), patient, None)
            now_in_force = now.ours and judged.plan_verdict(
                judged.care_plan_fact(now, info.tz), patient, month, info.timezone)[0]
        fact = judged.care_plan_fact(k, info.tz) if k.ours else None
        if fact is not None:
            in_force, warning = judged.plan_verdict(fact, patient, month, info.timezone)
            note = judged.plan_note(fact, in_force, month)
            # Not in force because it belongs to another month: not this month's evidence.
            other_month = (fact.created is not None and fact.created > month.last_day) or (
                fact.completed_on is not None and fact.completed_on < month.first_day)
            if not in_force and other_month and not now_in_force:
                continue
        elif now_in_force:  # not this patient's on record when the month was decided
            in_force, warning = False, None
            note = ("not on record as this patient's when the month was decided: received or "
                    "assigned later")
        else:
            continue
        used = k.used if fact is not None else None
        out.append({
            "carePlan": f"CarePlan/{plan_id}",
            "version": _plan_version(used) if used is not None else None,
            "fact": _plan_fact(fact), "inForce": in_force, "warning": warning, "note": note,
            "receivedAfterMonth": _received_after(info, used, month),
            "laterVersions": [_plan_version(v) for v in later],
            "inForceNow": now_in_force if k.later else None,
            # A later version names another patient (who is not shown: not this one's record).
            "movedAway": any(v.patient != patient for v in k.later),
        })
    return out


def _plan_version(row) -> dict:  # noqa: ANN001
    return {**_source_view(row), **_plan_fields(json.loads(row.data))}


def _plan_fact(plan) -> dict | None:  # noqa: ANN001 - a CarePlan fact
    if plan is None:
        return None
    return {"status": plan.status, "intent": plan.intent, "created": _iso(plan.created),
            "lastReview": _iso(plan.last_review), "completedOn": _iso(plan.completed_on)}


def _conditions(info: PracticeInfo, patient: str, month: Month, at: datetime | None,
                history: tuple[dict, dict]) -> list[dict]:
    """The chronic conditions the month's eligibility was judged on (``counted``: as known at its
    close, or now, from billing's projection of condition events), and those received after the
    close that count now (shown, not counted)."""
    versions, rows = history
    out = []
    for cid in sorted(set(versions) | set(rows)):
        k = judged.known_at(cid, versions.get(cid, []), rows.get(cid), patient, at)
        if k is None:
            continue
        counted = k.ours and judged.condition_counts(k, month, info.tz)
        later = [v for v in k.later if v.patient == patient]
        now = judged.known_at(cid, versions.get(cid, []), rows.get(cid), patient, None)
        counts_now = bool(now is not None and now.ours
                          and judged.condition_counts(now, month, info.tz))
        if not counted and not (later and counts_now):
            continue
        shown = k.used if counted else (later[-1] if later else None)
        out.append({
            "condition": f"Condition/{cid}", "counted": counted,
            "version": _condition_version(shown) if shown is not None else None,
            "receivedAfterMonth": _received_after(info, shown, month),
            "laterVersions": [_condition_version(v) for v in later],
            "countsNow": counts_now if k.later else None,
        })
    return out


def _condition_version(row) -> dict:  # noqa: ANN001
    d = json.loads(row.data)
    return {**_source_view(row), "code": d.get("code") or [],
            "clinicalStatus": d.get("clinicalStatus"),
            "verificationStatus": d.get("verificationStatus"), "onset": d.get("onset")}


def _checks(decision: dict | None, plans: list[dict], conditions: list[dict],
            minimum: int) -> list[str]:
    """Where the evidence shown (as known at the close) and the decision taken with it at the
    close disagree, said plainly (it should never happen: e.g. facts applied before billing
    kept their source versions)."""
    if decision is None:
        return []
    out = []
    plan_found = "care-plan-missing" not in decision.get("blockers", [])
    if plan_found and not any(p["inForce"] for p in plans):
        out.append("The decision found a care plan in force, but no version of it is in "
                   "billing's evidence.")
    if not plan_found and any(p["inForce"] for p in plans):
        out.append("The decision found no care plan in force, although the evidence shows one.")
    eligible = "insufficient-chronic-conditions" not in decision.get("blockers", [])
    counted = sum(c["counted"] for c in conditions)
    if eligible != (counted >= minimum):
        out.append(f"The decision judged eligibility {'met' if eligible else 'not met'}, but the "
                   f"evidence shows {counted} chronic condition(s) (at least {minimum} needed).")
    return out


def _met(flag: bool) -> str:
    return "met" if flag else "NOT met"


def _onset_day(onset: object) -> date | None:
    """A Condition's onset as the EHR wrote it, when it is a date or dateTime (else None: an
    age, a range or a text says no day)."""
    if not isinstance(onset, str) or len(onset) < 10:
        return None
    try:
        return date.fromisoformat(onset[:10])
    except ValueError:
        return None


def _counted_at(info: PracticeInfo, patient: str, month: Month, at: datetime | None,
                history: tuple[dict, dict]) -> dict:
    """condition id → the version (or None: the projection's row alone) of each Condition that
    counted as chronic for ``patient`` as billing knew it at ``at``."""
    versions, rows = history
    out = {}
    for cid in sorted(set(versions) | set(rows)):
        k = judged.known_at(cid, versions.get(cid, []), rows.get(cid), patient, at)
        if k is not None and k.ours and judged.condition_counts(k, month, info.tz):
            out[cid] = k.used
    return out


def _plans_in_force_at(info: PracticeInfo, patient: str, month: Month, at: datetime | None,
                       history: tuple[dict, dict]) -> list[str]:
    """The care plans in force for ``month`` by the decision's rule, as known at ``at``."""
    versions, rows = history
    out = []
    for pid in sorted(set(versions) | set(rows)):
        k = judged.known_at(pid, versions.get(pid, []), rows.get(pid), patient, at)
        fact = judged.care_plan_fact(k, info.tz) if k is not None and k.ours else None
        if fact is not None and judged.plan_verdict(fact, patient, month, info.timezone)[0]:
            out.append(pid)
    return out


def _in_force_checks(info: PracticeInfo, patient: str, month: Month, log: dict,  # noqa: PLR0913
                     plans: list[dict], conditions: list[dict], minimum: int,
                     history: dict) -> list[str]:
    """Where the decision in force — a revision filed after the close (a recompute, a
    correction) — and the evidence shown as known at the close disagree: what it was taken on
    instead (the versions billing had applied when it was filed), and whether those came after
    the month. The packet never shows 'billable' beside 'NOT met' without saying why."""
    filings = log["filings"]
    if len(filings) < 2:
        return []
    newest = filings[-1]
    at = datetime.fromisoformat(newest["filedAt"])
    who = (f"The decision in force (revision {newest['revision']}, filed {newest['filedAt'][:19]}"
           f", reason: {newest['reason']})")
    out = []
    eligible = "insufficient-chronic-conditions" not in newest["blockers"]
    at_close = {c["condition"].removeprefix("Condition/") for c in conditions if c["counted"]}
    if eligible != (len(at_close) >= minimum):
        then = _counted_at(info, patient, month, at, history["Condition"])
        text = (f"{who} judged eligibility {'met' if eligible else 'not met'}, but as known at "
                f"the month's close {len(at_close)} chronic condition(s) counted (at least "
                f"{minimum} required: {_met(len(at_close) >= minimum)}).")
        for cid in sorted(set(then) - at_close):
            v = then[cid]
            text += f" Condition/{cid} counted from that filing on"
            if v is not None:
                received = _local_day(info, v.received_at)
                text += f" (version {v.version_id}, received {received}"
                if received > month.last_day:
                    text += f", after the month ended on {month.last_day}"
                onset = _onset_day(json.loads(v.data).get("onset"))
                if onset is not None and onset > month.last_day:
                    text += (f"; its onset {onset} is after the month: it was not a condition "
                             "of the patient's in the month")
                text += ")"
            text += "."
        for cid in sorted(at_close - set(then)):
            text += (f" Condition/{cid} no longer counted from that filing on (a version "
                     "received after the close).")
        if eligible != (len(then) >= minimum):
            text += (f" Billing's evidence as of that filing shows {len(then)}: it does not "
                     "support the decision either.")
        out.append(text)
    plan_found = "care-plan-missing" not in newest["blockers"]
    if plan_found != any(p["inForce"] for p in plans):
        then = _plans_in_force_at(info, patient, month, at, history["CarePlan"])
        text = (f"{who} found {'a' if plan_found else 'no'} care plan in force, but as known at "
                f"the month's close {'none was' if plan_found else 'one was'}.")
        if then:
            text += (f" As of that filing: {', '.join(f'CarePlan/{p}' for p in then)} in force "
                     "(versions received after the close).")
        if plan_found != bool(then):
            text += " Billing's evidence as of that filing does not support the decision either."
        out.append(text)
    return out


CONSENT_BLOCKERS = (CONSENT_MISSING, CONSENT_NOT_ACTIVE)


def _consent_checks(decision: dict | None, consents: list[dict], month: Month,
                    at: datetime | None) -> list[str]:
    """A month billed under consent the evidence does not show documented before the month's
    services (rules §3.1): none in force, or each one in force received only after the month."""
    if not decision or not decision.get("codes") or set(CONSENT_BLOCKERS) & set(
            decision.get("blockers", [])):
        return []
    in_force = [c for c in consents if c["inForce"]]
    if not in_force:
        return ["The decision billed the month, but no consent in force for it is in billing's "
                "evidence."]
    if not all(c["receivedAfterMonth"] for c in in_force):
        return []
    out = []
    for c in in_force:
        text = (f"The month is billed under {c['consent']}, which billing first received on "
                f"{c['firstReceivedAt'][:10]}, after the month ended on {month.last_day}; the "
                f"EHR dates it {c['obtainedAt'] or 'without a date'}. Rules §3.1 require consent "
                "documented before the services: nothing on record shows it was.")
        if at is not None and c["receivedAfterClose"]:
            text += (" It came after the month's close: only a later filing (a recompute or "
                     "correction) billed the month under it.")
        out.append(text)
    return out


def _consent_evidence(versions: list, consent_id: str, info: PracticeInfo, month: Month,
                      at: datetime | None) -> dict:
    """What the packet adds to a consent row: who obtained it, its period and dateTime as the
    EHR sent them (the newest version), and when billing first received it."""
    mine = [v for v in versions if v.resource_id == consent_id]
    if not mine:
        return {"performer": [], "period": {}, "obtainedAt": None, "firstReceivedAt": None,
                "receivedAfterMonth": False, "receivedAfterClose": False}
    data = json.loads(mine[-1].data)
    first = min(mine, key=lambda v: _utc(v.received_at))
    first_applied = min(_utc(v.recorded_at) for v in mine)
    return {
        "performer": [p for p in data.get("practitioners") or [] if p],
        "period": {k: v for k, v in (data.get("period") or {}).items() if v},
        "obtainedAt": data.get("obtainedAt"),
        "firstReceivedAt": _iso(first.received_at),
        "receivedAfterMonth": _local_day(info, first.received_at) > month.last_day,
        "receivedAfterClose": at is not None and first_applied > at,
    }


async def _month_section(session, info, patient, month, by_type, consents, reviews, items,  # noqa: ANN001, PLR0913
                         invoices, documents, renewal, history) -> dict:
    log = await time_log(session, info, patient, month, encounters=by_type.get("Encounter", []))
    at = _evidence_at(log)
    consent_rows = []
    for fact, src in consents:
        ok, note = domain.in_force(fact, month, renewal_months=renewal)
        if fact.obtained_on is not None and fact.obtained_on > month.last_day and not ok:
            continue  # not yet obtained: belongs to a later month
        consent_rows.append({**consent_view(fact, src), "inForce": ok, "note": note,
                             **_consent_evidence(by_type.get("Consent", []), fact.consent_id,
                                                 info, month, at)})
    care_plans = _care_plans(info, patient, month, at, history["CarePlan"])
    conditions = _conditions(info, patient, month, at, history["Condition"])
    minimum = judged.minimum_chronic_conditions(month)
    # The decision the evidence was taken for: the one filed at close (or the live one).
    decided = log["filings"][0] if log["filings"] else log["decision"]
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
    shown_sources = []
    for kind in ("Patient", "Consent"):
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
    for x in [*care_plans, *conditions]:
        for v in [x["version"], *x["laterVersions"]]:
            if v is not None:
                shown_sources.append({k: v[k] for k in SOURCE_FIELDS})
    shown_sources += [_source_view(row) for row in by_type.get("Encounter", [])
                      if ("Encounter", row.resource_id) in referenced]
    shown_sources = list({(x["resourceType"], x["id"], x["versionId"], x["event"]): x
                          for x in shown_sources}.values())
    return {
        "month": str(month), "status": log["status"], "closedAt": log["closedAt"],
        "consents": consent_rows, "consentRenewalMonths": renewal, "timeLog": log,
        "evidenceAsOf": _iso(at), "carePlans": care_plans, "conditions": conditions,
        "eligibility": {"chronicConditions": sum(c["counted"] for c in conditions),
                        "minimum": minimum},
        "evidenceChecks": [
            *_checks(decided, care_plans, conditions, minimum),
            *_in_force_checks(info, patient, month, log, care_plans, conditions, minimum,
                              history),
            *_consent_checks(log["decision"], consent_rows, month, at)],
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


SOURCE_FIELDS = ("resourceType", "id", "versionId", "lastUpdated", "sha256", "receivedAt",
                 "connection", "event", "recordedAt")


def _plan_fields(data: dict) -> dict:
    return {"status": data.get("status"), "intent": data.get("intent"),
            "created": data.get("created"), "review": data.get("review")}
