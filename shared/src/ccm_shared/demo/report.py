"""The demo's output folder and its closing summary table."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ccm_shared.demo.runner import DemoOutcome

TRACKER_COLUMNS = [
    "patient",
    "care_plan",
    "status",
    "review_state",
    "created",
    "last_review",
    "next_review_due",
    "days_until_due",
    "days_overdue",
    "signoff",
    "responsible_provider",
    "supervisor",
    "reminders_sent",
    "escalation_level",
]


def summary(o: DemoOutcome) -> dict:
    """The figures of the summary table, from what the services answered."""
    by_code: dict[str, dict] = defaultdict(
        lambda: {"units": 0, "patients": 0, "medicare": Decimal("0"), "billed": Decimal("0")}
    )
    blocked: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    billable = 0
    for p in o.report["patients"]:
        if p["lines"]:
            billable += 1
        for line in p["lines"]:
            row = by_code[line["code"]]
            row["units"] += int(line["units"])
            row["patients"] += 1
            row["medicare"] += Decimal(line["medicareAmount"])
            row["billed"] += Decimal(line["amount"])
        blocked.update(p["blockers"])
        warnings.update(p["warnings"])
    messages: Counter[tuple[str, str]] = Counter((m["kind"], m["status"]) for m in o.notifications)
    invoice = o.close.get("invoice") or {}
    return {
        "practice": o.demo.practice,
        "month": o.demo.month,
        "patients": len(o.report["patients"]),
        "billable": billable,
        "blocked": len(o.report["patients"]) - billable,
        "codes": {
            c: {k: (f"{v:.2f}" if isinstance(v, Decimal) else v) for k, v in r.items()}
            for c, r in sorted(by_code.items())
        },
        "blockers": dict(blocked.most_common()),
        "warnings": dict(warnings.most_common()),
        "invoice": {
            "id": invoice.get("id"),
            "total": invoice.get("totalNet"),
            "due": invoice.get("dueDate"),
            "status": invoice.get("status"),
            "chargeItems": len(o.charge_items),
        },
        "carePlans": {"tracked": len(o.tracker), **o.tracker_counts},
        "messages": [
            {"kind": k, "status": s, "count": n} for (k, s), n in sorted(messages.items())
        ],
        "edgeCases": {
            "total": len(o.edge_results),
            "asExpected": sum(1 for e in o.edge_results if e["ok"]),
        },
        "timings": {k: round(v, 1) for k, v in o.timings.items()},
    }


def render(figures: dict, console: Console) -> None:
    f = figures
    console.print(
        f"\n[bold]ccm demo — {f['practice']}, {f['month']}[/bold]: "
        f"{f['billable']} of {f['patients']} patients billable, "
        f"{f['blocked']} blocked"
    )
    codes = Table(title="Billable by code", title_justify="left")
    for col in ("code", "patients", "units", "Medicare amount", "billed to practice"):
        codes.add_column(col, justify="left" if col == "code" else "right")
    for code, r in f["codes"].items():
        codes.add_row(
            code, str(r["patients"]), str(r["units"]), f"${r['medicare']}", f"${r['billed']}"
        )
    codes.add_row("[bold]invoice[/bold]", "", "", "", f"[bold]${f['invoice']['total']}[/bold]")
    console.print(codes)
    blocked = Table(
        title="Blocked patients by reason (a patient may have several)", title_justify="left"
    )
    blocked.add_column("reason")
    blocked.add_column("patients", justify="right")
    for reason, n in f["blockers"].items():
        blocked.add_row(reason, str(n))
    for reason, n in f["warnings"].items():
        blocked.add_row(f"[dim]warning: {reason}[/dim]", f"[dim]{n}[/dim]")
    console.print(blocked)
    other = Table(title="Care plans and messages", title_justify="left")
    other.add_column("what")
    other.add_column("count", justify="right")
    cp = f["carePlans"]
    for key in ("tracked", "overdue", "escalated", "due", "awaiting-signoff"):
        if key in cp:
            other.add_row(f"care plans {key}", str(cp[key]))
    for m in f["messages"]:
        other.add_row(f"message {m['kind']} ({m['status']})", str(m["count"]))
    if not f["messages"]:
        other.add_row("messages", "0")
    console.print(other)
    e = f["edgeCases"]
    mark = "[green]✓[/green]" if e["asExpected"] == e["total"] else "[red]✗[/red]"
    console.print(
        f"{mark} billing-rule edge cases decided as the rules expect: "
        f"{e['asExpected']}/{e['total']}"
    )
    inv = f["invoice"]
    console.print(
        f"Invoice {inv['id']} ({inv['status']}, due {inv['due']}) with "
        f"{inv['chargeItems']} ChargeItems."
    )


def write_outputs(o: DemoOutcome, out: Path, console: Console) -> dict:
    """Every output file; returns the summary figures (also in summary.json)."""
    out.mkdir(parents=True, exist_ok=True)
    month = o.demo.month

    def dump(name: str, doc) -> None:  # noqa: ANN001
        (out / name).write_text(json.dumps(doc, indent=2) + "\n")

    (out / f"billing-report-{month}.csv").write_text(o.report_csv)
    dump(f"billing-report-{month}.json", o.report)
    dump(f"invoice-{month}.json", o.invoice)
    dump(
        f"charge-items-{month}.json",
        {
            "resourceType": "Bundle",
            "type": "collection",
            # absolute, as a Bundle's fullUrl must be (R4), where billing serves each one
            "entry": [{"fullUrl": f"{o.billing_fhir}/ChargeItem/{c['id']}", "resource": c}
                      for c in o.charge_items],
        },
    )
    dump(f"worklist-{month}.json", o.worklist)
    (out / "care-plan-tracker.csv").write_text(tracker_csv(o.tracker))
    (out / "care-plans-overdue.csv").write_text(o.overdue_csv)
    notes = out / "notifications"
    notes.mkdir(exist_ok=True)
    for old in notes.glob("*.txt"):
        old.unlink()
    for i, m in enumerate(sorted(o.notifications, key=lambda m: m["created_at"]), start=1):
        (notes / f"{i:03d}-{m['kind']}.txt").write_text(render_message(m))
    dump("notifications/index.json", o.notifications)
    safe = re.sub(r"[^A-Za-z0-9.-]+", "-", o.audit_patient)
    dump(f"audit-packet-{safe}.json", o.audit_packet)
    (out / "edge-cases.csv").write_text(edge_csv(o.edge_results))
    figures = summary(o)
    dump("summary.json", figures)
    recorder = Console(record=True, width=100, file=io.StringIO())
    render(figures, recorder)
    (out / "summary.txt").write_text(recorder.export_text())
    render(figures, console)
    return figures


def tracker_csv(items: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TRACKER_COLUMNS)
    for t in items:
        row = {**t, "signoff": (t.get("signoff") or {}).get("status")}
        w.writerow(["" if row.get(c) is None else row.get(c) for c in TRACKER_COLUMNS])
    return buf.getvalue()


def edge_csv(results: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "scenario",
            "patient",
            "as_expected",
            "codes",
            "blockers",
            "warnings",
            "problems",
            "description",
        ]
    )
    for e in results:
        w.writerow(
            [
                e["scenario"],
                e["patient"],
                "yes" if e["ok"] else "no",
                " ".join(f"{c}x{n}" for c, n in (e["codes"] or {}).items()),
                ";".join(e["blockers"] or []),
                ";".join(e["warnings"] or []),
                ";".join(e["problems"]),
                e["description"],
            ]
        )
    return buf.getvalue()


def render_message(m: dict) -> str:
    head = [
        f"To: {m.get('provider_name') or m.get('provider')} <{m.get('recipient')}>",
        f"Subject: {m.get('subject')}",
        f"Kind: {m.get('kind')}   Channel: {m.get('channel')}   Status: {m.get('status')}"
        + (f"   Last error: {m['last_error']}" if m.get("last_error") else ""),
        f"Created: {m.get('created_at')}   Sent: {m.get('sent_at') or '-'}",
    ]
    return "\n".join(head) + "\n\n" + (m.get("text") or "") + "\n"
