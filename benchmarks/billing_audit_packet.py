"""Audit packet latency: one patient-month packet (FHIR Bundle, and PDF) on real PostgreSQL,
against the same run's bare SQL reads of the same facts (no assembly, no rendering).

Setup (not timed): a practice with --patients patients, each with a year of history pushed through
billing's own consumer handler (patient, consent, care plan and its June revision, two chronic
conditions, two time entries a month) and every month closed; plus --background-patients other
patients' source versions and filings written with COPY, so the indexes are not trivially small.

Needs real PostgreSQL: `deploy/local/up.sh && source .ccm-local/env` first.
Usage: uv run python benchmarks/billing_audit_packet.py [--patients 50]
       [--background-patients 20000] [--runs 50]

Runs in a throwaway schema (dropped afterwards); the bench practice is deleted at the end.
Target (issue 7): a patient-month packet in under 1 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import text

from ccm_billing.compliance import fhir_bundle, pdf, records
from ccm_billing.domain.model import Month
from ccm_billing.service_layer.common import bulk_insert, practice_info
from ccm_billing.service_layer.invoicing import close_period
from ccm_billing.service_layer.projections import apply_event
from ccm_shared.db import Database
from ccm_shared.events import CloudEvent
from ccm_shared.migrate import upgrade, upgrade_platform
from ccm_shared.tenancy import Pricing, create_practice

PRICING = Pricing(model="percent-of-medicare", percent=__import__("decimal").Decimal("45"))
MONTHS = [Month(2025, m) for m in range(1, 13)]


def _src(kind: str, rid: str, version: int, updated: str) -> dict:
    return {"resourceType": kind, "id": rid, "versionId": str(version), "lastUpdated": updated,
            "sha256": hashlib.sha256(f"{kind}/{rid}/{version}".encode()).hexdigest(),
            "receivedAt": updated, "connection": "bench"}


def _event(practice: str, type_: str, patient: str | None, data: dict) -> CloudEvent:
    return CloudEvent(source="/bench", type=type_, tenant=practice,
                      subject=f"Patient/{patient}" if patient else None, data=data)


def history(practice: str, p: str) -> list[tuple[Month | None, CloudEvent]]:
    """A patient's year, in order; the month is when it arrives (None: before January)."""
    plan = {"carePlan": f"CarePlan/cp-{p}", "patient": f"Patient/{p}", "status": "active",
            "intent": "plan", "created": "2024-12-01", "period": {}, "author": None,
            "careTeam": [], "addresses": [], "categories": []}
    out: list[tuple[Month | None, CloudEvent]] = [
        (None, _event(practice, "ingest.patient.upserted.v1", p, {
            "source": _src("Patient", p, 1, "2024-12-01T12:00:00Z"), "patient": f"Patient/{p}",
            "active": True, "mbi": None, "name": None, "managingOrganization": None,
            "generalPractitioner": [], "deceased": False, "deleted": False})),
        (None, _event(practice, "ingest.consent.granted.v1", p, {
            "source": _src("Consent", f"c-{p}", 1, "2024-12-01T15:00:00Z"), "consent": f"Consent/c-{p}",
            "patient": f"Patient/{p}", "status": "active", "obtainedAt": "2024-12-01T10:00:00-05:00",
            "method": "written", "period": {}, "provision": "permit", "practitioners": [],
            "categories": [], "effectiveUntil": None})),
        (None, _event(practice, "ingest.care-plan.created.v1", p, {
            "source": _src("CarePlan", f"cp-{p}", 1, "2024-12-01T16:00:00Z"), **plan, "review": None})),
        (None, _event(practice, "ingest.practitioner-role.upserted.v1", None, {
            "source": _src("PractitionerRole", "nurse", 1, "2024-12-01T16:00:00Z"),
            "practitionerRole": "PractitionerRole/nurse", "practitioner": "Practitioner/nurse",
            "organization": None, "active": True, "codes": [], "specialties": [],
            "classification": "clinical-staff", "telecom": [], "deleted": False})),
    ]
    for k in ("k1", "k2"):
        out.append((None, _event(practice, "ingest.condition.upserted.v1", p, {
            "source": _src("Condition", f"{k}-{p}", 1, "2024-12-01T16:00:00Z"),
            "condition": f"Condition/{k}-{p}", "patient": f"Patient/{p}", "clinicalStatus": "active",
            "verificationStatus": "confirmed", "categories": [], "code": [], "chronic": True,
            "deleted": False})))
    for m in MONTHS:
        if m.month == 6:
            out.append((m, _event(practice, "ingest.care-plan.revised.v1", p, {
                "source": _src("CarePlan", f"cp-{p}", 2, "2025-06-10T14:00:00Z"), **plan,
                "review": {"date": "2025-06-10", "reviewer": None}})))
        for n, (day, seconds) in enumerate(((3, 1500), (17, 1200))):
            entry = f"e{m.month}{n}-{p}"
            start = f"{m}-{day:02d}T10:00:00-05:00"
            out.append((m, _event(practice, "ingest.time-entry.logged.v1", p, {
                "source": _src("Encounter", entry, 1, start), "entry": f"Encounter/{entry}",
                "patient": f"Patient/{p}", "seconds": seconds, "start": start, "end": None,
                "serviceDate": start[:10], "serviceMonth": str(m), "activityCodes": ["99490"],
                "complex": False, "warnings": [],
                "performers": [{"practitioner": "Practitioner/nurse",
                                "practitionerRole": "PractitionerRole/nurse", "roleCodes": []}]})))
    return out


