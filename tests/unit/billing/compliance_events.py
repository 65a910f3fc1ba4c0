"""Events for the compliance tests: consents with their method and dates, care-plan versions with
review evidence, time entries with realistic version times, care-plan reviews completed."""

from __future__ import annotations

import hashlib
from datetime import datetime

from ccm_shared.events import CloudEvent
from tests.support.contracts import assert_valid_event

from tests.unit.billing import events as ev


def src(rtype: str, rid: str, version: int, updated: str, received: str | None = None) -> dict:
    return {"resourceType": rtype, "id": rid, "versionId": str(version), "lastUpdated": updated,
            "sha256": hashlib.sha256(f"{rtype}/{rid}/{version}".encode()).hexdigest(),
            "receivedAt": received or updated, "connection": "ehr-test"}


def consent(practice, patient, cid, *, status="active", obtained="2024-12-01T10:00:00-05:00",  # noqa: ANN001, ANN201
            version=1, updated=None, method="written", effective_until=None, provision="permit"):
    return ev.event(practice, f"ingest.consent.{ev.CONSENT_TYPES[status]}.v1", patient, {
        "source": src("Consent", cid, version, updated or obtained), "consent": f"Consent/{cid}",
        "patient": f"Patient/{patient}", "status": status, "obtainedAt": obtained,
        "method": method, "period": {}, "provision": provision,
        "practitioners": ["Practitioner/doc-1"], "categories": [], "effectiveUntil": effective_until})


def care_plan(practice, patient, pid, *, version, updated, status="active", review=None):  # noqa: ANN001, ANN201
    kind = "created" if version == 1 else "revised"
    return ev.event(practice, f"ingest.care-plan.{kind}.v1", patient, {
        "source": src("CarePlan", pid, version, updated), "carePlan": f"CarePlan/{pid}",
        "patient": f"Patient/{patient}", "status": status, "intent": "plan",
        "created": "2024-12-01", "period": {}, "author": None, "careTeam": [], "addresses": [],
        "categories": [], "review": {"date": review, "reviewer": "Practitioner/doc-1"} if review else None})


def time_logged(practice, patient, entry, seconds, start, *, version=1, updated=None):  # noqa: ANN001, ANN201
    e = ev.time_logged(practice, patient, entry, seconds, start, version=version)
    e.data["source"] = src("Encounter", entry, version, updated or start)
    return e


def time_reversed(practice, patient, entry, *, version=2, updated, reason="entered-in-error"):  # noqa: ANN001, ANN201
    e = ev.time_reversed(practice, patient, entry, version=version, reason=reason)
    e.data["source"] = src("Encounter", entry, version, updated)
    return e


def review_completed(practice, patient, plan, *, due, completed, step=0):  # noqa: ANN001, ANN201
    e = CloudEvent(source="/ccm/careplan/test", type="careplan.review.completed.v1", tenant=practice,
                   subject=f"Patient/{patient}", time=datetime.fromisoformat(completed), data={
        "tracker": f"tr-{plan}", "carePlan": f"CarePlan/{plan}", "patient": f"Patient/{patient}",
        "dueDate": due, "daysOverdue": 0, "responsibleProvider": "Practitioner/doc-1",
        "supervisor": None, "step": step, "idempotencyKey": f"{practice}:tr-{plan}:completed:{due}:{step}"})
    assert_valid_event(e)
    return e
