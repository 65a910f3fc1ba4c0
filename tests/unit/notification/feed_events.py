"""Contract-valid billing events as billing publishes them (shared by unit and integration)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from ccm_shared.events import CloudEvent

BILLING = "/ccm/billing"


def fhir_invoice(practice: str, invoice_id: str, total: str) -> dict:
    return {
        "resourceType": "Invoice",
        "id": invoice_id,
        "status": "issued",
        "recipient": {"reference": f"Organization/{practice}"},
        "date": "2026-12-01",
        "totalNet": {"value": float(total), "currency": "USD"},
        "totalGross": {"value": float(total), "currency": "USD"},
    }


def invoice_issued(practice: str, month: str = "2026-11", total: str = "124.50",
                   revision: int = 0) -> CloudEvent:
    invoice_id = f"{practice}-{month}-r{revision}-{uuid.uuid4().hex[:6]}"
    return CloudEvent(
        source=BILLING, type="billing.invoice.issued.v1", tenant=practice,
        subject=f"Invoice/{invoice_id}", time=datetime(2026, 12, 1, 6, tzinfo=UTC),
        data={"invoiceId": invoice_id, "month": month, "revision": revision, "status": "issued",
              "totalNet": total, "totalGross": total,
              "invoice": fhir_invoice(practice, invoice_id, total),
              "replaces": None, "replacedBy": None, "reason": None, "practiceSequence": 1},
    )


def payment_recorded(practice: str, invoice_id: str, amount: str = "50.00") -> CloudEvent:
    return CloudEvent(
        source=BILLING, type="billing.payment.recorded.v1", tenant=practice,
        subject=f"Invoice/{invoice_id}",
        data={"invoiceId": invoice_id, "paymentId": uuid.uuid4().hex[:8], "amount": amount,
              "date": "2026-12-05", "reference": None, "balance": "74.50", "status": "issued"},
    )


def at_risk(practice: str, patient: str = "p1") -> CloudEvent:
    return CloudEvent(
        source=BILLING, type="billing.threshold.at-risk.v1", tenant=practice,
        subject=f"Patient/{patient}",
        data={"patient": f"Patient/{patient}", "month": "2026-11",
              "seconds": {"staff": 900, "practitioner": 0}, "nextCode": "99490",
              "minutesToNext": 5, "daysLeft": 3, "billingPractitioner": None,
              "idempotencyKey": f"{practice}:{patient}:2026-11:99490"},
    )


def period_closed(practice: str, invoice_id: str, month: str = "2026-11") -> CloudEvent:
    return CloudEvent(
        source=BILLING, type="billing.period.closed.v1", tenant=practice,
        subject=f"Organization/{practice}",
        data={"month": month, "invoiceId": invoice_id, "patientsEnrolled": 3,
              "patientsBillable": 2, "patientsBlocked": 1,
              "minutes": {"staff": 65, "practitioner": 0}, "codes": {"99490": 2},
              "blockers": {"consent-missing": 1}, "totalNet": "124.50"},
    )