async def load(db: Database, practice: str, patients: int, background: int) -> None:
    events = [x for i in range(patients) for x in history(practice, f"p{i}")]
    for month in [None, *MONTHS]:
        async with db.unit_of_work() as uow:
            for m, e in events:
                if m == month:
                    await apply_event(e, uow, now=datetime(2025, (month or Month(2025, 1)).month,
                                                           20, tzinfo=UTC))
            if month is not None:
                nxt = month.next()
                await close_period(uow, practice, month, datetime(nxt.year, nxt.month, 2, 12, tzinfo=UTC))
            await uow.commit()
    now = datetime(2026, 1, 5, tzinfo=UTC)
    async with db.unit_of_work() as uow:
        rows, filings = [], []
        for i in range(background):
            p = f"bg{i}"
            for v in range(30):
                rows.append({"practice": practice, "resource_type": "Encounter",
                             "resource_id": f"bge{v}-{p}", "version_id": "1",
                             "event_type": "ingest.time-entry.logged.v1", "patient": p,
                             "last_updated": now, "sha256": "0" * 64, "received_at": now,
                             "connection": None, "recorded_at": now, "data": "{}"})
            for m in MONTHS:
                filings.append({"practice": practice, "patient": p, "month": str(m), "revision": 0,
                                "filed_at": now, "reason": "closed", "decision": "null",
                                "entries": "[]"})
        from ccm_billing.adapters import orm
        await bulk_insert(uow.session, orm.source_versions, rows)
        await bulk_insert(uow.session, orm.decision_filings, filings)
        await uow.commit()


async def packet(db: Database, practice: str, patient: str, month: Month, *, as_pdf: bool) -> bytes:
    """What the audit-packet route does, without HTTP."""
    now = datetime(2026, 1, 5, tzinfo=UTC)
    async with db.unit_of_work() as uow:
        info = await practice_info(uow.session, practice)
        doc = await records.audit_packet(uow.session, info, patient, month, month, now=now,
                                         renewal=None)
    bundle = fhir_bundle.bundle(doc, fhir_bundle.packet_id(doc))
    body = fhir_bundle.canonical(bundle)
    if as_pdf:
        return pdf.render(doc, hashlib.sha256(body).hexdigest())
    return body


