"""The audit packet as a PDF an auditor reads: a cover page, then one section per month."""

from __future__ import annotations

from fpdf import FPDF
from fpdf.enums import XPos, YPos

NEXT_LINE = {"new_x": XPos.LMARGIN, "new_y": YPos.NEXT}


def _text(value: object) -> str:
    """Core PDF fonts are Latin-1: anything else is replaced, never an error."""
    text = "-" if value is None or value == "" else str(value)
    return text.encode("latin-1", "replace").decode("latin-1")


class _Doc(FPDF):
    title_line = ""

    def header(self) -> None:
        if self.page_no() == 1:
            return
        self.set_font("Helvetica", "I", 8)
        self.cell(0, 5, _text(self.title_line), **NEXT_LINE)
        self.ln(2)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("Helvetica", "I", 8)
        self.cell(0, 5, f"Page {self.page_no()}/{{nb}}", align="C")

    def heading(self, text: str, size: int = 13) -> None:
        self.set_font("Helvetica", "B", size)
        self.cell(0, 8, _text(text), **NEXT_LINE)

    def para(self, text: str, size: int = 9, style: str = "") -> None:
        self.set_font("Helvetica", style, size)
        self.multi_cell(0, 4.5, _text(text), **NEXT_LINE)

    def table(self, header: list[str], rows: list[list], widths: list[float]) -> None:
        if not rows:
            self.para("None on record.", style="I")
            return
        self.set_font("Helvetica", "B", 7.5)
        with super().table(col_widths=widths, text_align="LEFT", line_height=4,
                           first_row_as_headings=True) as t:
            row = t.row()
            for h in header:
                row.cell(_text(h))
            self.set_font("Helvetica", "", 7.5)
            for values in rows:
                row = t.row()
                for v in values:
                    row.cell(_text(v))
        self.ln(2)


def render(packet: dict, packet_sha256: str) -> bytes:
    doc = _Doc(orientation="P", unit="mm", format="Letter")
    doc.set_auto_page_break(True, margin=15)
    doc.set_title(f"CCM audit packet {packet['patient']['id']} {packet['from']}..{packet['to']}")
    doc.title_line = (f"CCM audit packet - {packet['practice']['name']} - Patient/"
                      f"{packet['patient']['id']} - {packet['from']} to {packet['to']}")
    doc.add_page()
    doc.ln(20)
    doc.heading("Chronic Care Management - records packet", 18)
    doc.ln(4)
    cover = [
        ("Practice", f"{packet['practice']['name']} ({packet['practice']['id']}), "
                     f"time zone {packet['practice']['timezone']}"),
        ("Patient", f"Patient/{packet['patient']['id']}"),
        ("MBI (on record now)", packet["patient"]["mbi"] or "not on record"),
        *(("MBI billed", text) for text in _billed_mbis(packet)),
        ("Months", f"{packet['from']} to {packet['to']}"),
        ("Generated at", packet["generatedAt"]),
        ("Consent renewal", f"every {packet['consentRenewalMonths']} months"
                            if packet["consentRenewalMonths"] else "no renewal interval"),
        ("SHA-256 of the FHIR packet", packet_sha256),
    ]
    for label, value in cover:
        doc.set_font("Helvetica", "B", 10)
        doc.cell(55, 7, _text(label))
        doc.set_font("Courier" if label.startswith("SHA") else "Helvetica", "", 9 if label.startswith("SHA") else 10)
        doc.multi_cell(0, 7, _text(value), **NEXT_LINE)
    doc.ln(6)
    doc.para("Each month lists the consent(s) in force with dates and method; every time entry "
             "as locked at the month's close, with performer, role, minutes and whether it "
             "counted (and why not), and each later correction apart; the care plan(s) and the "
             "chronic conditions the month's billing decision was taken on (as known at its "
             "close), with the date each was received, and the review evidence; the billing "
             "decision with its reasons; the ChargeItems and Invoice lines; and every source "
             "FHIR version with its SHA-256 and received time. The SHA-256 above is taken over "
             "the FHIR Bundle of this packet (canonical JSON: sorted keys, no spaces); the audit "
             "trail's integrity is checked with 'ccm audit verify'.")
    for section in packet["months"]:
        _month(doc, packet, section)
    _audit(doc, packet["auditEvents"])
    return bytes(doc.output())


