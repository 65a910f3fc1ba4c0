"""Kinds of notification: the fields each template needs, and which are time-sensitive (pure)."""

from __future__ import annotations

from dataclasses import dataclass

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
        Kind("review-due", "Care-plan review due", ("patient", "care_plan", "due_date"), ("step",)),
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


def backoff_seconds(attempt: int, initial: float, maximum: float) -> float:
    """Delay before retry number ``attempt`` (1-based): doubling, capped."""
    return min(initial * 2 ** (attempt - 1), maximum)
