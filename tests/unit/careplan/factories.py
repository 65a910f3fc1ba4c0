"""Ingest events as ingest publishes them (contracts/events), and a settable clock, for the
careplan tests."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from ccm_shared.events import CloudEvent


def _source(resource: str, version: str, last_updated: datetime,
            mapping_revision: int | None = None) -> dict:
    """``mapping_revision``: ingest mapped the stored version again after a config change."""
    kind, _, rid = resource.partition("/")
    stamp = last_updated.astimezone(UTC).isoformat().replace("+00:00", "Z")
    source = {"resourceType": kind, "id": rid, "versionId": version, "lastUpdated": stamp,
              "sha256": hashlib.sha256(f"{resource}/{version}".encode()).hexdigest(),
              "receivedAt": stamp, "connection": "ehr-test"}
    if mapping_revision is not None:
        source["mappingRevision"] = mapping_revision
    return source


def care_plan(
    practice: str, plan: str, *, kind: str = "created", version: str = "1",
    at: datetime, patient: str = "Patient/p1", status: str = "active",
    created: str | None = None, author: str | None = "Practitioner/dr-lee",
    care_team: tuple[str, ...] = ("Practitioner/rn-diaz",), addresses: tuple[str, ...] = (),
    review: dict | None = None, mapping_revision: int | None = None,
) -> CloudEvent:
    data = {
        "source": _source(plan, version, at, mapping_revision), "carePlan": plan,
        "patient": patient,
        "status": status, "intent": "plan",
        "created": created if created is not None else at.date().isoformat(),
        "period": {"start": None, "end": None}, "author": author, "careTeam": list(care_team),
        "addresses": list(addresses), "categories": [{"system": None, "code": "assess-plan"}],
    }
    if review is not None:
        data["review"] = review
    return CloudEvent(source="/ccm/ingest/connection/test", type=f"ingest.care-plan.{kind}.v1",
                      tenant=practice, subject=patient, data=data, time=at)


def condition(practice: str, ref: str, *, at: datetime, patient: str = "Patient/p1",
              chronic: bool = True, version: str = "1", status: str = "active",
              mapping_revision: int | None = None) -> CloudEvent:
    data = {"source": _source(ref, version, at, mapping_revision), "condition": ref,
            "patient": patient,
            "clinicalStatus": status, "verificationStatus": "confirmed",
            "categories": [{"system": None, "code": "problem-list-item"}],
            "code": [{"system": "http://snomed.info/sct", "code": "44054006"}],
            "chronic": chronic, "deleted": False}
    return CloudEvent(source="/ccm/ingest/connection/test", type="ingest.condition.upserted.v1",
                      tenant=practice, subject=patient, data=data, time=at)


def patient(practice: str, ref: str = "Patient/p1", *, at: datetime, active: bool = True,
            deceased: bool = False, gps: tuple[str, ...] = (), version: str = "1",
            mapping_revision: int | None = None) -> CloudEvent:
    data = {"source": _source(ref, version, at, mapping_revision), "patient": ref,
            "active": active, "mbi": None,
            "name": None, "managingOrganization": None, "generalPractitioner": list(gps),
            "deceased": deceased, "deleted": False}
    return CloudEvent(source="/ccm/ingest/connection/test", type="ingest.patient.upserted.v1",
                      tenant=practice, subject=ref, data=data, time=at)


def practitioner(practice: str, ref: str, *, at: datetime, active: bool = True,
                 version: str = "1", mapping_revision: int | None = None) -> CloudEvent:
    data = {"source": _source(ref, version, at, mapping_revision), "practitioner": ref,
            "active": active,
            "name": {"family": "Lee", "given": ["Ana"]}, "npi": None, "telecom": [],
            "qualifications": [], "deleted": False}
    return CloudEvent(source="/ccm/ingest/connection/test", type="ingest.practitioner.upserted.v1",
                      tenant=practice, subject=ref, data=data, time=at)


class Clock:
    """The runtime's injectable clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