def _month(doc: _Doc, packet: dict, s: dict) -> None:
    doc.add_page()
    status = f"closed {s['closedAt']}" if s["status"] == "closed" else "open (provisional)"
    doc.heading(f"{s['month']} - {status}", 15)
    doc.heading("Consents", 11)
    renewal = s["consentRenewalMonths"]
    judged = (f"a consent renewal interval of {renewal} months" if renewal
              else "no consent renewal interval")
    doc.para(f"Consents judged with {judged}"
             + (", the one this month was billed under." if s["status"] == "closed" else "."))
    doc.table(["Consent", "Status", "Method", "Obtained", "Practitioner", "Period", "Received",
               "In force", "Note"],
              [[c["consent"], c["status"], c["method"], c.get("obtainedAt") or c["obtainedOn"],
                ", ".join(c.get("performer") or []) or "none named", _period(c),
                (c.get("firstReceivedAt") or "")[:10], "yes" if c["inForce"] else "NO",
                c["note"]] for c in s["consents"]],
              [24, 15, 13, 25, 27, 24, 18, 11, 39])
    for c in s["consents"]:
        if c.get("receivedAfterMonth") and c["inForce"]:
            doc.para(f"{c['consent']} was first received on {c['firstReceivedAt'][:10]}, after "
                     f"this month's services (the month ended {_month_end(s['month'])})"
                     + ("; after the month's close too." if c.get("receivedAfterClose") else "."))
    log = s["timeLog"]
    doc.heading("Time entries", 11)
    if log["lockedAt"]:
        doc.para(f"As locked at close on {log['lockedAt']}; changes received after the lock are "
                 "listed below the table as corrections.")
    doc.table(["Encounter", "Start", "Performer", "Role", "Min", "Counted", "Why not",
               "Source version (SHA-256)"],
              [[e["entry"], (e["start"] or "")[:16], e["performer"], e["role"], e["minutes"],
                "yes" if e["counted"] else "no", e["reason"],
                f"v{e['source']['versionId']} {e['source']['sha256'][:16]}..." if e["source"] else "-"]
               for e in log["entries"]],
              [22, 26, 30, 18, 10, 13, 25, 52])
    for e in log["entries"]:
        for c in e["corrections"]:
            doc.para(_correction_text(e["entry"], c))
    doc.para(f"Counted{' at close' if log['lockedAt'] else ''}: "
             f"{log['totals']['countedMinutes']} minutes "
             f"({log['totals']['countedSeconds']} seconds).", style="B")
    if after := log.get("totalsAfterCorrections"):
        doc.para(f"Counted after corrections (revision {after['revision']}, filed "
                 f"{after['filedAt'][:19]}): {after['countedMinutes']} minutes "
                 f"({after['countedSeconds']} seconds).", style="B")
    if visit := s.get("initiatingVisit"):
        doc.para(f"Initiating visit: Encounter/{visit['encounter']} on {visit['date']} "
                 f"({', '.join(visit['codes']) or 'codes not on file'}) by "
                 f"{', '.join(visit['performers']) or 'performer not on file'}.")
    as_of = (f"as known when the month closed ({s['evidenceAsOf'][:19]})" if s["evidenceAsOf"]
             else "as known now (the month is open)")
    doc.heading("Care plan", 11)
    doc.para(f"The care plan(s) this month's billing decision was taken on, {as_of}, with the "
             "decision's verdict (in force: created on or before the month's end, not revoked, "
             "entered in error or draft).")
    doc.table(["Care plan", "Version", "Status", "Created", "Last review", "Received", "In force",
               "SHA-256"],
              [[p["carePlan"], v.get("versionId"), f.get("status"), f.get("created"),
                f.get("lastReview"), v.get("receivedAt", "")[:10],
                "yes" if p["inForce"] else "NO", v["sha256"][:20] + "..." if v else "-"]
               for p in s["carePlans"] for v, f in [(p["version"] or {}, p["fact"] or {})]],
              [30, 14, 16, 20, 20, 20, 14, 52])
    for p in s["carePlans"]:
        for line in _plan_notes(s["month"], p):
            doc.para(line)
    doc.para("Review evidence (care-plan reviews completed this month):", style="B")
    doc.table(["Care plan", "Due", "Completed", "Days overdue", "Responsible"],
              [[r["carePlan"], r["dueDate"], r["completedAt"][:19], r["daysOverdue"],
                r["responsibleProvider"]] for r in s["reviews"]],
              [40, 25, 45, 25, 61])
    doc.heading("Eligibility: chronic conditions", 11)
    eligibility = s["eligibility"]
    counted = eligibility["chronicConditions"]
    doc.para(f"Chronic conditions counted, {as_of}: {counted} (at least "
             f"{eligibility['minimum']} required: "
             f"{'met' if counted >= eligibility['minimum'] else 'NOT met'}).")
    doc.table(["Condition", "Code", "Clinical", "Verification", "Onset", "Version", "Received",
               "Counted"],
              [[c["condition"], _codes(v), v.get("clinicalStatus"), v.get("verificationStatus"),
                v.get("onset"), v.get("versionId"), v.get("receivedAt", "")[:10],
                "yes" if c["counted"] else "no (received later)"]
               for c in s["conditions"] for v in [c["version"] or {}]],
              [32, 40, 18, 20, 22, 14, 20, 20])
    for c in s["conditions"]:
        for line in _condition_notes(s["month"], c):
            doc.para(line)
    for check in s["evidenceChecks"]:
        doc.para(f"Check: {check}", style="B")
    doc.heading("Billing decision", 11)
    d = s["decision"]
    if d is None:
        doc.para("Not enrolled this month: no decision.", style="I")
    else:
        if len(s["filings"]) > 1:
            newest = s["filings"][-1]
            doc.para(f"The decision in force is revision {newest['revision']}, filed "
                     f"{newest['filedAt'][:19]} after the month's close ({newest['reason']}); "
                     "the evidence above is as known at the close.", style="B")
        if s["evidenceChecks"]:
            doc.para("The evidence shown and this decision disagree: see the checks above.",
                     style="B")
        codes = ", ".join(f"{c} x{n}" for c, n in sorted(d["codes"].items())) or "none"
        doc.para(f"Billable: {'yes' if d['billable'] else 'no'}; codes: {codes}; "
                 f"ruleset {d['ruleset']}; staff {d['minutes'].get('staff', 0)} min, "
                 f"practitioner {d['minutes'].get('practitioner', 0)} min.")
        doc.para(f"Billing practitioner: {d.get('practitioner') or 'none named'}. "
                 f"{_mbi_text(s.get('billedMbi'))}")
        doc.para(f"Blockers: {', '.join(d['blockers']) or 'none'}. "
                 f"Warnings: {', '.join(d['warnings']) or 'none'}.")
        for note in d["notes"]:
            doc.para(f"- {note}")
    if s["filings"]:
        doc.table(["Revision", "Filed at", "Reason", "Codes", "Counted +/-"],
                  [[f["revision"], f["filedAt"][:19], f["reason"],
                    ", ".join(f"{c} x{n}" for c, n in sorted(f["codes"].items())) or "none",
                    f"+{len(f.get('countedAdded', []))} / -{len(f.get('countedRemoved', []))}"
                    if f["revision"] else "as closed"]
                   for f in s["filings"]],
                  [16, 38, 80, 32, 30])
    _history(doc, s.get("decisionHistory") or [])
    doc.heading("ChargeItems and Invoice lines", 11)
    doc.table(["ChargeItem", "Code", "Status", "Amount", "Invoice", "Invoice status"],
              [[c["chargeItem"]["id"], c["code"], c["status"], c["amount"],
                f"{c['invoice']} (r{c['invoiceRevision']})", c["invoiceStatus"]]
               for c in s["charges"]],
              [44, 16, 26, 20, 60, 30])
    doc.heading("Source FHIR versions", 11)
    doc.table(["Resource", "Version", "Last updated", "Received", "SHA-256"],
              [[f"{x['resourceType']}/{x['id']}", x["versionId"], x["lastUpdated"][:19],
                x["receivedAt"][:19], x["sha256"]] for x in s["sources"]],
              [36, 14, 32, 32, 82])


