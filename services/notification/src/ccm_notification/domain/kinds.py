"""Kinds of notification: the fields each template needs, and which are time-sensitive (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Every template may also use these; the service supplies them.
CONTEXT_FIELDS = ("practice_name", "provider_name", "ack_url")


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    time_sensitive: bool = False  # needs acknowledgement by default

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "utilization-summary",
            "Monthly utilization summary",
            (
                "month",
                "patients_enrolled",
                "patients_billable",
                "patients_blocked",
                "minutes_staff",
                "minutes_practitioner",
                "codes",
                "total_net",
            ),
            ("blockers", "invoice_id"),
        ),
        Kind(
            "care-gap-alert",
            "Care-gap alert",
            ("patient", "gap"),
            ("details", "due_date"),
            time_sensitive=True,
        ),
        Kind(
            "deterioration-escalation",
            "Clinical deterioration escalation",
            ("patient", "finding"),
            ("details", "observed_at"),
            time_sensitive=True,
        ),
        Kind(
            "attestation-reminder",
            "Attestation reminder",
            ("month", "due_date"),
            ("patient_count",),
        ),
        # days_overdue: a reminder sent while the review is overdue says so (not "is due on").
        Kind(
            "review-due",
            "Care-plan review due",
            ("patient", "care_plan", "due_date"),
            ("step", "days_overdue"),
        ),
        Kind(
            "review-overdue",
            "Care-plan review overdue",
            ("patient", "care_plan", "due_date", "days_overdue"),
            ("step",),
        ),
        Kind(
            "review-escalated",
            "Care-plan review escalated",
            ("patient", "care_plan", "due_date", "days_overdue"),
            ("responsible_provider", "step"),
            time_sensitive=True,
        ),
        Kind(
            "threshold-at-risk",
            "Billing threshold at risk",
            ("patient", "month", "next_code", "minutes_to_next", "days_left"),
        ),
        Kind(
            "consent-expiring",
            "CCM consent expiring",
            ("patient", "consent", "expires_on", "days_left"),
        ),
        Kind(
            "invoice-issued",
            "Invoice issued",
            ("invoice_id", "month", "revision", "total_net", "total_gross"),
            # A replacement after a correction: the invoice it replaces, what was already paid
            # (carried from it), and the balance: owed (amount_due) or owed back (owed_back).
            # refund_owed: paid is negative (a payment voided after its overpayment was
            # refunded): the refund is owed back, and counts in amount_due.
            ("replaces", "paid", "balance", "amount_due", "owed_back", "refund_owed"),
        ),
        # A correction that left nothing to bill cancelled the invoice and issued none in its
        # place: what was cancelled, why, and what was paid and is owed back (or still due).
        Kind(
            "invoice-cancelled",
            "Invoice cancelled",
            ("invoice_id", "month", "revision", "total_net"),
            ("reason", "paid", "balance", "amount_due", "owed_back"),
        ),
        # A practice-system webhook subscription paused after failing deliveries in a row.
        Kind(
            "subscription-paused",
            "Practice-system subscription paused",
            ("practice", "subscription", "endpoint", "reason", "consecutive_failures",
             "pending_events"),
            ("description", "delivered_through", "paused_at"),
        ),
        Kind("call-request", "Call requested", ("reason", "slots", "requester_name"), ("patient",)),
        Kind(
            "call-confirmed",
            "Call confirmed",
            ("reason", "start", "end", "with_name"),
            ("patient",),
        ),
        Kind(
            "ack-escalation",
            "Unacknowledged alert escalated",
            ("alert_title", "alert_subject", "unacknowledged_by", "sent_at"),
            ("patient",),
        ),
    )
}


class MissingFields(Exception):
    """A template's required fields were not all supplied: nothing is sent."""

    def __init__(self, kind: str, missing: list[str]) -> None:
        super().__init__(f"{kind}: missing field(s) {', '.join(missing)}")
        self.kind = kind
        self.missing = missing


def check_fields(kind: Kind, values: dict) -> dict:
    """The values a template gets: every required field present (not None/empty string)."""
    missing = [f for f in kind.required if values.get(f) is None or values.get(f) == ""]
    if missing:
        raise MissingFields(kind.name, missing)
    return {f: values.get(f) for f in kind.fields}


# A representative value of every field, as the service supplies it (the types matter: a
# template may format numbers or loop over lists and mappings). Overrides are rendered with these
# on upload, so one that would fail at send time is refused then.
SAMPLE_VALUES: dict[str, Any] = {
    "month": "2026-11",
    "patients_enrolled": 120,
    "patients_billable": 97,
    "patients_blocked": 23,
    "minutes_staff": 2410,
    "minutes_practitioner": 315,
    "codes": {"99490": 80, "99439": 41, "99491": 17},
    "blockers": {"no-consent": 12, "under-20-minutes": 11},
    "total_net": "5321.40",
    "total_gross": "5321.40",
    "invoice_id": "inv-2026-11-0001",
    "revision": 1,
    "replaces": "inv-2026-11-0000",
    "paid": "5400.00",
    "balance": "-78.60",
    "amount_due": None,
    "owed_back": "78.60",
    "refund_owed": "33.33",
    "patient": "Patient/p-123",
    "gap": "HbA1c not measured in 6 months",
    "details": "Last result 2026-03-02",
    "due_date": "2026-12-01",
    "finding": "weight up 3 kg in 2 days",
    "observed_at": "2026-11-26T08:15:00+00:00",
    "patient_count": 42,
    "care_plan": "CarePlan/cp-7",
    "step": 1,
    "days_overdue": 5,
    "responsible_provider": "Practitioner/doc-1",
    "next_code": "99439",
    "minutes_to_next": 6,
    "days_left": 3,
    "consent": "Consent/c-9",
    "expires_on": "2026-12-15",
    "reason": "discuss the care plan",
    "slots": [
        {"label": "Tue 01 Dec 2026 15:00 UTC", "link": "https://ccm.example/v1/calls/choose/a"},
        {"label": "Wed 02 Dec 2026 15:00 UTC", "link": "https://ccm.example/v1/calls/choose/b"},
    ],
    "requester_name": "RN Diaz",
    "start": "Tue 01 Dec 2026 15:00 UTC",
    "end": "Tue 01 Dec 2026 15:15 UTC",
    "with_name": "RN Diaz",
    "alert_title": "Care-gap alert",
    "alert_subject": "[Action needed] Care gap for Patient/p-123",
    "unacknowledged_by": "Dr. One",
    "sent_at": "2026-11-26T08:15",
    "subscription": "3f1c9a2e-5b7d-4e11-9a0c-2d6f8b1e4c70",
    "endpoint": "https://erp.acme.example/ccm-hook",
    "consecutive_failures": 10,
    "pending_events": 4,
    "delivered_through": 37,
    "paused_at": "2026-12-01T07:30:00+00:00",
    "description": "ERP",
    "practice": "acme-clinic",
}


def sample_values(kind: Kind) -> dict[str, Any]:
    """Every field of ``kind`` with its sample value (a plain string for any field without one)."""
    return {f: SAMPLE_VALUES.get(f, f"sample {f}") for f in kind.fields}


def backoff_seconds(attempt: int, initial: float, maximum: float) -> float:
    """Delay before retry number ``attempt`` (1-based): doubling, capped."""
    return min(initial * 2 ** (attempt - 1), maximum)
