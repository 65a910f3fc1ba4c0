"""Compliance records on the embedded database: a year of one patient's history in the audit
packet (FHIR Bundle validated with fhir.resources.R4B, and the PDF), time logs locked at close
with corrections kept as corrections, the consent tracker over consent states, tenancy."""

import csv
import hashlib
import io
import json
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import update

from ccm_billing.compliance import domain
from ccm_billing.domain.model import Month
from ccm_shared.tables import practices
from tests.unit.billing import compliance_events as cev
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver, unserved

MONTHS = [f"2025-{m:02d}" for m in range(1, 13)]


def est(month: str, day: int, hour: int = 10) -> str:
    return f"{month}-{day:02d}T{hour:02d}:00:00-05:00"


async def year_of_history(billing) -> dict:
    """p1 of alpha through 2025: two staff entries a month, every month closed; April's second
    entry reversed after April closed; the care plan revised with a review in June."""
    clock = billing.state["clock"]
    pushed: dict[str, dict] = {"entries": {}, "sha": {}}
    await deliver(billing, ev.patient("alpha", "p1", mbi="1EG4TE5MK73"),
                  cev.consent("alpha", "p1", "c1", method="verbal"),
                  cev.care_plan("alpha", "p1", "cp1", version=1, updated="2024-12-01T12:00:00Z"),
                  ev.condition("alpha", "p1", "k1"), ev.condition("alpha", "p1", "k2"),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"))
    for i, month in enumerate(MONTHS):
        clock.now = datetime(2025, i + 1, 20, 15, tzinfo=UTC)
        month_entries = {f"e{i + 1}a": (1500, est(month, 3)), f"e{i + 1}b": (1200, est(month, 17))}
        if i == 5:
            await deliver(billing, cev.care_plan("alpha", "p1", "cp1", version=2,
                                                 updated="2025-06-10T14:00:00Z", review="2025-06-10"),
                          cev.review_completed("alpha", "p1", "cp1", due="2025-06-15",
                                               completed="2025-06-10T15:00:00+00:00"))
        for entry, (seconds, start) in month_entries.items():
            e = cev.time_logged("alpha", "p1", entry, seconds, start)
            pushed["sha"][entry] = {e.data["source"]["sha256"]}
            await deliver(billing, e)
        pushed["entries"][month] = month_entries
        if i == 4:  # in May: April's second entry was entered in error
            r = cev.time_reversed("alpha", "p1", "e4b", updated="2025-05-06T12:00:00Z")
            pushed["sha"]["e4b"].add(r.data["source"]["sha256"])
            await deliver(billing, r)
        clock.now = datetime(2025, i + 2, 2, 15, tzinfo=UTC) if i < 11 else datetime(2026, 1, 2, 15, tzinfo=UTC)
        closed = await api(billing).post(f"/v1/practices/alpha/billing-periods/{month}/close")
        assert closed.status_code == 200, closed.text
    return pushed


def resources(bundle: dict, kind: str) -> dict:
    return {e["resource"]["id"]: e["resource"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == kind}


async def test_a_year_of_history_packet_holds_exactly_the_facts_month_by_month(billing):
    pushed = await year_of_history(billing)
    r = await api(billing).get("/v1/practices/alpha/patients/p1/audit-packet",
                               params={"from": "2025-01", "to": "2025-12"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-packet-sha256"]
    doc = r.json()
    Bundle.model_validate(doc)
    assert doc["type"] == "collection"
    by_ref = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
              for e in doc["entry"]}
    lists = sorted(resources(doc, "List").values(), key=lambda x: x["title"])
    assert [x["title"] for x in lists] == [f"CCM records {m}" for m in MONTHS]
    # Every invoice line of p1, as the billing API reports it, by month.
    items = (await api(billing).get("/fhir/ChargeItem", params={"subject": "Patient/p1"})).json()
    invoice_lines = {}
    for entry in items["entry"]:
        ci = entry["resource"]
        invoice_lines.setdefault(ci["occurrencePeriod"]["start"][:7], {})[ci["id"]] = ci
    for month, listing in zip(MONTHS, lists, strict=True):
        refs = [x["item"]["reference"] for x in listing["entry"]]
        encounters = {ref.split("/")[1]: by_ref[ref] for ref in refs if ref.startswith("Encounter/")}
        assert set(encounters) == set(pushed["entries"][month]), month
        for entry_id, (seconds, start) in pushed["entries"][month].items():
            assert encounters[entry_id]["length"]["value"] == seconds
            assert encounters[entry_id]["participant"][0]["individual"]["reference"] == "Practitioner/nurse-1"
        shas = {ext["valueString"] for ref in refs if ref.startswith("Provenance/")
                for ext in by_ref[ref]["extension"][0]["extension"] if ext["url"] == "sha256"
                and by_ref[ref]["target"][0]["reference"].startswith("Encounter/")}
        assert shas == set().union(*(pushed["sha"][e] for e in pushed["entries"][month])), month
        assert [r for r in refs if r.startswith("Consent/")] == ["Consent/c1"]
        decision = next(by_ref[r] for r in refs if r.startswith("Basic/"))
        ext = {(x["url"], json.dumps(x, sort_keys=True)) for x in decision["extension"][0]["extension"]}
        codes = sorted(json.loads(v)["valueCoding"]["code"] for u, v in ext if u == "code")
        charge_refs = [r for r in refs if r.startswith("ChargeItem/")]
        billed = {by_ref[r]["code"]["coding"][0]["code"] for r in charge_refs
                  if by_ref[r]["status"] == "billable"}
        # The billing section matches the Invoices: same ChargeItems, same amounts, same codes.
        assert {r.split("/")[1] for r in charge_refs} == set(invoice_lines[month]), month
        for ref in charge_refs:
            stored = invoice_lines[month][ref.split("/")[1]]
            assert {**by_ref[ref], "status": None} == {**unserved(stored), "status": None}
        assert billed == set(codes), month
        excerpted = set()
        for ref in (r for r in refs if r.startswith("Invoice/")):
            invoice = (await api(billing).get(f"/fhir/{ref}")).json()
            excerpt = by_ref[ref]
            assert excerpt["status"] == invoice["status"]
            mine = {x["chargeItemReference"]["reference"] for x in excerpt.get("lineItem", [])}
            assert mine <= {x["chargeItemReference"]["reference"] for x in invoice.get("lineItem", [])}
            for line in excerpt.get("lineItem", []):
                assert line in invoice["lineItem"]
            excerpted |= mine
        assert set(charge_refs) <= excerpted, month  # every ChargeItem's line is in an excerpt
        expected = ["99439", "99490"] if month != "2025-04" else ["99490"]
        assert codes == expected, month
    april = lists[3]
    april_refs = [x["item"]["reference"] for x in april["entry"]]
    # As the close locked it (version 1, finished and counted); the reversal is its correction.
    e4b = by_ref["Encounter/e4b"]
    assert (e4b["status"], e4b["meta"]["versionId"]) == ("finished", "1")
    (correction,) = [x for x in e4b["extension"] if x["url"].endswith("/ccm-correction")]
    said = {x["url"]: next(v for k, v in x.items() if k.startswith("value"))
            for x in correction["extension"]}
    assert said["versionId"] == "2" and said["status"] == "entered-in-error"
    assert said["revision"] == 1 and said["counted"] is False
    statuses = sorted(by_ref[r]["status"] for r in april_refs if r.startswith("Invoice/"))
    assert statuses == ["cancelled", "issued"]  # the original and its replacement
    april_items = sorted((by_ref[r]["code"]["coding"][0]["code"], by_ref[r]["status"])
                         for r in april_refs if r.startswith("ChargeItem/"))
    assert april_items == [("99439", "entered-in-error"), ("99490", "billable"),
                           ("99490", "entered-in-error")]
    june_refs = [x["item"]["reference"] for x in lists[5]["entry"]]
    tasks = [by_ref[r] for r in june_refs if r.startswith("Task/")]
    assert [t["focus"]["reference"] for t in tasks] == ["CarePlan/cp1"]
    plan_versions = {ext["valueString"] for r in june_refs if r.startswith("Provenance/")
                     and by_ref[r]["target"][0]["reference"].startswith("CarePlan/")
                     for ext in by_ref[r]["extension"][0]["extension"] if ext["url"] == "versionId"}
    assert plan_versions == {"2"}  # the version June's decision was taken on, at its close


async def test_the_pdf_has_a_cover_and_one_section_per_month(billing):
    await year_of_history(billing)
    r = await api(billing).get("/v1/practices/alpha/patients/p1/audit-packet",
                               params={"from": "2025-03", "to": "2025-05", "format": "pdf"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf" and r.content.startswith(b"%PDF-")
    assert len(r.headers["x-packet-sha256"]) == 64
    pages = r.content.count(b"/Type /Page\n") or r.content.count(b"/Type /Page ")
    assert pages >= 1 + 3 + 1  # cover, three months (a month may run over a page), audit trail
    by_accept = await billing.state["client"].get(
        "/v1/practices/alpha/patients/p1/audit-packet", params={"from": "2025-03"},
        headers={"Accept": "application/pdf",
                 "Authorization": f"Bearer {billing.state['tokens']['alpha']}"})
    assert by_accept.headers["content-type"] == "application/pdf"


async def test_reading_a_packet_is_itself_in_the_audit_trail_and_in_the_next_packet(billing):
    await year_of_history(billing)
    path = "/v1/practices/alpha/patients/p1/audit-packet"
    assert (await api(billing).get(path, params={"from": "2025-12"})).status_code == 200
    # Audit entries carry the wall-clock time of the read: ask up to the current month.
    now = datetime.now(UTC)
    doc = (await api(billing).get(path, params={"from": "2025-01", "to": f"{now:%Y-%m}"})).json()
    Bundle.model_validate(doc)
    reads = [a for a in resources(doc, "AuditEvent").values()
             if any(x.get("valueString") == "GET /v1/practices/{practice}/patients/{patient}/audit-packet"
                    for x in a["extension"][0]["extension"])]
    assert len(reads) == 1  # the earlier read; this one is recorded after its response
    assert {"reference": "Patient/p1"} in [e["what"] for e in reads[0]["entity"]]
    assert reads[0]["action"] == "R" and reads[0]["outcome"] == "0"


async def test_time_log_is_locked_at_close_and_corrections_are_added_not_edited(billing):
    await year_of_history(billing)
    r = await api(billing).get("/v1/practices/alpha/patients/p1/time-log", params={"month": "2025-04"})
    assert r.status_code == 200, r.text
    log = r.json()
    assert log["status"] == "closed" and log["lockedAt"] == "2025-05-02T15:00:00+00:00"
    rows = {e["entry"]: e for e in log["entries"]}
    assert rows["e4a"]["counted"] is True and rows["e4a"]["minutes"] == 25.0
    assert rows["e4a"]["performer"] == "Practitioner/nurse-1" and rows["e4a"]["role"] == "staff"
    assert rows["e4a"]["source"]["versionId"] == "1" and rows["e4a"]["corrections"] == []
    # As filed at close, e4b counted (version 1); its reversal came later, as a correction.
    assert rows["e4b"]["source"]["versionId"] == "1"
    assert [c["versionId"] for c in rows["e4b"]["corrections"]] == ["2"]
    # The locked view is the lock: e4b stays finished and counted, its 20 minutes with it.
    assert (rows["e4b"]["status"], rows["e4b"]["counted"], rows["e4b"]["seconds"]) == (
        "finished", True, 1200)
    (correction,) = rows["e4b"]["corrections"]
    assert correction["status"] == "entered-in-error"
    assert correction["filing"]["revision"] == 1 and correction["filing"]["counted"] is False
    assert correction["filing"]["notCountedReason"] == "not-finished"
    filings = log["filings"]
    assert [f["revision"] for f in filings] == [0, 1]
    assert filings[0]["reason"] == "closed" and "e4b" in filings[0]["counted"]
    assert filings[1]["countedRemoved"] == ["e4b"] and filings[1]["codes"] == {"99490": 1}
    assert filings[1]["codesBefore"] == {"99439": 1, "99490": 1}
    assert log["totals"]["countedMinutes"] == 45  # at close
    assert log["totalsAfterCorrections"]["countedMinutes"] == 25
    may = (await api(billing).get("/v1/practices/alpha/patients/p1/time-log",
                                  params={"month": "2025-05"})).json()
    assert [f["revision"] for f in may["filings"]] == [0]  # untouched months keep one filing


async def test_time_log_of_an_open_month_is_live_and_unlocked(billing):
    await deliver(billing, *ev.enrolled_patient("alpha", "p1"),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  cev.time_logged("alpha", "p1", "e1", 1300, "2025-03-03T10:00:00-05:00"))
    log = (await api(billing).get("/v1/practices/alpha/patients/p1/time-log",
                                  params={"month": "2025-03"})).json()
    assert log["status"] == "open" and log["lockedAt"] is None and log["filings"] == []
    assert log["entries"][0]["counted"] is True and log["entries"][0]["seconds"] == 1300


async def consent_history(billing, *, renewal: int | None = 12) -> None:
    """pa expiring, pb expired, pc revoked mid-February, pd voided, pe missing, pf declined."""
    async with billing.db.unit_of_work() as uow:
        pricing = {"model": "per-code", "rates": {"99490": "42.00", "99439": "33.33"}, "due_days": 30,
                   "rules": {"consent_renewal_months": renewal}}
        await uow.session.execute(update(practices).where(practices.c.id == "alpha")
                                  .values(pricing=json.dumps(pricing)))
        await uow.commit()
    await deliver(
        billing,
        *(ev.patient("alpha", p) for p in ("pa", "pb", "pc", "pd", "pe", "pf")),
        cev.consent("alpha", "pa", "ca", obtained="2024-04-10T10:00:00-04:00"),
        cev.consent("alpha", "pb", "cb", obtained="2023-01-05T10:00:00-05:00"),
        cev.consent("alpha", "pc", "cc", obtained="2024-12-01T10:00:00-05:00"),
        cev.consent("alpha", "pc", "cc", status="inactive", obtained="2024-12-01T10:00:00-05:00",
                    version=2, updated="2025-02-12T16:00:00Z", effective_until="2025-02-28"),
        cev.consent("alpha", "pd", "cd", obtained="2024-12-01T10:00:00-05:00"),
        cev.consent("alpha", "pd", "cd", status="entered-in-error", obtained="2024-12-01T10:00:00-05:00",
                    version=2, updated="2025-03-02T16:00:00Z"),
        cev.consent("alpha", "pf", "cf", status="rejected", obtained="2025-01-10T10:00:00-05:00",
                    method="verbal"),
    )


async def test_consent_tracker_shows_each_state(billing):
    await consent_history(billing)
    r = await api(billing).get("/v1/practices/alpha/consents")
    assert r.status_code == 200, r.text
    states = {x["patient"]: x["state"] for x in r.json()["patients"]}
    assert states == {"Patient/pa": "expiring", "Patient/pb": "expired", "Patient/pc": "revoked",
                      "Patient/pd": "voided", "Patient/pe": "missing", "Patient/pf": "declined"}
    rows = {x["patient"]: x for x in r.json()["patients"]}
    assert rows["Patient/pa"]["expiresOn"] == "2025-04-10" and rows["Patient/pa"]["daysLeft"] == 21
    assert rows["Patient/pc"]["effectiveUntil"] == "2025-02-28"
    assert rows["Patient/pf"]["method"] == "verbal"
    assert rows["Patient/pc"]["source"]["versionId"] == "2"
    narrow = await api(billing).get("/v1/practices/alpha/consents", params={"state": "expiring", "within": 10})
    assert narrow.json()["patients"] == []
    some = await api(billing).get("/v1/practices/alpha/consents", params={"state": "revoked,voided"})
    assert [x["patient"] for x in some.json()["patients"]] == ["Patient/pc", "Patient/pd"]
    bad = await api(billing).get("/v1/practices/alpha/consents", params={"state": "lost"})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    exported = await api(billing).get("/v1/practices/alpha/consents.csv", params={"state": "all"})
    assert exported.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert {x["patient"]: x["state"] for x in table}["Patient/pe"] == "missing"
    assert {x["patient"]: x["sha256"] for x in table}["Patient/pc"] == hashlib.sha256(
        b"Consent/cc/2").hexdigest()


async def test_without_a_renewal_interval_consents_do_not_expire(billing):
    await consent_history(billing, renewal=None)
    states = {x["patient"]: x["state"] for x in
              (await api(billing).get("/v1/practices/alpha/consents", params={"state": "all"})).json()["patients"]}
    assert states["Patient/pa"] == "active" and states["Patient/pb"] == "active"


async def test_billing_does_not_bill_under_a_consent_the_tracker_says_expired(billing):
    """With the practice's renewal interval (12 months), pb's consent of 2023-01-05 expired on
    2024-01-05 and pa's of 2024-04-10 is in force until 2025-04-10: the March 2025 worklist
    blocks pb and bills pa, as the tracker and the audit record say."""
    await consent_history(billing)
    await deliver(billing, *(x for p in ("pa", "pb") for x in (
        ev.condition("alpha", p, f"{p}-c1"), ev.condition("alpha", p, f"{p}-c2"),
        ev.care_plan("alpha", p, f"{p}-plan"), ev.visit("alpha", p, f"{p}-visit"),
        ev.time_logged("alpha", p, f"{p}-e1", 1300, "2025-03-03T10:00:00-05:00"))),
        ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"))
    rows = {row["patient"]: row for row in (await api(billing).get(
        "/v1/practices/alpha/billing-periods/2025-03/worklist")).json()["patients"]}
    assert rows["Patient/pa"]["codes"] == {"99490": 1} and rows["Patient/pa"]["blockers"] == []
    assert rows["Patient/pb"]["codes"] == {} and rows["Patient/pb"]["blockers"] == [
        "consent-not-active"]
    states = {x["patient"]: x["state"] for x in (await api(billing).get(
        "/v1/practices/alpha/consents", params={"state": "all"})).json()["patients"]}
    assert states["Patient/pb"] == "expired"


def test_a_months_terms_keep_the_renewal_interval_it_was_billed_under(monkeypatch):
    """With no interval in its pricing, a practice takes the service default; a closed month
    keeps the one in force at the close, so a correction after the default changed decides
    under the month's own terms."""
    from ccm_billing.service_layer import common

    info = common.PracticeInfo("alpha", "Alpha", "America/New_York", {"model": "per-code"})
    monkeypatch.setattr(common, "_service_renewal_months", lambda: 12)
    terms = info.terms_json()
    monkeypatch.setattr(common, "_service_renewal_months", lambda: 0)
    assert common.consent_renewal_months(info) is None  # today's default: none
    assert common.consent_renewal_months(info.under(terms)) == 12  # the month's: twelve
    assert info.under(terms).pricing["model"] == "per-code"
    explicit = common.PracticeInfo("alpha", "Alpha", "America/New_York",
                                   {"rules": {"consent_renewal_months": None}})
    assert common.consent_renewal_months(explicit.under(explicit.terms_json())) is None


async def test_a_closed_months_packet_judges_consents_by_the_interval_it_was_billed_under(
        billing):
    """pb's consent (2023-01-05) had expired under the 12-month interval March 2025 closed
    with; the practice then dropped the interval. March's packet still says expired, as its
    filing blocked; April (open) is judged by today's terms."""
    await consent_history(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, tzinfo=UTC)
    closed = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert closed.status_code == 200, closed.text
    async with billing.db.unit_of_work() as uow:
        pricing = {"model": "per-code", "rates": {"99490": "42.00"}, "due_days": 30,
                   "rules": {"consent_renewal_months": None}}
        await uow.session.execute(update(practices).where(practices.c.id == "alpha")
                                  .values(pricing=json.dumps(pricing)))
        await uow.commit()
    from ccm_billing.compliance import records
    from ccm_billing.service_layer.common import consent_renewal_months, practice_info

    async with billing.db.unit_of_work() as uow:
        info = await practice_info(uow.session, "alpha")
        packet = await records.audit_packet(
            uow.session, info, "pb", Month.parse("2025-03"), Month.parse("2025-04"),
            now=datetime(2025, 4, 3, tzinfo=UTC), renewal=consent_renewal_months(info))
    assert [m["consentRenewalMonths"] for m in packet["months"]] == [12, None]
    verdicts = [[(c["inForce"], c["note"]) for c in m["consents"]] for m in packet["months"]]
    assert verdicts == [[(False, "expired on 2024-01-05")],
                        [(True, "obtained 2023-01-05 (written)")]], verdicts
    pdf = await api(billing).get("/v1/practices/alpha/patients/pb/audit-packet",
                                 params={"from": "2025-03", "to": "2025-04", "format": "pdf"})
    assert pdf.status_code == 200


async def test_consent_states_over_time_show_in_the_packet(billing):
    await consent_history(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, tzinfo=UTC)

    async def in_force(patient):
        doc = (await api(billing).get(f"/v1/practices/alpha/patients/{patient}/audit-packet",
                                      params={"from": "2025-01", "to": "2025-04"})).json()
        Bundle.model_validate(doc)
        by_ref = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
                  for e in doc["entry"]}
        lists = sorted(resources(doc, "List").values(), key=lambda x: x["title"])
        out = []
        for listing in lists:
            consents = [by_ref[x["item"]["reference"]] for x in listing["entry"]
                        if x["item"]["reference"].startswith("Consent/")]
            out.append([c["status"] for c in consents])
        return out, by_ref

    # Revoked on Feb 12: in force through February (the month end), not in March.
    months, by_ref = await in_force("pc")
    assert months == [["inactive"]] * 4
    assert by_ref["Consent/cc"]["provision"]["period"]["end"] == "2025-02-28"
    packet_pdf = await api(billing).get("/v1/practices/alpha/patients/pc/audit-packet",
                                        params={"from": "2025-01", "to": "2025-04", "format": "pdf"})
    assert packet_pdf.status_code == 200
    # The in-force rule itself, month by month, as the packet states it.
    from ccm_billing.compliance.records import consent_facts
    from ccm_billing.service_layer.common import practice_info
    async with billing.db.unit_of_work() as uow:
        info = await practice_info(uow.session, "alpha")
        facts = await consent_facts(uow.session, info)
    verdict = {p: [domain.in_force(f, Month.parse(m), renewal_months=12)[0]
                   for m in ("2025-01", "2025-02", "2025-03", "2025-04", "2025-05")]
               for p, ((f, _),) in facts.items()}
    assert verdict["pc"] == [True, True, False, False, False]
    assert verdict["pd"] == [False] * 5  # voided: never valid
    assert verdict["pf"] == [False] * 5  # declined
    assert verdict["pa"] == [True, True, True, True, False]  # expires 2025-04-10
    assert verdict["pb"] == [False] * 5  # expired 2024-01-05


async def test_packet_requests_outside_the_practice_answer_404(billing):
    await year_of_history(billing)
    beta = api(billing, "beta")
    r = await beta.get("/v1/practices/alpha/patients/p1/audit-packet", params={"from": "2025-01"})
    assert r.status_code == 404
    r = await beta.get("/v1/practices/beta/patients/p1/audit-packet", params={"from": "2025-01"})
    assert r.status_code == 404
    r = await beta.get("/v1/practices/alpha/patients/p1/time-log", params={"month": "2025-01"})
    assert r.status_code == 404
    assert (await beta.get("/v1/practices/alpha/consents")).status_code == 404
    r = await api(billing).get("/v1/practices/alpha/patients/nobody/audit-packet", params={"from": "2025-01"})
    assert r.status_code == 404


async def test_bad_ranges_are_422(billing):
    await year_of_history(billing)
    path = "/v1/practices/alpha/patients/p1/audit-packet"
    for params in ({"from": "2025-13"}, {"from": "2025-05", "to": "2025-04"},
                   {"from": "2020-01", "to": "2025-01"}):
        r = await api(billing).get(path, params=params)
        assert r.status_code == 422, params
    assert (await api(billing).get(path)).status_code == 422  # from is required


def test_add_months_clamps_to_the_month_end():
    from datetime import date
    assert domain.add_months(date(2024, 1, 31), 1) == date(2024, 2, 29)
    assert domain.add_months(date(2024, 12, 15), 12) == date(2025, 12, 15)


def test_an_active_consent_wins_over_an_older_revoked_one():
    from datetime import date
    old = domain.ConsentFact("a", "inactive", "permit", date(2023, 1, 1), date(2023, 6, 30))
    new = domain.ConsentFact("b", "active", "permit", date(2024, 1, 1))
    assert domain.standing([old, new], date(2025, 1, 1)).state == "active"
    assert domain.standing([old], date(2025, 1, 1)).state == "revoked"
    assert domain.standing([], date(2025, 1, 1)).state == "missing"


async def test_the_packet_holds_the_initiating_visit_and_its_g0506(billing):
    """Consent signed at an office visit on 3 March: the March section names the visit, holds it
    as an Encounter (codes, day, performer, source version) beside the G0506 ChargeItem."""
    await deliver(billing, ev.patient("alpha", "p1"), ev.condition("alpha", "p1", "k1"),
                  ev.condition("alpha", "p1", "k2"), ev.care_plan("alpha", "p1", "cp1"),
                  cev.consent("alpha", "p1", "c1", obtained=est("2025-03", 3, 11)),
                  ev.visit("alpha", "p1", "office-1", day="2025-03-03"),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  cev.time_logged("alpha", "p1", "e1", 1500, est("2025-03", 12)),
                  # The visit's Encounter also logged CCM time (before the consent: not counted).
                  cev.time_logged("alpha", "p1", "office-1", 600, "2025-03-03T10:30:00-05:00"))
    billing.state["clock"].now = datetime(2025, 4, 2, 15, tzinfo=UTC)
    closed = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert closed.status_code == 200, closed.text
    path = "/v1/practices/alpha/patients/p1/audit-packet"
    doc = (await api(billing).get(path, params={"from": "2025-03", "to": "2025-03"})).json()
    Bundle.model_validate(doc)
    by_ref = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
              for e in doc["entry"]}
    (march,) = resources(doc, "List").values()
    refs = [x["item"]["reference"] for x in march["entry"]]
    visit = by_ref["Encounter/office-1"]
    assert "Encounter/office-1" in refs
    # One Encounter, time entry and initiating visit at once: both say so.
    flags = {x["url"].rsplit("/", 1)[1]: x.get("valueBoolean", x.get("valueCode"))
             for x in visit["extension"] if "valueBoolean" in x or "valueCode" in x}
    assert flags["ccm-initiating-visit"] is True and flags["ccm-counted"] is False
    assert flags["ccm-not-counted-reason"] == "before-consent"
    assert "Encounter/office-1" in {x["item"]["reference"] for x in march["entry"]}
    alone = {"encounter": "office-1", "date": "2025-03-03", "codes": ["99214"],
             "performers": ["Practitioner/doc-1"]}
    from ccm_billing.compliance.fhir_bundle import _visit
    only = _visit("p1", alone)
    assert only["period"] == {"start": "2025-03-03"} and only["status"] == "finished"
    assert only["type"] == [{"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                         "code": "99214"}]}]
    assert only["participant"] == [{"individual": {"reference": "Practitioner/doc-1"}}]
    assert {by_ref[r]["activity"]["text"] for r in refs if r.startswith("Provenance/")
            and by_ref[r]["target"][0]["reference"] == "Encounter/office-1/_history/1"} >= {
        "ingest.visit.recorded.v1"}
    billed = {by_ref[r]["code"]["coding"][0]["code"] for r in refs if r.startswith("ChargeItem/")}
    assert billed == {"99490", "G0506"}
    # the decision codes each as its ChargeItem does: G0506 is HCPCS (it was coded as CPT)
    charged = {c["code"]: c["system"] for r in refs if r.startswith("ChargeItem/")
               for c in by_ref[r]["code"]["coding"]}
    decided = {x["valueCoding"]["code"]: x["valueCoding"]["system"]
               for b in resources(doc, "Basic").values() for outer in b.get("extension", [])
               for x in outer.get("extension", [])
               if x["url"] == "code" and "valueCoding" in x}
    assert decided == charged and "hcpcs" in decided["G0506"].lower()
    pdf = await api(billing).get(path, params={"from": "2025-03", "to": "2025-03", "format": "pdf"})
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")


def test_the_audit_record_agrees_with_billing_on_consents_set_back_and_periods():
    """A consent granted and set back to draft (ingest: revoked, with the end of its month) is
    in force through that month, as billing bills it; one never granted is not yet agreed; a
    consent outside its provision.period is not in force."""
    from datetime import date

    def fact(**kw):
        return domain.ConsentFact("c1", kw.pop("status", "active"), "permit", date(2026, 1, 5),
                                  **kw)

    march, april = Month.parse("2026-03"), Month.parse("2026-04")
    set_back = fact(status="draft", effective_until=date(2026, 3, 31))
    assert domain.in_force(set_back, march)[0] is True
    assert domain.in_force(set_back, april)[0] is False
    assert domain.in_force(fact(status="draft"), march) == (False, "draft: not yet agreed")
    ended = fact(valid_until=date(2026, 2, 28))
    assert domain.in_force(ended, march) == (
        False, "its period ended on 2026-02-28 (provision.period)")
    assert domain.in_force(fact(valid_from=date(2026, 4, 2)), march)[0] is False
    assert domain.standing([set_back], date(2026, 4, 2)).state == "revoked"


def test_the_audit_record_and_billing_agree_on_every_consent_and_month():
    """One consent, every status, revocation end, provision.period and date obtained: the
    audit record says in force exactly for the months billing bills under it."""
    import itertools
    from datetime import date
    from zoneinfo import ZoneInfo

    from ccm_billing.domain.model import Consent, PracticeOptions
    from ccm_billing.domain.rules import ccm
    from tests.unit.billing.facts import TZ, local, month_facts

    march = Month.parse("2026-03")
    disagree, expired = [], 0
    for status, until, period, obtained, renewal in itertools.product(
            ["active", "inactive", "draft", "proposed", "rejected", "entered-in-error"],
            [None, date(2026, 2, 28), date(2026, 3, 31)],
            [(None, None), (date(2026, 3, 20), None), (date(2026, 4, 1), None),
             (None, date(2026, 3, 5)), (None, date(2026, 2, 27))],
            [None, date(2025, 2, 15), date(2025, 3, 1), date(2025, 6, 1), date(2026, 3, 31),
             date(2026, 4, 2)],
            [None, 12]):
        consent = Consent("c1", status, local(obtained) if obtained else None,
                          effective_until=until, valid_from=period[0], valid_until=period[1])
        facts = month_facts("2026-03", consent=consent)
        billed, _, _ = ccm.effective_consent(
            facts, PracticeOptions(consent_renewal_months=renewal), ZoneInfo(TZ))
        fact = domain.ConsentFact("c1", status, "permit", obtained, until,
                                  valid_from=period[0], valid_until=period[1])
        said, why = domain.in_force(fact, march, renewal_months=renewal)
        expired += why.startswith("expired")
        if (billed is not None) != said:
            disagree.append((status, until, period, obtained, renewal, why))
    assert disagree == []
    assert expired  # the renewal interval was exercised: a consent of 2025-02-15 expired



def test_the_tracker_standing_follows_the_period_and_the_date_obtained():
    from datetime import date

    today = date(2026, 3, 10)

    def active(**kw):
        return domain.ConsentFact("c1", "active", "permit", kw.pop("obtained", date(2026, 1, 5)),
                                  **kw)

    assert domain.standing([active()], today).state == "active"
    ended = domain.standing([active(valid_until=date(2026, 1, 31))], today)
    assert (ended.state, ended.expires_on) == ("expired", date(2026, 1, 31))
    assert domain.standing([active(valid_from=date(2026, 6, 1))], today).state == "missing"
    assert domain.standing([active(obtained=date(2026, 5, 1))], today).state == "missing"
    # An expired one does not hide another in force.
    both = [active(valid_until=date(2026, 1, 31)), active(obtained=date(2026, 2, 1))]
    assert domain.standing(both, today).state == "active"


@pytest.mark.parametrize(("rules", "months"), [
    ({"consent_renewal_months": 12}, 12),
    ({"consent_renewal_months": "12"}, 12),
    ({"consent_renewal_months": None}, None),  # explicitly none, whatever the service default
    ({"consent_renewal_months": 0}, None),
    ({}, None),  # the service default (CCM_BILLING_CONSENT_RENEWAL_MONTHS, 0: none)
    ({"consent_renewal_months": "a year"}, None),  # unreadable: the default, and a warning
    ({"consent_renewal_months": -3}, None),
    ({"consent_renewal_months": True}, None),
    ({"consent_renewal_months": 12.5}, None),
    ({"consent_renewal_months": 100000}, None),  # beyond Python's dates: a typing error
    ({"consent_renewal_months": 1200}, 1200),
])
def test_the_renewal_interval_billing_and_the_audit_record_share(rules, months):
    from ccm_billing.service_layer.common import PracticeInfo, consent_renewal_months
    from ccm_billing.service_layer.decisions import practice_options

    info = PracticeInfo("alpha", "Alpha", "America/New_York", {"rules": rules})
    assert consent_renewal_months(info) == months
    assert practice_options(info).consent_renewal_months == months


def test_the_tracker_stands_on_the_consent_that_lasts_longest():
    """Billing bills under any consent in force: an undated one (which never expires) keeps the
    patient active beside an expired dated one, and of two dated ones the later expiry counts."""
    from datetime import date

    today = date(2025, 3, 15)
    undated = domain.ConsentFact("c0", "active", "permit", None)
    old = domain.ConsentFact("c1", "active", "permit", date(2024, 1, 10))
    newer = domain.ConsentFact("c2", "active", "permit", date(2024, 4, 1))
    assert domain.standing([undated, old], today, renewal_months=12).state == "active"
    assert domain.in_force(undated, Month.parse("2025-03"), renewal_months=12)[0] is True
    st = domain.standing([old, newer], today, renewal_months=12)
    assert (st.state, st.consent.consent_id, st.expires_on) == ("expiring", "c2", date(2025, 4, 1))
    assert domain.standing([old], today, renewal_months=12).state == "expired"


def test_the_service_default_interval_has_the_same_bound():
    from pydantic import ValidationError

    from ccm_billing.settings import BillingSettings

    assert BillingSettings(consent_renewal_months=1200).consent_renewal_months == 1200
    with pytest.raises(ValidationError):
        BillingSettings(consent_renewal_months=100000)


def test_an_unreadable_renewal_interval_is_said_once_per_practice_and_value():
    """Every decision pass reads the interval: the warning is not repeated each time."""
    import structlog

    from ccm_billing.service_layer.common import PracticeInfo, consent_renewal_months

    with structlog.testing.capture_logs() as logs:
        # Said again when it changes, or when it is broken again after being fixed.
        for value in ("a year", "a year", "a year", "two years", 12, "two years"):
            info = PracticeInfo("warned-once", "W", "America/New_York",
                                {"rules": {"consent_renewal_months": value}})
            assert consent_renewal_months(info) == (12 if value == 12 else None)
    warned = [e for e in logs if "consent_renewal_months" in e["event"]]
    assert [(e["practice"], e["value"]) for e in warned] == [
        ("warned-once", "'a year'"), ("warned-once", "'two years'"),
        ("warned-once", "'two years'")]


@pytest.mark.parametrize(("day", "months", "expected"), [
    ((9999, 6, 1), 12, (9999, 12, 31)),   # past the calendar: its last day
    ((9999, 12, 31), 1, (9999, 12, 31)),
    ((1, 6, 1), -12, (1, 1, 1)),          # before it: its first day
    ((1, 1, 31), -1, (1, 1, 1)),
    ((9999, 1, 31), 11, (9999, 12, 31)),  # still inside: the month's own clamp
])
def test_add_months_stops_at_the_ends_of_the_calendar(day, months, expected):
    """year 10000 is out of range: a consent renewal or care plan review dated by the EHR near
    9999, or a look-back from year 1, failed the patient's decision."""
    from datetime import date
    assert domain.add_months(date(*day), months) == date(*expected)


async def test_a_care_plan_and_consent_dated_at_the_calendar_end_are_decided(billing):
    from tests.unit.billing import events as ev
    from tests.unit.billing.test_billing_flow import api, deliver

    # A visit looks back from a consent obtained in year 1 (for its initiating visit).
    await deliver(billing, *ev.enrolled_patient("alpha", "p9"),
                  ev.care_plan("alpha", "p9", "cp-end", created="9999-12-31", version=2),
                  ev.consent("alpha", "p9", "c-end", obtained="0001-03-01T10:00:00Z",
                             version=2),
                  ev.visit("alpha", "p9", "v-1", day="0001-02-01"))
    r = await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")
    assert r.status_code == 200, r.text
    assert any(p["patient"].endswith("p9") for p in r.json()["patients"])
