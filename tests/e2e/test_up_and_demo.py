"""`ccm up` (embedded: SQLite files and the durable embedded log, nothing else) and `ccm demo`
against it, as a newcomer runs them: two processes, real HTTP, the output files checked."""

from __future__ import annotations

import csv
import json
import os
import subprocess

from tests.e2e.processes import ROOT, Process, free_port, wait_ready


def test_ccm_up_then_ccm_demo_closes_a_month_with_an_invoice(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CCM_DATABASE_URL", "CCM_KAFKA_BOOTSTRAP_SERVERS")}
    env |= {"CCM_LOG_LEVEL": "WARNING", "CCM_NOTIFICATION_SMTP_PORT": str(free_port())}
    ports = [free_port() for _ in range(4)]
    data = tmp_path / "data"
    up = Process("ccm up", ["ccm", "up", "--data-dir", str(data), "--ports",
                            ",".join(map(str, ports))], env, tmp_path / "up.log")
    up.start()
    try:
        for port in ports:
            wait_ready(f"http://127.0.0.1:{port}", up, timeout=120)
        token = (data / "demo.token").read_text().strip()
        out = tmp_path / "out"
        demo = subprocess.run(
            ["uv", "run", "--frozen", "--no-sync", "ccm", "demo", "--url",
             f"http://127.0.0.1:{ports[0]}", "--billing-url", f"http://127.0.0.1:{ports[1]}",
             "--careplan-url", f"http://127.0.0.1:{ports[2]}",
             "--notification-url", f"http://127.0.0.1:{ports[3]}",
             "--token", token, "--patients", "22",
             "--out", str(out), "--wait-timeout", "180"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
        )
        assert demo.returncode == 0, f"{demo.stderr[-4000:]}\n--- ccm up:\n{up.tail()}"
    finally:
        up.stop()

    summary = json.loads((out / "summary.json").read_text())
    month = summary["month"]
    # every billing-rule edge case decided as the rules document says
    edge = list(csv.DictReader((out / "edge-cases.csv").open()))
    assert len(edge) == 21 and summary["edgeCases"] == {"total": 21, "asExpected": 21}, [
        e for e in edge if e["as_expected"] != "yes"]
    # the report, the Invoice and its ChargeItems agree
    rows = list(csv.DictReader((out / f"billing-report-{month}.csv").open()))
    total = next(r for r in rows if r["patient"] == "TOTAL")
    invoice = json.loads((out / f"invoice-{month}.json").read_text())
    items = json.loads((out / f"charge-items-{month}.json").read_text())
    assert invoice["resourceType"] == "Invoice" and invoice["status"] == "issued"
    assert f"{invoice['totalNet']['value']:.2f}" == total["amount"] == summary["invoice"]["total"]
    assert len(items["entry"]) == len(invoice["lineItem"]) == sum(
        1 for r in rows if r["code"] and r["patient"] != "TOTAL")
    # each ChargeItem at its absolute URL, where billing serves it (R4: fullUrl is absolute)
    for entry in items["entry"]:
        assert entry["fullUrl"].startswith(("http://", "https://")), entry["fullUrl"]
        assert entry["fullUrl"].endswith(f"/fhir/ChargeItem/{entry['resource']['id']}")
    assert summary["patients"] == 22 and 0 < summary["billable"] < 22
    assert summary["blockers"]["consent-missing"] >= 2
    # careplan saw every plan (21 of 22 patients have one); the overdue one is overdue
    tracker = list(csv.DictReader((out / "care-plan-tracker.csv").open()))
    assert len(tracker) == 21
    assert summary["carePlans"]["overdue"] >= 1
    # notification rendered the month-close messages for the practice's supervisor
    notes = json.loads((out / "notifications" / "index.json").read_text())
    kinds = {n["kind"] for n in notes}
    assert {"invoice-issued", "utilization-summary"} <= kinds
    assert all(n["text"] for n in notes)
    packet = next(out.glob("audit-packet-*.json"))
    audit = json.loads(packet.read_text())
    assert audit["decision"]["codes"] and audit["auditEvents"]["entry"]
    assert audit["billingAuditPacket"]["resourceType"] == "Bundle"
    assert "Billable by code" in (out / "summary.txt").read_text()
    assert "decided as the rules expect: 21/21" in demo.stdout
