"""Evidence billing keeps as it works, append-only: every source FHIR version it consumed, every
care-plan review completed, and every filing of a patient-month decision (close, corrections).

Writers run inside the consumer's or the request's unit of work and never commit.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime

from sqlalchemy import bindparam, func, select

from ccm_billing.adapters import filed, orm
from ccm_billing.domain.model import Decision, Month, PatientMonth
from ccm_billing.service_layer.common import (
    bulk_insert,
    insert_for,
    parse_day,
    parse_instant,
    refuse_unheld,
)
from ccm_shared.db import UnitOfWork, dialect_insert
from ccm_shared.events import CloudEvent
from ccm_shared.jsontext import compact

REVIEW_COMPLETED = "careplan.review.completed.v1"


def _ref_id(reference: str | None) -> str | None:
    return reference.split("/", 1)[1] if reference else None


async def record_source_version(event: CloudEvent, uow: UnitOfWork, now: datetime) -> None:
    """Keep the source version an ingest event was mapped from (a redelivery is a no-op)."""
    source = event.data.get("source")
    if not source:
        return
    # The contracts bound none of these: a versionId longer than a FHIR id's 64 characters (and
    # so a version key no projection holds), an unknown type's name, is refused here, first.
    row = dict(
        practice=event.tenant,
        resource_type=source["resourceType"],
        resource_id=source["id"],
        version_id=str(source["versionId"]),
        event_type=event.type,
        patient=_ref_id(event.data.get("patient")),
        last_updated=parse_instant(source["lastUpdated"]),
        sha256=source["sha256"],
        received_at=parse_instant(source["receivedAt"]),
        connection=source.get("connection"),
        recorded_at=now,
        data=json.dumps({k: v for k, v in event.data.items() if k != "source"},
                        separators=(",", ":")),
    )
    refuse_unheld(orm.source_versions, row)
    await uow.session.execute(_source_version_insert(uow.session.bind.dialect.name), row)


@functools.cache
def _source_version_insert(dialect: str):  # noqa: ANN202 - built once: it runs for every event
    table = orm.source_versions
    return dialect_insert(dialect)(table).values({c.name: bindparam(c.name, type_=c.type) for c in table.c}) \
        .on_conflict_do_nothing()


async def record_review(event: CloudEvent, uow: UnitOfWork) -> None:
    """Project careplan.review.completed.v1: one row per idempotency key."""
    d = event.data
    row = dict(
        practice=event.tenant,
        idempotency_key=d["idempotencyKey"],
        patient=_ref_id(d["patient"]),
        care_plan_id=_ref_id(d["carePlan"]),
        tracker=d["tracker"],
        due_date=parse_day(d["dueDate"]),
        completed_at=event.time,
        days_overdue=d["daysOverdue"],
        responsible_provider=d.get("responsibleProvider"),
        supervisor=d.get("supervisor"),
        event_id=event.id,
    )
    refuse_unheld(orm.care_plan_reviews, row)  # a tracker, key or event id of any length
    stmt = insert_for(uow.session)(orm.care_plan_reviews).values(**row).on_conflict_do_nothing()
    await uow.session.execute(stmt)


def entries_of(facts: PatientMonth) -> list[dict]:
    """The month's time entries as decided: performer, role, seconds (start in UTC)."""
    return [
        {"entry": e.entry_id, "seconds": e.seconds, "role": e.role, "status": e.status,
         "start": (e.start if e.start.tzinfo else e.start.replace(tzinfo=UTC)).astimezone(UTC).isoformat(),
         "practitioner": e.practitioner, "late": e.late, "complex": e.complex}
        for e in facts.entries
    ]


def _entries(facts: PatientMonth) -> str:
    return compact(entries_of(facts))


async def filed_decisions(session, practice: str, month: str) -> list[dict]:  # noqa: ANN001
    """A closed month's decisions as filed, the month's one record of them: each patient's latest
    filing (revision 0 at close, then one per correction that changed it), less the patients a
    correction took out of the month, in patient order."""
    f = filed.filings
    latest: dict[str, tuple[int, str]] = {}
    for patient, revision, decision in (await session.execute(
            select(f.c.patient, f.c.revision, f.c.decision)
            .where(f.c.practice == practice, f.c.month == month))).all():
        if patient not in latest or revision > latest[patient][0]:
            latest[patient] = (revision, decision)
    docs = (json.loads(latest[p][1]) for p in sorted(latest))
    return [d for d in docs if d is not None]


async def file_decisions(uow: UnitOfWork, practice: str, month: Month, facts: list[PatientMonth],
                         decisions: list[Decision], *, reason: str, now: datetime,
                         previous: list[dict] | None = None) -> int:
    """File the month's decisions: all of them at close (revision 0); after a correction only the
    patients whose decision changed from ``previous`` (``filed_decisions``), each as its next
    revision. Returns how many were filed."""
    docs = {d.patient: d.to_dict() for d in decisions}
    by_patient = {f.patient: f for f in facts}
    if previous is None:
        changed = list(docs)
        revisions = dict.fromkeys(changed, 0)
    else:
        before = {x["patient"].removeprefix("Patient/"): x for x in previous}
        changed = [p for p in docs if before.get(p) != docs[p]]
        changed += [p for p in before if p not in docs]  # no longer enrolled this month
        if not changed:
            return 0
        f = filed.filings
        rows = await uow.session.execute(
            select(f.c.patient, func.max(f.c.revision))
            .where(f.c.practice == practice, f.c.month == str(month), f.c.patient.in_(changed))
            .group_by(f.c.patient)
        )
        last = dict(rows.all())
        revisions = {p: last.get(p, -1) + 1 for p in changed}
    rows = [
        {
            "practice": practice, "patient": p, "month": str(month), "revision": revisions[p],
            "filed_at": now, "reason": reason,
            "decision": compact(docs.get(p)),
            "entries": _entries(by_patient[p]) if p in by_patient else "[]",
        }
        for p in changed
    ]
    await bulk_insert(uow.session, orm.decision_filings, rows)
    return len(rows)
