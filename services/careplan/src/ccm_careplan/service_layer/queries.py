"""Read side of the tracker: the coordinator's list, one plan's history, the overdue report."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import func, select

from ccm_careplan.adapters.orm import (
    distributions,
    patients,
    review_steps,
    reviews,
    trackers,
    versions,
)
from ccm_careplan.domain.rules import ReviewRules
from ccm_careplan.domain.schedule import ESCALATED, REMINDER, review_state, within
from ccm_careplan.domain.tracker import is_scheduled, resolve_provider, version_order
from ccm_careplan.service_layer.common import (
    general_practitioners,
    practitioner_directory,
    responsible_provider,
)
from ccm_shared.db import UnitOfWork
from ccm_shared.text import ascii_digits

MAX_DUE_WITHIN_DAYS = 3660  # ten years: longer than any review interval the rules allow
REVIEW_FILTERS = ("due", "due-within:{days}", "overdue", "escalated", "awaiting-signoff")
SORTS = {
    "next_review_due": trackers.c.next_review_due,
    "last_review": trackers.c.last_review,
    "created": trackers.c.created,
    "patient": trackers.c.patient,
    "escalation_level": trackers.c.escalation_level,
}


NO_RESPONSIBLE_PROVIDER = (
    "no responsible provider: the plan has no usable author and the patient no usable general "
    "practitioner; its reminders and due/overdue notices wait and go out on the first "
    "scheduler pass after one is known (escalations still go to the supervisor)")


class InvalidQuery(Exception):
    """A filter or sort the list does not understand."""


@dataclass(frozen=True)
class ListQuery:
    review: str | None = None
    patient: str | None = None
    sort: str = "next_review_due"
    limit: int = 50
    offset: int = 0


def _review_condition(practice: str, review: str, today: date, rules: ReviewRules):  # noqa: ANN202
    due = trackers.c.next_review_due
    unusable = select(patients.c.patient).where(
        patients.c.practice == practice,
        patients.c.active.is_(False) | patients.c.deceased | patients.c.deleted)
    active = (trackers.c.status == "active") & trackers.c.patient.not_in(unusable)
    if review == "due":
        return active & (due >= today) & (due <= within(today, rules.due_window_days))
    if review.startswith("due-within:"):
        raw = review.removeprefix("due-within:")
        if not ascii_digits(raw, 4) or int(raw) > MAX_DUE_WITHIN_DAYS:
            raise InvalidQuery(f"due-within takes a whole number of days from 0 to "
                               f"{MAX_DUE_WITHIN_DAYS}, e.g. due-within:30")
        return active & (due >= today) & (due <= within(today, int(raw)))
    if review == "overdue":
        return active & (due < today)
    if review == "escalated":
        return active & (trackers.c.escalation_level > 0)
    if review == "awaiting-signoff":
        return trackers.c.signoff_status.in_(("awaiting", "declined")) & (
            trackers.c.status.in_(("active", "draft", "on-hold")))
    raise InvalidQuery(f"unknown review filter {review!r}; use one of {', '.join(REVIEW_FILTERS)}")


async def _unusable_patients(uow: UnitOfWork, practice: str, refs: set[str]) -> set[str]:
    if not refs:
        return set()
    rows = (await uow.session.execute(select(patients).where(
        patients.c.practice == practice, patients.c.patient.in_(refs)))).all()
    return {p.patient for p in rows if not p.active or p.deceased or p.deleted}


def _summary(row, today: date, rules: ReviewRules, patient_usable: bool,  # noqa: ANN001
             provider: str | None) -> dict:
    due = row.next_review_due
    scheduled = is_scheduled(row.status, patient_usable)
    state = review_state(next_due=due, today=today, rules=rules,
                         escalation_level=row.escalation_level, scheduled=scheduled)
    return {
        "id": row.id,
        "care_plan": row.care_plan,
        "patient": row.patient,
        "status": row.status,
        "patient_active": patient_usable,
        "created": row.created.isoformat() if row.created else None,
        "last_review": row.last_review.isoformat() if row.last_review else None,
        "last_reviewer": row.last_reviewer,
        "next_review_due": due.isoformat() if due else None,
        "days_until_due": (due - today).days if due and scheduled and due >= today else None,
        "days_overdue": (today - due).days if due and scheduled and due < today else 0,
        "review_state": state,
        "early_review": ({"reason": row.early_trigger,
                          "date": row.early_trigger_date.isoformat()}
                         if row.early_trigger else None),
        "signoff": {"status": row.signoff_status, "by": row.signoff_by,
                    "date": row.signoff_date.isoformat() if row.signoff_date else None},
        "responsible_provider": provider,
        # Why the provider's reminders and notices are not going out (the scheduler leaves them
        # owed, and sends them on the first pass after one is known); null when nothing waits.
        "notices_held": NO_RESPONSIBLE_PROVIDER
        if provider is None and state in ("due", "overdue", "escalated") else None,
        "supervisor": rules.clinical_supervisor,
        "reminders_sent": row.reminders_sent,
        "escalation_level": row.escalation_level,
        "current_version": row.current_version,
    }


async def list_trackers(
    uow: UnitOfWork, practice: str, query: ListQuery, today: date, rules: ReviewRules
) -> dict:
    conditions = [trackers.c.practice == practice]
    if query.review:
        conditions.append(_review_condition(practice, query.review, today, rules))
    if query.patient:
        conditions.append(trackers.c.patient == query.patient)
    descending = query.sort.startswith("-")
    column = SORTS.get(query.sort.removeprefix("-"))
    if column is None:
        raise InvalidQuery(f"unknown sort {query.sort!r}; use one of {', '.join(SORTS)} "
                           "(prefix - for descending)")
    order = (column.desc() if descending else column.asc()).nulls_last()
    total = (await uow.session.execute(
        select(func.count()).select_from(trackers).where(*conditions))).scalar_one()
    rows = (await uow.session.execute(
        select(trackers).where(*conditions).order_by(order, trackers.c.id)
        .limit(query.limit).offset(query.offset))).all()
    unusable = await _unusable_patients(uow, practice, {r.patient for r in rows})
    reach = await _distribution_counts(uow, [r.id for r in rows])
    gps = await general_practitioners(uow.session, practice, {r.patient for r in rows})
    directory = await practitioner_directory(uow.session, practice) if rows else {}
    items = []
    for r in rows:
        provider = resolve_provider(r.author, gps.get(r.patient, []), directory)
        item = _summary(r, today, rules, r.patient not in unusable, provider)
        recipients, acknowledged = reach.get((r.id, r.current_version), (0, 0))
        item["distribution"] = {"recipients": recipients, "acknowledged": acknowledged}
        items.append(item)
    following = query.offset + len(items)
    return {"items": items, "total": total, "limit": query.limit, "offset": query.offset,
            "next_offset": following if following < total else None, "as_of": today.isoformat()}


async def _distribution_counts(uow: UnitOfWork, ids: list[str]) -> dict[tuple, tuple[int, int]]:
    """(tracker, version) → (recipients, acknowledged), for a page of plans in one query."""
    if not ids:
        return {}
    rows = (await uow.session.execute(
        select(distributions.c.tracker_id, distributions.c.version_id, func.count(),
               func.count(distributions.c.acknowledged_at))
        .where(distributions.c.tracker_id.in_(ids))
        .group_by(distributions.c.tracker_id, distributions.c.version_id))).all()
    return {(t, v): (n, acked) for t, v, n, acked in rows}


async def counts(uow: UnitOfWork, practice: str, today: date, rules: ReviewRules) -> dict:
    """How many plans are in each state the coordinator acts on."""
    result = {}
    for name in ("due", "overdue", "escalated", "awaiting-signoff"):
        condition = _review_condition(practice, name, today, rules)
        result[name] = (await uow.session.execute(select(func.count()).select_from(trackers).where(
            trackers.c.practice == practice, condition))).scalar_one()
    return result


def _iso(value) -> str | None:  # noqa: ANN001
    return value.isoformat() if isinstance(value, date | datetime) else value


async def tracker_detail(
    uow: UnitOfWork, practice: str, tracker: str, today: date, rules: ReviewRules
) -> dict | None:
    row = (await uow.session.execute(select(trackers).where(
        trackers.c.practice == practice, trackers.c.id == tracker))).first()
    if row is None:
        return None
    unusable = await _unusable_patients(uow, practice, {row.patient})
    detail = _summary(row, today, rules, row.patient not in unusable,
                      await responsible_provider(uow.session, practice, dict(row._mapping)))
    detail |= {"intent": row.intent, "author": row.author, "care_team": list(row.care_team),
               "addresses": list(row.addresses)}
    # In ingest's order; a version ingest mapped again after a config change is listed after
    # it with its ``mapping_revision`` (null: as the version was first mapped).
    detail["versions"] = [
        {"version_id": v.version_id, "mapping_revision": v.mapping_revision or None,
         "event": v.event_type, "status": v.status,
         "last_updated": _iso(v.last_updated), "review_date": _iso(v.review_date),
         "applied": v.applied, "received_at": _iso(v.received_at)}
        for v in sorted((await uow.session.execute(select(versions).where(
            versions.c.tracker_id == tracker))).all(),
            key=lambda v: version_order(v.last_updated, v.version_id, v.mapping_revision))
    ]
    detail["reviews"] = [
        {"date": _iso(r.review_date), "reviewer": r.reviewer, "outcome": r.outcome,
         "notes": r.notes, "source": r.source, "version_id": r.version_id,
         "cycle_due": _iso(r.cycle_due), "days_overdue": r.days_overdue,
         "recorded_at": _iso(r.recorded_at)}
        for r in (await uow.session.execute(select(reviews).where(
            reviews.c.tracker_id == tracker).order_by(reviews.c.review_date,
                                                      reviews.c.recorded_at))).all()
    ]
    steps = (await uow.session.execute(select(review_steps).where(
        review_steps.c.tracker_id == tracker).order_by(review_steps.c.recorded_at,
                                                       review_steps.c.scheduled_on,
                                                       review_steps.c.kind))).all()
    stands_for = _stands_for(steps)
    detail["notifications"] = [
        {"kind": s.kind, "step": s.step, "cycle_due": _iso(s.cycle_due),
         "scheduled_on": _iso(s.scheduled_on), "sent": s.sent, "recorded_at": _iso(s.recorded_at),
         "idempotency_key": s.idempotency_key, "stands_for": stands_for[s.idempotency_key]}
        for s in steps
    ]
    detail["escalations"] = [n for n in detail["notifications"] if n["kind"] == "escalated"]
    dist = (await uow.session.execute(select(distributions).where(
        distributions.c.tracker_id == tracker).order_by(distributions.c.distributed_at,
                                                         distributions.c.recipient))).all()
    current = [d for d in dist if d.version_id == row.current_version]
    detail["distribution"] = {
        "version_id": row.current_version,
        "recipients": [{"recipient": d.recipient, "distributed_at": _iso(d.distributed_at),
                        "acknowledged_at": _iso(d.acknowledged_at)} for d in current],
        "acknowledged": sum(1 for d in current if d.acknowledged_at),
        "history": [{"version_id": d.version_id, "recipient": d.recipient,
                     "distributed_at": _iso(d.distributed_at),
                     "acknowledged_at": _iso(d.acknowledged_at)} for d in dist],
    }
    return detail


def _stands_for(steps) -> dict[str, int]:  # noqa: ANN001
    """How many steps each recorded one accounts for: 1, save a catch-up record (schedule.py
    ``CATCH_UP_DAYS``), which also stands for the reminders or escalations numbered between it
    and the one of its cycle recorded before it (every pass records the rest one by one)."""
    counts = {s.idempotency_key: 1 for s in steps}
    previous: dict[tuple, int] = {}
    for s in sorted((s for s in steps if s.kind in (REMINDER, ESCALATED)),
                    key=lambda s: (s.cycle_due, s.kind, s.step)):
        counts[s.idempotency_key] = s.step - previous.get((s.cycle_due, s.kind), 0)
        previous[(s.cycle_due, s.kind)] = s.step
    return counts


CSV_COLUMNS = ("tracker", "care_plan", "patient", "status", "next_review_due", "days_overdue",
               "last_review", "responsible_provider", "supervisor", "reminders_sent",
               "escalation_level", "signoff_status", "early_review_reason")


async def overdue_csv(uow: UnitOfWork, practice: str, today: date, rules: ReviewRules) -> str:
    """Every overdue plan, most overdue first, for compliance review."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    offset = 0
    while True:
        page = await list_trackers(uow, practice, ListQuery(review="overdue", limit=500,
                                                            offset=offset), today, rules)
        for item in page["items"]:
            writer.writerow([
                item["id"], item["care_plan"], item["patient"], item["status"],
                item["next_review_due"], item["days_overdue"], item["last_review"] or "",
                item["responsible_provider"] or "", item["supervisor"] or "",
                item["reminders_sent"], item["escalation_level"], item["signoff"]["status"],
                (item["early_review"] or {}).get("reason", ""),
            ])
        if page["next_offset"] is None:
            return out.getvalue()
        offset = page["next_offset"]
