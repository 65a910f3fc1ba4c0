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
        ("MBI", packet["patient"]["mbi"] or "not on record"),
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
             "with performer, role, minutes and whether it counted (and why not); the care-plan "
             "versions in force and the review evidence; the billing decision with its reasons; "
             "the ChargeItems and Invoice lines; and every source FHIR version with its SHA-256 "
             "and received time. The SHA-256 above is taken over the FHIR Bundle of this packet "
             "(canonical JSON: sorted keys, no spaces); the audit trail's integrity is checked "
             "with 'ccm audit verify'.")
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
    doc.table(["Consent", "Status", "Method", "Obtained", "Until", "In force", "Note"],
              [[c["consent"], c["status"], c["method"], c["obtainedOn"], c["effectiveUntil"],
                "yes" if c["inForce"] else "NO", c["note"]] for c in s["consents"]],
              [28, 18, 15, 20, 20, 14, 81])
    log = s["timeLog"]
    doc.heading("Time entries", 11)
    if log["lockedAt"]:
        doc.para(f"Locked at close on {log['lockedAt']}; later changes are listed as corrections.")
    doc.table(["Encounter", "Start", "Performer", "Role", "Min", "Counted", "Why not",
               "Source version (SHA-256)"],
              [[e["entry"], (e["start"] or "")[:16], e["performer"], e["role"], e["minutes"],
                "yes" if e["counted"] else "no", e["reason"],
                f"v{e['source']['versionId']} {e['source']['sha256'][:16]}..." if e["source"] else "-"]
               for e in log["entries"]],
              [22, 26, 30, 18, 10, 13, 25, 52])
    for e in log["entries"]:
        for c in e["corrections"]:
            doc.para(f"Correction after the lock: Encounter/{e['entry']} version {c['versionId']} "
                     f"({c['event'].split('.')[-2]}), received {c['receivedAt'][:19]}, "
                     f"SHA-256 {c['sha256']}.")
    doc.para(f"Counted: {log['totals']['countedMinutes']} minutes "
             f"({log['totals']['countedSeconds']} seconds).", style="B")
    if visit := s.get("initiatingVisit"):
        doc.para(f"Initiating visit: Encounter/{visit['encounter']} on {visit['date']} "
                 f"({', '.join(visit['codes']) or 'codes not on file'}) by "
                 f"{', '.join(visit['performers']) or 'performer not on file'}.")
    doc.heading("Care plan", 11)
    doc.table(["Care plan", "Version", "Status", "Created", "Review", "Last updated", "SHA-256"],
              [[p["carePlan"], v["versionId"], v["status"], v["created"],
                (v.get("review") or {}).get("date"), v["lastUpdated"][:19], v["sha256"][:20] + "..."]
               for p in s["carePlans"] for v in p["versions"]],
              [30, 14, 18, 20, 20, 36, 58])
    doc.para("Review evidence (care-plan reviews completed this month):", style="B")
    doc.table(["Care plan", "Due", "Completed", "Days overdue", "Responsible"],
              [[r["carePlan"], r["dueDate"], r["completedAt"][:19], r["daysOverdue"],
                r["responsibleProvider"]] for r in s["reviews"]],
              [40, 25, 45, 25, 61])
    doc.heading("Billing decision", 11)
    d = s["decision"]
    if d is None:
        doc.para("Not enrolled this month: no decision.", style="I")
    else:
        codes = ", ".join(f"{c} x{n}" for c, n in sorted(d["codes"].items())) or "none"
        doc.para(f"Billable: {'yes' if d['billable'] else 'no'}; codes: {codes}; "
                 f"ruleset {d['ruleset']}; staff {d['minutes'].get('staff', 0)} min, "
                 f"practitioner {d['minutes'].get('practitioner', 0)} min.")
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


def _audit(doc: _Doc, events: list[dict]) -> None:
    doc.add_page()
    doc.heading("Audit trail (reads and writes of this patient's data in these months)", 12)
    rows = []
    for e in events:
        chain = {x["url"]: x.get("valueInteger", x.get("valueString"))
                 for x in e["extension"][0]["extension"]}
        rows.append([chain.get("sequence"), e["recorded"][:19], e["action"],
                     e["agent"][0]["who"]["display"], chain.get("operation"),
                     (chain.get("hash") or "unsealed")[:16]])
    doc.table(["Seq", "Recorded", "Action", "Who", "What", "Hash"], rows,
              [12, 34, 12, 36, 74, 28])