def _period(c: dict) -> str:
    period = c.get("period") or {}
    if not period:
        return "open"
    start, end = (period.get("start") or "")[:10], (period.get("end") or "")[:10]
    return f"{start or '...'} to {end or '...'}"


def _mbi_text(billed: dict | None) -> str:
    if not billed:
        return ""
    if billed["basis"] == "none":
        return "No MBI was on record when the decision in force was filed."
    if billed["basis"] == "current" and billed["asOf"] is None and billed["patientVersion"] is None:
        return (f"MBI: {billed['mbi'] or 'not on record'} (on record now; billing keeps no "
                "version of the Patient from before).")
    when = f"when the decision in force was filed ({billed['asOf'][:19]})" if billed["asOf"] \
        else "now (no decision of the month was filed)"
    text = f"Billed under MBI {billed['mbi'] or 'none'}, on record {when}"
    if billed.get("patientVersion"):
        text += f" (Patient version {billed['patientVersion']})"
    if billed["mbi"] != billed.get("current"):
        text += f"; the patient's MBI is now {billed.get('current') or 'not on record'}"
    return text + "."


def _billed_mbis(packet: dict) -> list[str]:
    """Cover lines: each MBI the packet's months were billed under, when it is not today's."""
    out: dict[str, list[str]] = {}
    for s in packet["months"]:
        billed = (s.get("billedMbi") or {}).get("mbi")
        if billed and billed != packet["patient"]["mbi"]:
            out.setdefault(billed, []).append(s["month"])
    return [f"{mbi} ({', '.join(months)})" for mbi, months in out.items()]


