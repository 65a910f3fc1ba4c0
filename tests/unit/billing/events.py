"""Ingest events as contracts/events describes them, for feeding the billing projections."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from ccm_shared.events import CloudEvent
from tests.support.contracts import assert_valid_event

RECEIVED = "2025-04-01T00:00:00Z"
# The warning every eligible month of these events carries: ingest's condition events do not
# say a chronic code list judged them (billing README, chronic-conditions-unverified).
UNCHECKED = "chronic-conditions-unverified"


def source(rtype: str, rid: str, version: int = 1, updated: str | None = None) -> dict:
    updated = updated or f"2025-01-01T00:00:{version:02d}Z"
    return {"resourceType": rtype, "id": rid, "versionId": str(version), "lastUpdated": updated,
            "sha256": hashlib.sha256(f"{rtype}{rid}{version}".encode()).hexdigest(),
            "receivedAt": RECEIVED}


def event(practice: str, type_: str, patient: str | None, data: dict, *, eid: str | None = None) -> CloudEvent:
    e = CloudEvent(source="/ccm/ingest/test", type=type_, tenant=practice,
                   subject=f"Patient/{patient}" if patient else None, data=data,
                   time=datetime(2025, 4, 1, tzinfo=UTC), **({"id": eid} if eid else {}))
    assert_valid_event(e)
    return e


def time_logged(practice, patient, entry, seconds, start, *, practitioner="Practitioner/nurse-1",
                role="PractitionerRole/nurse-1", version=1, complex_=False, role_codes=()):  # noqa: ANN001, ANN201
    return event(practice, "ingest.time-entry.logged.v1", patient, {
        "source": source("Encounter", entry, version), "entry": f"Encounter/{entry}",
        "patient": f"Patient/{patient}", "seconds": seconds, "start": start, "end": None,
        "serviceDate": start[:10], "serviceMonth": start[:7], "activityCodes": ["99490"],
        "complex": complex_, "warnings": [],
        "performers": [{"practitioner": practitioner, "practitionerRole": role,
                        "roleCodes": list(role_codes)}],
    })


def time_reversed(practice, patient, entry, *, version=2, reason="entered-in-error", month=None):  # noqa: ANN001, ANN201
    return event(practice, "ingest.time-entry.reversed.v1", patient, {
        "source": source("Encounter", entry, version), "entry": f"Encounter/{entry}",
        "patient": f"Patient/{patient}", "reason": reason, "serviceMonth": month})


CONSENT_TYPES = {"active": "granted", "inactive": "revoked", "rejected": "declined",
                 "entered-in-error": "voided"}


def consent(practice, patient, cid, *, status="active", obtained="2024-12-01T10:00:00-05:00",
            version=1, effective_until=None, practitioner="Practitioner/doc-1"):  # noqa: ANN001, ANN201
    return event(practice, f"ingest.consent.{CONSENT_TYPES[status]}.v1", patient, {
        "source": source("Consent", cid, version), "consent": f"Consent/{cid}",
        "patient": f"Patient/{patient}", "status": status, "obtainedAt": obtained,
        "method": "written", "period": {}, "provision": "permit",
        "practitioners": [practitioner] if practitioner else [], "categories": [],
        "effectiveUntil": effective_until})


def care_plan(practice, patient, pid, *, status="active", created="2024-12-01", version=1):  # noqa: ANN001, ANN201
    kind = "closed" if status in ("revoked", "completed", "entered-in-error") else (
        "created" if version == 1 else "revised")
    return event(practice, f"ingest.care-plan.{kind}.v1", patient, {
        "source": source("CarePlan", pid, version), "carePlan": f"CarePlan/{pid}",
        "patient": f"Patient/{patient}", "status": status, "intent": "plan", "created": created,
        "period": {}, "author": None, "careTeam": [], "addresses": [], "categories": []})


def condition(practice, patient, cid, *, chronic=True, status="active", version=1,  # noqa: ANN001, ANN201
              onset="2019-04-02"):
    """A chronic condition long had (its onset: each month counts the conditions had in it)."""
    return event(practice, "ingest.condition.upserted.v1", patient, {
        "source": source("Condition", cid, version), "condition": f"Condition/{cid}",
        "patient": f"Patient/{patient}", "clinicalStatus": status, "verificationStatus": "confirmed",
        "categories": [], "code": [], "onset": onset, "chronic": chronic, "deleted": False})


def patient(practice, pid, *, mbi=None, version=1):  # noqa: ANN001, ANN201
    return event(practice, "ingest.patient.upserted.v1", pid, {
        "source": source("Patient", pid, version), "patient": f"Patient/{pid}", "active": True,
        "mbi": mbi, "name": None, "managingOrganization": None, "generalPractitioner": [],
        "deceased": False, "deleted": False})


def role(practice, rid, classification, *, practitioner=None, version=1):  # noqa: ANN001, ANN201
    return event(practice, "ingest.practitioner-role.upserted.v1", None, {
        "source": source("PractitionerRole", rid, version), "practitionerRole": f"PractitionerRole/{rid}",
        "practitioner": practitioner, "organization": None, "active": True, "codes": [],
        "specialties": [], "classification": classification, "telecom": [], "deleted": False})


def visit(practice, patient, vid, *, day="2024-12-01", version=1, reason=None,
          practitioner="Practitioner/doc-1", code="99214"):  # noqa: ANN001, ANN201
    """A qualifying visit recorded, or reversed when ``reason`` is given."""
    data = {"source": source("Encounter", vid, version), "visit": f"Encounter/{vid}",
            "patient": f"Patient/{patient}", "date": day}
    if reason:
        return event(practice, "ingest.visit.reversed.v1", patient, {**data, "reason": reason})
    return event(practice, "ingest.visit.recorded.v1", patient, {
        **data, "codes": [code],
        "performers": [{"practitioner": practitioner, "practitionerRole": None, "roleCodes": []}]})


def enrolled_patient(practice, pid, *, mbi=None):  # noqa: ANN001, ANN201
    """Patient, consent, care plan, two chronic conditions and the initiating visit (the day of
    the consent, by its practitioner): billable once time is logged."""
    return [patient(practice, pid, mbi=mbi), consent(practice, pid, f"c-{pid}"),
            care_plan(practice, pid, f"cp-{pid}"), condition(practice, pid, f"k1-{pid}"),
            condition(practice, pid, f"k2-{pid}"), visit(practice, pid, f"v-{pid}")]