async def bare_reads(db: Database, schema: str, practice: str, patient: str, month: Month) -> int:
    """The same facts read with plain SQL, nothing assembled."""
    q = {
        "sources": f'SELECT * FROM "{schema}".source_versions WHERE practice=:pr AND patient=:pa',
        "consents": f'SELECT * FROM "{schema}".consents WHERE practice=:pr AND patient=:pa',
        # A month closed in place keeps its filings and ChargeItems in the decider's rows.
        "filings": f'SELECT decision, entries FROM "{schema}".decision_filings WHERE practice=:pr '
                   f'AND patient=:pa AND month=:m UNION ALL SELECT decision, entries FROM '
                   f'"{schema}".month_decisions WHERE practice=:pr AND patient=:pa AND month=:m',
        "entries": f'SELECT * FROM "{schema}".time_entries WHERE practice=:pr AND patient=:pa AND month=:m',
        "period": f'SELECT closed_at FROM "{schema}".billing_periods WHERE practice=:pr AND month=:m',
        "reviews": f'SELECT * FROM "{schema}".care_plan_reviews WHERE practice=:pr AND patient=:pa',
        "items": f'SELECT id, resource FROM "{schema}".charge_items WHERE practice=:pr AND patient=:pa '
                 f'AND month=:m UNION ALL SELECT charge_item_id, resource FROM '
                 f'"{schema}".month_decision_lines WHERE practice=:pr AND patient=:pa AND month=:m',
        "invoices": f'SELECT * FROM "{schema}".invoices WHERE practice=:pr AND month=:m',
        # An Invoice's row keeps it without its lines (billing_0016): the packet reads them.
        "invoice_lines": f'SELECT id, amount FROM "{schema}".charge_items WHERE practice=:pr '
                         f'AND month=:m UNION ALL SELECT charge_item_id, amount FROM '
                         f'"{schema}".month_decision_lines WHERE practice=:pr AND month=:m',
        "audit": "SELECT * FROM platform.audit_log WHERE practice=:pr AND patient=:pa",
        "patient": f'SELECT * FROM "{schema}".patients WHERE practice=:pr AND patient_id=:pa',
    }
    n = 0
    async with db.engine.connect() as conn:
        for sql in q.values():
            n += len((await conn.execute(text(sql), {"pr": practice, "pa": patient,
                                                     "m": str(month)})).all())
    return n


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=50, help="patients with a full year")
    parser.add_argument("--background-patients", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    url = os.environ.get("CCM_DATABASE_URL", "")
    if not url.startswith("postgresql"):
        print("CCM_DATABASE_URL must point at PostgreSQL (source .ccm-local/env)", file=sys.stderr)
        return 2
    await asyncio.to_thread(upgrade_platform, url)
    tag = uuid.uuid4().hex[:8]
    schema = f"bench_billing_packet_{tag}"
    practice = f"bench-packet-{tag}"
    db = Database(url, schema=schema)
    # The service's own migrations, as deployed (e.g. billing_0010's lz4 documents).
    await asyncio.to_thread(upgrade, url, schema, "ccm_billing.migrations")
    try:
        await create_practice(db.engine, practice_id=practice, name="Bench Packet Clinic",
                              timezone="America/New_York", pricing=PRICING)
        t0 = time.perf_counter()
        await load(db, practice, args.patients, args.background_patients)
        print(f"setup: {args.patients} patients x 12 closed months through the consumer handler, "
              f"{args.background_patients} background patients ({time.perf_counter() - t0:.1f} s)")
        month = Month(2025, 6)
        samples: dict[str, list[float]] = {"bare SQL reads": [], "packet FHIR": [], "packet PDF": []}
        sizes = {}
        for run in range(args.runs + 3):
            patient = f"p{run % args.patients}"
            for name in samples:
                start = time.perf_counter()
                if name == "bare SQL reads":
                    sizes[name] = await bare_reads(db, schema, practice, patient, month)
                else:
                    sizes[name] = len(await packet(db, practice, patient, month,
                                                   as_pdf=name == "packet PDF"))
                if run >= 3:  # warm-up runs are not counted
                    samples[name].append(time.perf_counter() - start)
        base = statistics.median(samples["bare SQL reads"])
        print(f"one patient-month packet ({month}), {args.runs} runs each:")
        for name, values in samples.items():
            p50, p99 = pct(values, 50), pct(values, 99)
            unit = "rows" if name == "bare SQL reads" else "bytes"
            print(f"  {name:15s} p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  "
                  f"x{p50 / base:5.1f} baseline  ({sizes[name]} {unit})")
        worst = max(pct(samples["packet FHIR"], 99), pct(samples["packet PDF"], 99))
        print(f"target: < 1 s per packet -> {'met' if worst < 1 else 'NOT met'} (worst p99 "
              f"{worst * 1000:.0f} ms)")
        return 0
    finally:
        async with db.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            await conn.execute(text("DELETE FROM platform.practices WHERE id = :p"), {"p": practice})
        await db.dispose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