def _history(doc: _Doc, history: list[dict]) -> None:
    """The month's decision history: its filings and the requests that decided it, in time
    order (billing does not record which request filed which revision)."""
    if not history:
        return
    doc.para("Decision history: each filing of this month's decision (revision, reason) and "
             "each request that closed, recomputed or released it (who: the API token's label "
             "and id), in time order.", style="B")
    doc.table(["When", "What", "Who / reason", "Result"],
              [[h["at"][:19], f"filing r{h['revision']}", h["reason"],
                ", ".join(f"{c} x{n}" for c, n in sorted(h["codes"].items()))
                or ("not billable: " + ", ".join(h["blockers"]) if h["blockers"] else "none")]
               if h["kind"] == "filing" else
               [h["at"][:19], h["operation"], f"{h['by']} (token {h['token']})",
                f"{h['auditEvent']}" + (f", seq {h['sequence']}" if h.get("sequence") else "")]
               for h in history],
              [34, 40, 72, 50])


def _correction_text(entry: str, c: dict) -> str:
    became = f"; the version says {c['status']}" if c.get("status") else ""
    text = (f"Correction after the lock: Encounter/{entry} version {c['versionId']} "
            f"({c['event']}{became}), received {c['receivedAt'][:19]}, SHA-256 {c['sha256']}.")
    filing = c.get("filing")
    if filing is None:
        return text + " No filing changed with it: the month's decision stood."
    if not filing["inMonth"]:
        return (text + f" Filed in revision {filing['revision']} on {filing['filedAt'][:19]} "
                f"({filing['reason']}): no longer in this month.")
    result = ("counted" if filing["counted"]
              else f"not counted ({filing['notCountedReason'] or 'no reason recorded'})")
    return (text + f" Filed in revision {filing['revision']} on {filing['filedAt'][:19]} "
            f"({filing['reason']}): {filing['status']}, {result}.")


