"""Keeping the tracker in step with ingest's events, and recording reviews.

Handlers never commit: the consumer runtime (or the HTTP request) owns the unit of work.
Duplicates are harmless (the inbox drops redelivered events; a re-sent version is recognised by
its versionId and mapping revision) and late, older versions never overwrite newer state. Events
are ordered as ingest orders them (``version_order``): lastUpdated, versionId, then
``source.mappingRevision``, which ingest sets when it maps the same stored version again after
the practice's mapping configuration changed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date, datetime

import structlog
from sqlalchemy import select, update

from ccm_careplan.adapters.orm import (
    conditions,
    patients,
    practitioners,
    review_steps,
    reviews,
    trackers,
    versions,
)
from ccm_careplan.domain.rules import ReviewRules
from ccm_careplan.domain.schedule import COMPLETED, ESCALATED, OVERDUE, RESOLVED
from ccm_careplan.domain.tracker import (
    SIGNED_OUTCOMES,
    is_chronic_active,
    mapping_revision,
    parse_day,
    parse_instant,
    version_order,
)
from ccm_careplan.service_layer.common import (
    StepClaim,
    claim_steps,
    compute_due,
    distribute_version,
    insert_for,
    load_rules,
    lock_tracker,
    practice_today,
    responsible_provider,
    review_event,
    tracker_id,
)
from ccm_shared.db import UnitOfWork
from ccm_shared.events import CloudEvent

log = structlog.get_logger(__name__)

CARE_PLAN_TOPICS = (
    "ingest.care-plan.created.v1", "ingest.care-plan.revised.v1", "ingest.care-plan.closed.v1",
)
FACT_TOPICS = (
    "ingest.condition.upserted.v1", "ingest.patient.upserted.v1",
    "ingest.practitioner.upserted.v1", "ingest.practitioner-role.upserted.v1",
)
CONSUMED_TOPICS = CARE_PLAN_TOPICS + FACT_TOPICS


async def complete_review(
    uow: UnitOfWork, row: dict, *, rules: ReviewRules, review_date: date, reviewer: str | None,
    outcome: str, notes: str | None, source: str, version_id: str | None, now: datetime,
) -> dict:
    """Record a review; a signed one closes the cycle (completed, and resolved when it was late)
    and restarts the clock. Returns the updated tracker row."""
    cycle_due = row["next_review_due"]
    days_overdue = max(0, (review_date - cycle_due).days) if cycle_due else 0
    await uow.session.execute(reviews.insert().values(
        id=str(uuid.uuid4()), tracker_id=row["id"], practice=row["practice"],
        review_date=review_date, reviewer=reviewer, outcome=outcome, notes=notes, source=source,
        version_id=version_id, cycle_due=cycle_due, days_overdue=days_overdue, recorded_at=now,
    ))
    if outcome not in SIGNED_OUTCOMES:
        changes = {"signoff_status": "declined", "signoff_by": reviewer,
                   "signoff_date": review_date}
    else:
        if cycle_due is not None:
            await _close_cycle(uow, row, rules=rules, due=cycle_due, day=review_date, now=now)
        changes = {
            "last_review": review_date, "last_reviewer": reviewer, "signoff_status": "signed",
            "signoff_by": reviewer, "signoff_date": review_date, "early_trigger": None,
            "early_trigger_date": None, "reminders_sent": 0, "escalation_level": 0,
        }
    row = {**row, **changes}
    row["next_review_due"] = compute_due(row, rules)
    await uow.session.execute(update(trackers).where(trackers.c.id == row["id"]).values(
        **changes, next_review_due=row["next_review_due"], updated_at=now))
    return row


async def _close_cycle(
    uow: UnitOfWork, row: dict, *, rules: ReviewRules, due: date, day: date, now: datetime
) -> None:
    sent = (await uow.session.execute(select(review_steps.c.kind, review_steps.c.step).where(
        review_steps.c.tracker_id == row["id"], review_steps.c.cycle_due == due,
        review_steps.c.sent.is_(True)))).all()
    level = max((s.step for s in sent if s.kind == ESCALATED), default=0)
    late = level > 0 or any(s.kind == OVERDUE for s in sent)
    provider = await responsible_provider(uow.session, row["practice"], row)
    for kind, step, wanted in ((COMPLETED, 0, True), (RESOLVED, level, late)):
        if not wanted:
            continue
        claim = StepClaim(row["practice"], row["id"], kind, due, step, day, True)
        if claim.key in await claim_steps(uow, [claim], now):
            event = review_event(row=row, kind=kind, due=due, step=step, day=day,
                                 key=claim.key, now=now, provider=provider,
                                 supervisor=rules.clinical_supervisor)
            await uow.outbox.add(event.type, event)


async def apply_care_plan_event(event: CloudEvent, uow: UnitOfWork, now: datetime) -> None:
    """A version of a care plan: newer ones (``version_order``) become the tracker's current
    version, older ones only join its history. A re-mapping of the current version (a higher
    mapping revision: the practice's ingest configuration changed, the plan did not) restates
    its fields, status included (closed as ``entered-in-error`` when it is no CCM plan any more,
    active again when it becomes one again), but it is no revision of the plan: the sign-off
    stands and the review is not brought forward."""
    data, practice = event.data, event.tenant
    source = data["source"]
    version, last_updated = source["versionId"], parse_instant(source["lastUpdated"])
    revision = mapping_revision(source)
    version_day = await practice_today(uow.session, practice, last_updated)
    tid = tracker_id(practice, data["carePlan"])
    row = await lock_tracker(uow.session, practice, tid)
    # Read once the plan is held: a rules change moves every plan's due date under its lock, so
    # the rules read now are either the ones it left or the ones it recomputed with. (Read before
    # waiting for it, a version recomputed the due date with the rules it replaced.) A plan new
    # here has no row to hold, and a change in progress would not see it: its rules are held
    # instead (a change takes them first, then the plans: the same order, no deadlock).
    rules = await load_rules(uow.session, practice, share=row is None)
    fields = {
        "status": data["status"], "intent": data["intent"], "author": data.get("author"),
        "care_team": list(data.get("careTeam") or []),
        "addresses": list(data.get("addresses") or []),
        "created": parse_day(data.get("created")) or parse_day(
            (data.get("period") or {}).get("start")),
        "current_version": version, "current_last_updated": last_updated,
        "current_mapping_revision": revision,
    }
    if row is None:
        row = {
            "id": tid, "practice": practice, "care_plan": data["carePlan"],
            "patient": data["patient"], "first_seen": version_day, "last_review": None,
            "last_reviewer": None, "early_trigger": None, "early_trigger_date": None,
            "signoff_status": "awaiting", "signoff_by": None, "signoff_date": None,
            "reminders_sent": 0, "escalation_level": 0, **fields,
        }
        row["next_review_due"] = compute_due(row, rules)
        await uow.session.execute(trackers.insert().values(**row, updated_at=now))
        newer, is_new, restated = True, True, False
    else:
        incoming = version_order(last_updated, version, revision)
        current = version_order(row["current_last_updated"], row["current_version"],
                                row["current_mapping_revision"])
        newer = row["current_last_updated"] is None or incoming > current
        restated = newer and incoming[:2] == current[:2]
        is_new = False
    evidence = data.get("review") or None
    review_day = parse_day(evidence.get("date")) if evidence else None
    inserted = await uow.session.execute(
        insert_for(uow.session)(versions).values(
            tracker_id=tid, version_id=version, practice=practice, event_type=event.type,
            status=data["status"], last_updated=last_updated, review_date=review_day,
            applied=newer, received_at=now, mapping_revision=revision,
        ).on_conflict_do_nothing(index_elements=["tracker_id", "version_id", "mapping_revision"])
        .returning(versions.c.version_id)
    )
    if inserted.first() is None:
        return  # the same version again (a re-push or a redelivery under a new event id)
    if newer and not is_new:
        changes = dict(fields)
        if review_day is None and not restated:
            changes["signoff_status"] = "awaiting"  # a changed plan needs a new sign-off
            anchor = row["last_review"] or row["created"] or row["first_seen"]
            if (event.type.endswith("revised.v1") and rules.early_review_on_plan_revision
                    and version_day > anchor):
                changes |= {"early_trigger": "plan-revised", "early_trigger_date": version_day}
        row = {**row, **changes}
        due = compute_due(row, rules)
        if due != row["next_review_due"]:
            changes |= {"next_review_due": due, "reminders_sent": 0, "escalation_level": 0}
            row |= changes
        await uow.session.execute(update(trackers).where(trackers.c.id == tid).values(
            **changes, updated_at=now))
    if newer and row["status"] == "active":
        await distribute_version(uow, row, now)
    if review_day is not None and (row["last_review"] is None or review_day > row["last_review"]):
        await complete_review(
            uow, row, rules=rules, review_date=review_day, reviewer=evidence.get("reviewer"),
            outcome="approved", notes=None, source="ehr", version_id=version, now=now,
        )


async def apply_condition_event(event: CloudEvent, uow: UnitOfWork, now: datetime) -> None:
    """A condition newly active and chronic brings the patient's plans' reviews forward."""
    data, practice = event.data, event.tenant
    values = _fact_version(data["source"])
    last_updated = values["last_updated"]
    existing = (await uow.session.execute(select(conditions).where(
        conditions.c.practice == practice, conditions.c.condition == data["condition"]))).first()
    if existing is not None and not _is_newer(values, existing._mapping):
        return  # an older version arriving late, or the same one again
    chronic = is_chronic_active(data)
    values |= {"patient": data["patient"], "chronic_active": chronic}
    await uow.session.execute(
        insert_for(uow.session)(conditions).values(practice=practice,
                                                   condition=data["condition"], **values)
        .on_conflict_do_update(index_elements=["practice", "condition"], set_=values))
    if not chronic or (existing is not None and existing.chronic_active):
        return
    plans = [dict(r._mapping) for r in (await uow.session.execute(
        select(trackers).where(trackers.c.practice == practice,
                               trackers.c.patient == data["patient"],
                               trackers.c.status == "active")
        .order_by(trackers.c.id).with_for_update())).all()]
    # The rules once the plans are held (as for a plan's version: apply_care_plan_event).
    rules = await load_rules(uow.session, practice)
    if not plans or not rules.early_review_on_new_chronic_condition:
        return
    day = await practice_today(uow.session, practice, last_updated)
    for row in plans:
        tid = row["id"]
        anchor = row["last_review"] or row["created"] or row["first_seen"]
        if data["condition"] in (row["addresses"] or []) or day <= anchor:
            continue  # the plan already addresses it, or predates it
        if row["early_trigger_date"] is not None and row["early_trigger_date"] <= day:
            continue  # an earlier clinical change already brought the review forward
        row |= {"early_trigger": "new-chronic-condition", "early_trigger_date": day}
        changes = {"early_trigger": row["early_trigger"], "early_trigger_date": day}
        due = compute_due(row, rules)
        if due != row["next_review_due"]:
            changes |= {"next_review_due": due, "reminders_sent": 0, "escalation_level": 0}
        await uow.session.execute(update(trackers).where(trackers.c.id == tid).values(
            **changes, updated_at=now))


def _fact_version(source: dict) -> dict:
    """The source version columns of a fact (``orm.fact_version``)."""
    return {"last_updated": parse_instant(source["lastUpdated"]),
            "version_id": source["versionId"], "mapping_revision": mapping_revision(source)}


def _is_newer(incoming: dict, stored) -> bool:  # noqa: ANN001 - a row mapping
    """Whether an event's version (``_fact_version``) comes after the one a fact holds: a
    re-mapping of the same version does, the same version and revision again does not."""
    return version_order(incoming["last_updated"], incoming["version_id"],
                         incoming["mapping_revision"]) > version_order(
        stored["last_updated"], stored["version_id"], stored["mapping_revision"])


async def _upsert_if_newer(uow: UnitOfWork, table, keys: dict, values: dict) -> None:  # noqa: ANN001
    where = [table.c[k] == v for k, v in keys.items()]
    existing = (await uow.session.execute(select(
        table.c.last_updated, table.c.version_id, table.c.mapping_revision).where(*where))).first()
    if existing is not None and not _is_newer(values, existing._mapping):
        return
    await uow.session.execute(
        insert_for(uow.session)(table).values(**keys, **values)
        .on_conflict_do_update(index_elements=list(keys), set_=values))


async def apply_patient_event(event: CloudEvent, uow: UnitOfWork, now: datetime) -> None:
    d = event.data
    await _upsert_if_newer(uow, patients, {"practice": event.tenant, "patient": d["patient"]}, {
        "active": bool(d["active"]), "deceased": bool(d["deceased"]),
        "deleted": bool(d["deleted"]), "general_practitioners": list(d["generalPractitioner"]),
        **_fact_version(d["source"]),
    })


def _display(name: dict | None) -> str | None:
    if not name:
        return None
    text = name.get("text") or " ".join([*name.get("given", []), name.get("family") or ""])
    return text.strip()[:200] or None


async def apply_practitioner_event(event: CloudEvent, uow: UnitOfWork, now: datetime) -> None:
    d = event.data
    is_role = "practitionerRole" in d
    reference = d["practitionerRole"] if is_role else d["practitioner"]
    await _upsert_if_newer(uow, practitioners, {"practice": event.tenant,
                                                "reference": reference}, {
        "practitioner": d.get("practitioner") if is_role else None,
        "display": None if is_role else _display(d.get("name")),
        "active": bool(d["active"]), "deleted": bool(d["deleted"]),
        **_fact_version(d["source"]),
    })


HANDLERS = {
    **{t: apply_care_plan_event for t in CARE_PLAN_TOPICS},
    "ingest.condition.upserted.v1": apply_condition_event,
    "ingest.patient.upserted.v1": apply_patient_event,
    "ingest.practitioner.upserted.v1": apply_practitioner_event,
    "ingest.practitioner-role.upserted.v1": apply_practitioner_event,
}


def make_handler(clock: Callable[[], datetime]):  # noqa: ANN201
    """The consumer handler: dispatch on event type; unknown types are acknowledged and ignored."""

    async def handle(event: CloudEvent, uow: UnitOfWork) -> None:
        handler = HANDLERS.get(event.type)
        if handler is None:
            log.warning("ignoring unexpected event type", event_type=event.type)
            return
        await handler(event, uow, clock())

    return handle
