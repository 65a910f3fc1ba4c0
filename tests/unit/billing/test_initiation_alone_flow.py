"""A month that bills G0506 alone (its initiating visit and consent in the month, its time
short of 20 minutes) goes through the worklist, threshold alerts, close, Invoice, report and
corrections like any other billable month."""

from datetime import UTC, datetime

from fhir.resources.R4B.chargeitem import ChargeItem

from ccm_billing.entrypoints.jobs import run_once
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import (
    _close_march,
    _g0506_items,
    _invoice_chain,
    api,
    deliver,
    march_practice,
    outboxed,
)

BASE = "/v1/practices/alpha/billing-periods/2025-03"


async def consented_at_a_visit_with_10_minutes(billing, patient="p4"):
    """``patient`` consents at an office visit on 2 March; 10 minutes of nurse time on the 5th."""
    await deliver(billing, *ev.enrolled_patient("alpha", patient)[:-1],
                  ev.consent("alpha", patient, f"c-{patient}",
                             obtained="2025-03-02T11:00:00-05:00", version=2),
                  ev.visit("alpha", patient, "visit-1", day="2025-03-02"),
                  ev.role("alpha", "nurse-1", "clinical-staff",
                          practitioner="Practitioner/nurse-1"),
                  ev.time_logged("alpha", patient, f"e-{patient}", 600,
                                 "2025-03-05T10:00:00-05:00"))


async def test_a_month_billing_g0506_alone_closes_invoices_and_corrects(billing):
    await march_practice(billing)  # p1: 99490 + 99439 (75.33); p2: 19:59, blocked
    await consented_at_a_visit_with_10_minutes(billing)
    rows = {r["patient"]: r for r in
            (await api(billing).get(f"{BASE}/worklist")).json()["patients"]}
    p4 = rows["Patient/p4"]
    assert p4["billable"] and p4["codes"] == {"G0506": 1} and p4["blockers"] == []
    assert p4["warnings"] == ["time-threshold-not-met"]
    assert p4["nextThreshold"] == {"code": "99490", "minutes": 10, "option": "staff"}
    assert p4["explanation"]["dateOfService"] == "2025-03-02"

    # Still short of every time code: alerted like p2.
    billing.state["clock"].now = datetime(2025, 3, 24, 15, tzinfo=UTC)  # 7 days left
    assert (await run_once(billing))["alerts"] == 2
    alerts = await outboxed(billing, "billing.threshold.at-risk.v1")
    assert sorted((e["data"]["patient"], e["data"]["nextCode"], e["data"]["minutesToNext"])
                  for e in alerts) == [("Patient/p2", "99490", 1), ("Patient/p4", "99490", 10)]

    first = await _close_march(billing)
    assert first["totalNet"] == "120.33"  # 42.00 + 33.33 + G0506 45.00
    (g0506,) = await _g0506_items(billing, "p4")
    ChargeItem.model_validate(g0506)
    assert g0506["status"] == "billable" and g0506["occurrenceDateTime"] == "2025-03-02"
    assert g0506["supportingInformation"] == [{"reference": "Encounter/visit-1"}]
    assert g0506["performer"][0]["actor"]["reference"] == "Practitioner/doc-1"
    report = (await api(billing).get(f"{BASE}/report.json")).json()
    p4_report = next(p for p in report["patients"] if p["patient"] == "Patient/p4")
    assert p4_report["lines"] == [{"code": "G0506", "units": 1, "amount": "45.00",
                                   "medicareAmount": "60.81"}]
    assert report["totals"]["billable"] == 2 and report["totals"]["amount"] == "120.33"
    closed = (await api(billing).post(f"{BASE}/close")).json()
    assert closed["summary"]["codes"] == {"99439": 1, "99490": 1, "G0506": 1}
    assert closed["summary"]["patientsBillable"] == 2

    # The initiating visit entered in error: nothing left to bill for p4, the Invoice reissued.
    await deliver(billing, ev.visit("alpha", "p4", "visit-1", day="2025-03-02", version=2,
                                    reason="entered-in-error"))
    assert await _invoice_chain(billing, first["id"]) == [("cancelled", "120.33"),
                                                          ("issued", "75.33")]
    assert [i["status"] for i in await _g0506_items(billing, "p4")] == ["entered-in-error"]
    # Recorded again: billed again, the same line.
    await deliver(billing, ev.visit("alpha", "p4", "visit-1", day="2025-03-02", version=3))
    assert await _invoice_chain(billing, first["id"]) == [
        ("cancelled", "120.33"), ("cancelled", "75.33"), ("issued", "120.33")]
    rows = {r["patient"]: r for r in
            (await api(billing).get(f"{BASE}/worklist")).json()["patients"]}
    assert rows["Patient/p4"]["codes"] == {"G0506": 1}


async def test_a_practice_whose_only_patient_bills_g0506_gets_an_invoice(billing):
    await consented_at_a_visit_with_10_minutes(billing)
    first = await _close_march(billing)
    assert first["totalNet"] == "45.00"
    # Its consent entered in error after close: nothing to bill, cancelled without replacement.
    await deliver(billing, ev.consent("alpha", "p4", "c-p4", status="entered-in-error",
                                      obtained="2025-03-02T11:00:00-05:00", version=3))
    assert await _invoice_chain(billing, first["id"]) == [("cancelled", "45.00")]