def _month_end(month: str) -> str:
    from ccm_billing.domain.model import Month

    return Month.parse(month).last_day.isoformat()


def _plan_notes(month: str, p: dict) -> list[str]:
    out = [f"{p['carePlan']}: {p['note']}."]
    if p["version"] is not None and p["receivedAfterMonth"]:
        out.append(f"{p['carePlan']} version {p['version']['versionId']} was received on "
                   f"{p['version']['receivedAt'][:10]}, after this month's services (the month "
                   f"ended {_month_end(month)}); the EHR dates it created "
                   f"{(p['fact'] or {}).get('created') or 'without a date'}. It was on record "
                   "when the decision was taken, which relied on it.")
    for v in p["laterVersions"]:
        out.append(f"Received after the decision: {p['carePlan']} version {v['versionId']} "
                   f"({v['status']}), received {v['receivedAt'][:19]}, SHA-256 {v['sha256']}; "
                   "not part of the evidence the decision was taken on.")
    if p["movedAway"]:
        out.append(f"After the decision {p['carePlan']} was assigned to another patient.")
    if (p["laterVersions"] or p["movedAway"]) and p["inForceNow"] is not None:
        out.append(f"By today's record {p['carePlan']} would be "
                   f"{'in force' if p['inForceNow'] else 'NOT in force'} for this month.")
    return out


def _condition_notes(month: str, c: dict) -> list[str]:
    out = []
    v = c["version"]
    if v is not None and c["counted"] and c["receivedAfterMonth"]:
        out.append(f"{c['condition']} version {v['versionId']} was received on "
                   f"{v['receivedAt'][:10]}, after this month's services (the month ended "
                   f"{_month_end(month)}); it was on record when the decision was taken.")
    if not c["counted"]:
        out.append(f"{c['condition']}: received after the decision; it counts now but was not "
                   "counted for this month.")
    elif c["laterVersions"]:
        now = "counts" if c["countsNow"] else "does NOT count"
        out.append(f"{c['condition']}: version(s) "
                   f"{', '.join(x['versionId'] for x in c['laterVersions'])} received after the "
                   f"decision; by today's record it {now}.")
    return out


def _codes(v: dict | None) -> str:
    if not v:
        return "-"
    return ", ".join(f"{c['code']} {c.get('display') or ''}".strip() for c in v["code"]) or "-"


def _audit(doc: _Doc, events: list[dict]) -> None:
    doc.add_page()
    doc.heading("Audit trail (this patient, and the requests that decided these months)", 12)
    doc.para("Requests to the platform's APIs that named this patient (reads and searches naming "
             "the patient, this packet's earlier reads), an EHR's writes of the patient's FHIR "
             "resources (creates, updates and deletes, each sent alone or in a transaction or "
             "batch Bundle: a Bundle once per action on the patient's resources) and the "
             "patient's events applied by its services, from the first month's start until this "
             "packet was made; and the requests that closed or recomputed these months (they "
             "name the month, not a patient) or resolved this patient's duplicate-biller flag. "
             "What each write stored is listed per month under 'Source FHIR versions' (received "
             "time and SHA-256).")
    rows = []
    for e in events:
        chain = {x["url"]: x.get("valueInteger", x.get("valueString"))
                 for x in e["extension"][0]["extension"]}
        rows.append([chain.get("sequence"), e["recorded"][:19], e["action"],
                     e["agent"][0]["who"]["display"], chain.get("operation"),
                     (chain.get("hash") or "unsealed")[:16]])
    doc.table(["Seq", "Recorded", "Action", "Who", "What", "Hash"], rows,
              [12, 34, 12, 36, 74, 28])
