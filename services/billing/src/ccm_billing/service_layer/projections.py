"""Projections of ingest's events: idempotent and order-independent.

Every row keeps the source version it was built from (``lastUpdated`` then ``versionId``); an
event only changes a row when it carries a newer version, so the same events delivered in any
order, any number of times, leave the same state. Performer roles are resolved when a month is
decided, not when time is logged, so a PractitionerRole arriving later re-classifies the time.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC
from types import SimpleNamespace

import structlog
from sqlalchemy import bindparam, or_, select, update

from ccm_billing.adapters import orm
from ccm_billing.compliance import evidence
from ccm_billing.domain.model import Month, add_months
from ccm_billing.domain.rules import ruleset_for
from ccm_billing.domain.rules.ccm import REVOKED
from ccm_billing.domain.rules.ruleset import available_years
from ccm_billing.service_layer import conditions, corrections, decision_cache
from ccm_billing.service_layer.common import (
    insert_for,
    local_day,
    parse_day,
    parse_instant,
    practice_zone,
    refuse_unheld,
    upsert_statement,
)
from ccm_billing.service_layer.decisions import NOT_ENROLLING
from ccm_shared.db import UnitOfWork
from ccm_shared.errors import NotFound
from ccm_shared.events import CloudEvent

log = structlog.get_logger(__name__)

TOPICS = (
    "ingest.time-entry.logged.v1",
    "ingest.time-entry.reversed.v1",
    "ingest.consent.granted.v1",
    "ingest.consent.revoked.v1",
    "ingest.consent.declined.v1",
    "ingest.consent.voided.v1",
    "ingest.care-plan.created.v1",
    "ingest.care-plan.revised.v1",
    "ingest.care-plan.closed.v1",
    "ingest.condition.upserted.v1",
    "ingest.patient.upserted.v1",
    "ingest.practitioner-role.upserted.v1",
    "ingest.visit.recorded.v1",
    "ingest.visit.reversed.v1",
    "careplan.review.completed.v1",  # review evidence for the compliance records
)


# Ingest reports time moved to another month, and a visit moved to another patient, as two
# events of one source version: the reversal (for the old month or patient) and the new state.
# They travel on different topics, so either can come first; at the same version the new state
# wins: these suffixes sort after the version (and "|1" after "|0"). ``version_key`` pads
# versionIds to one width (ingest assigns increasing integers), so they never reorder versions.
RECORDED, REVERSED = "|1", "|0"


def version_key(source: dict) -> str:
    """Sortable text of a source version: UTC lastUpdated, then the zero-padded versionId, then
    ingest's ``mappingRevision`` when the same version was mapped again after a configuration
    change (``|r`` and nine digits: after the version's key without one, and after the ``|0`` /
    ``|1`` a time entry's key ends with, so a re-mapping is newer than what it re-states)."""
    updated = parse_instant(source["lastUpdated"]).astimezone(UTC)
    vid = str(source["versionId"])
    key = f"{updated.strftime('%Y-%m-%dT%H:%M:%S.%f')}|{vid.zfill(20) if vid.isdigit() else vid}"
    if (revision := source.get("mappingRevision")) is not None:
        key += f"|r{int(revision):09d}"
    return key


def ref_id(reference: str | None) -> str | None:
    return reference.split("/", 1)[1] if reference else None


async def _upsert(uow: UnitOfWork, table, keys: dict, values: dict) -> bool:  # noqa: ANN001
    """Insert, or update when the incoming version is newer; True when the row changed."""
    refuse_unheld(table, values)  # the keys are references' ids: the contracts bound them
    stmt = upsert_statement(uow.session, table, keys, values, newer="version", returning="version")
    return (await uow.session.execute(stmt, {**keys, **values})).first() is not None


@functools.cache
def _patient_of_statement(table, keys: tuple[str, ...]):  # noqa: ANN001, ANN202 - built once
    return select(table.c.patient).where(
        *(table.c[k] == bindparam(k, type_=table.c[k].type) for k in keys))


_UNREAD = object()


async def _upsert_fact(uow: UnitOfWork, table, keys: dict,  # noqa: ANN001
                       values: dict, before: str | None | object = _UNREAD,
                       ) -> tuple[bool, str | None]:
    """``_upsert`` of a patient's fact: (whether the row changed, the patient it was of before;
    read here unless the caller read the row already). A fact that moves to another patient
    also changes the facts of the patient it leaves."""
    if before is _UNREAD:
        before = (await uow.session.execute(_patient_of_statement(table, tuple(keys)),
                                            keys)).scalar()
    await _moved(uow, keys["practice"], before, values["patient"])
    return await _upsert(uow, table, keys, values), before


def _distinct(*patients: str | None) -> list[str]:
    """The patients named, each once, in order, without the empty ones."""
    return [p for p in dict.fromkeys(patients) if p]


def _corrected(changed: bool, removed: bool, patient: str | None,
               before: str | None) -> list[str]:
    """The patients whose closed months a consent or care-plan version corrects: its patient
    when it was taken away (in error, revoked), and the patient it moved from (who lost it)."""
    if not changed:
        return []
    return _distinct(patient if removed else None, before if before != patient else None)


async def apply_event(event: CloudEvent, uow: UnitOfWork, *, now) -> None:  # noqa: ANN001
    """Apply one ingest event to the projections (and correct closed periods it changes)."""
    if event.type == evidence.REVIEW_COMPLETED:
        await evidence.record_review(event, uow)
        return
    await corrections.hold_practice(uow.session, event.tenant, exclusive=False)
    await evidence.record_source_version(event, uow, now)
    kind = event.type.removeprefix("ingest.").rsplit(".", 1)[0]
    handler = HANDLERS.get(kind)
    if handler is None:
        log.info("event type not projected", type=event.type)
        return
    await handler(event.tenant, event.data, uow, now)
    # Whatever the event changed, the patient's cached decisions are no longer current.
    await decision_cache.bump_generation(uow, event.tenant, ref_id(event.data.get("patient")))


def _shared(practice, patient_is, *columns: str):  # noqa: ANN001, ANN202
    """The ``columns`` of the practice's patients (``patient_is``: a condition on their id)
    whose MBI a patient of another practice has too (a possible duplicate biller)."""
    p1, p2 = orm.patients.alias("m1"), orm.patients.alias("m2")
    other = select(p2.c.patient_id).where(p2.c.mbi == p1.c.mbi, p2.c.practice != p1.c.practice)
    return select(*(p1.c[c] for c in columns)).where(
        p1.c.practice == practice, patient_is(p1.c.patient_id), p1.c.mbi.is_not(None),
        other.exists())


def _shared_mbi(practice, patient):  # noqa: ANN001, ANN202
    """The MBI of ``patient`` when a patient of another practice has it too, as a scalar
    subquery."""
    return _shared(practice, lambda c: c == patient, "mbi").scalar_subquery()


@functools.cache
def _entry_and_closed_statement():  # noqa: ANN202 - built once: it runs for every time event
    t, p = orm.time_entries, orm.billing_periods
    practice = bindparam("practice", type_=t.c.practice.type)
    entry = (t.c.practice == practice,
             t.c.entry_id == bindparam("entry_id", type_=t.c.entry_id.type))
    return select(
        select(t.c.entry_id).where(*entry).exists(),
        select(t.c.month).where(*entry).scalar_subquery(),
        select(t.c.patient).where(*entry).scalar_subquery(),
        select(p.c.month).where(p.c.practice == practice,
                                p.c.month == bindparam("month", type_=p.c.month.type)).exists(),
        _shared_mbi(practice, bindparam("patient", type_=orm.patients.c.patient_id.type)),
    )


async def _entry_and_closed(uow: UnitOfWork, practice: str, entry_id: str, month: str,  # noqa: ANN202
                            patient: str | None):
    """The entry as projected so far (month, patient; None if new), whether ``month`` is
    closed, and ``patient``'s MBI when another practice has a patient with it too, in one
    round trip."""
    found, entry_month, before, closed, mbi = (await uow.session.execute(
        _entry_and_closed_statement(),
        {"practice": practice, "entry_id": entry_id, "month": month, "patient": patient})).one()
    existing = SimpleNamespace(month=entry_month, patient=before) if found else None
    return existing, bool(closed), mbi


async def _shared_mbis(uow: UnitOfWork, practice: str, patients: list[str | None]) -> list[str]:
    """The MBIs of ``patients`` that a patient of another practice has too, in their order,
    read in one statement."""
    wanted = _distinct(*patients)
    if not wanted:
        return []
    mbi_of = dict((await uow.session.execute(_shared(
        practice, lambda c: c.in_(wanted), "patient_id", "mbi"))).all())
    return [mbi_of[p] for p in wanted if mbi_of.get(p)]


async def _time_logged(practice: str, d: dict, uow: UnitOfWork, now) -> None:  # noqa: ANN001
    start = parse_instant(d["start"])
    try:
        tz = await practice_zone(uow.session, practice)
        month = str(Month.of(start.astimezone(tz).date()))
    except NotFound:
        month = d["serviceMonth"]
    performer = d["performers"][0] if d["performers"] else {}
    entry_id = ref_id(d["entry"])
    t = orm.time_entries
    existing, closed, mbi = await _entry_and_closed(uow, practice, entry_id, month,
                                                    ref_id(d["patient"]))
    if existing is not None:
        await _moved(uow, practice, existing.patient, ref_id(d["patient"]))
    # Late unless the close of ``month`` locked it: the lock record is that month's filing,
    # whichever month the row says now (an entry moved out and back is the filed one, in any
    # delivery order of the moves).
    late = closed and not (
        existing is not None
        and await corrections.locked_at_close(uow.session, practice, existing.patient, month, entry_id)
    )
    version = version_key(d["source"]) + RECORDED
    details = {
        "patient": ref_id(d["patient"]),
        "data_version": version,
        "seconds": d["seconds"],
        "start": start,
        "month": month,
        "complex": d["complex"],
        "practitioner": performer.get("practitioner"),
        "practitioner_role": performer.get("practitionerRole"),
        "role_codes": json.dumps(performer.get("roleCodes") or []),
        "performer_class": performer.get("classification"),
        "warnings": json.dumps(d.get("warnings") or []),
    }
    changed = await _upsert(
        uow, t, {"practice": practice, "entry_id": entry_id},
        {"version": version, "status": "finished", "late": late, **details},
    )
    if not changed:
        # A reversal (a newer version) arrived first: keep its status, but describe the entry
        # with the newest logged version seen, so any delivery order explains the same way.
        await uow.session.execute(
            update(t)
            .where(t.c.practice == practice, t.c.entry_id == entry_id,
                   or_(t.c.data_version.is_(None), t.c.data_version < version))
            .values(**details)
        )
        return
    # The month it left, when another: held below, and corrected when closed (a month not
    # closed has no row to hold: the lock is the read of whether it is closed).
    left_month = (existing.month if existing is not None and existing.month not in (None, month)
                  else None)
    # Time in a month is what flags a patient of the same MBI elsewhere duplicate-biller: their
    # closed months follow (corrections.correct_duplicates).
    mbis = [mbi]
    if existing is not None and existing.patient not in (None, details["patient"]):
        mbis += await _shared_mbis(uow, practice, [existing.patient])
    plan = await corrections.duplicate_plan(
        uow, mbis, [month, existing.month if existing is not None else None])
    # Every month this event corrects, held together in order before any is read.
    held = await corrections.hold_months(uow.session, [
        *([(practice, month)] if closed else []),
        *([(practice, left_month)] if left_month else []), *plan])
    moved_out = left_month is not None and (practice, left_month) in held
    if closed and not late:
        # A new version of time already billed (e.g. seconds changed): the month is recomputed.
        await corrections.recompute(uow, practice, month, "time entry revised after close", now,
                                    patients=_whose(existing, details["patient"]))
    elif late:
        # Not billed into the closed month, and the month says so now (backdated-entry): for
        # its patient, and for the patient of the month it left (it no longer lists it).
        left = (existing.patient if existing is not None and existing.month == month else None)
        for patient in _distinct(details["patient"], left):
            await corrections.file_late_entries(uow, practice, month, patient,
                                                f"Encounter/{entry_id} logged after close", now)
    if moved_out:
        # Moved out of a closed month (its date corrected): that month no longer has it.
        await corrections.recompute(uow, practice, existing.month,
                                    f"Encounter/{entry_id} moved to {month}", now,
                                    patients=_whose(existing, details["patient"]))
    if plan:
        await corrections.correct_duplicates(uow, plan, corrections.DUPLICATE_TIME, now)


def _whose(existing, patient: str | None) -> list[str]:  # noqa: ANN001
    """The patients a time entry's change concerns: its patient, and the one it left."""
    return _distinct(patient, getattr(existing, "patient", None))


async def _moved(uow: UnitOfWork, practice: str, before: str | None, patient: str | None) -> None:
    """A resource that moved to another patient changes the facts of the one it left too."""
    if before and before != patient:
        await decision_cache.bump_generation(uow, practice, before)


async def _time_reversed(practice: str, d: dict, uow: UnitOfWork, now) -> None:  # noqa: ANN001
    t = orm.time_entries
    entry_id = ref_id(d["entry"])
    existing = (
        await uow.session.execute(
            select(t.c.month, t.c.patient).where(t.c.practice == practice, t.c.entry_id == entry_id)
        )
    ).first()
    if existing is not None:
        await _moved(uow, practice, existing.patient, ref_id(d["patient"]))
    month = existing.month if existing is not None else d.get("serviceMonth")
    row = dict(practice=practice, entry_id=entry_id, patient=ref_id(d["patient"]),
               version=version_key(d["source"]) + REVERSED, status=d["reason"], seconds=0,
               month=month, complex=False, role_codes="[]", warnings="[]", late=False)
    refuse_unheld(t, row)
    ins = insert_for(uow.session)(t).values(**row)
    stmt = ins.on_conflict_do_update(
        index_elements=["practice", "entry_id"],
        set_={"status": ins.excluded.status, "version": ins.excluded.version},
        where=t.c.version < ins.excluded.version,
    ).returning(t.c.version)
    changed = (await uow.session.execute(stmt)).first() is not None
    if not changed or not month:
        return
    # Time taken away may lift a duplicate-biller flag elsewhere (corrections.correct_duplicates).
    plan = await corrections.duplicate_plan(
        uow, await _shared_mbis(uow, practice, _whose(existing, ref_id(d["patient"]))), [month])
    # The month is held when closed (one with no row holds nothing): whether it is closed is
    # read by the lock.
    held = await corrections.hold_months(uow.session, [(practice, month), *plan])
    closed = (practice, month) in held
    if closed:
        await corrections.recompute(uow, practice, month, f"Encounter/{entry_id} {d['reason']}",
                                    now, patients=_whose(existing, ref_id(d["patient"])))
    if plan:
        await corrections.correct_duplicates(uow, plan, corrections.DUPLICATE_TIME, now)


async def _consent(practice: str, d: dict, uow: UnitOfWork, now) -> None:  # noqa: ANN001
    patient = ref_id(d["patient"])
    tz = await _zone(uow, practice)
    period = d.get("period") or {}
    changed, before = await _upsert_fact(
        uow, orm.consents, {"practice": practice, "consent_id": ref_id(d["consent"])},
        {
            "patient": patient,
            "version": version_key(d["source"]),
            "status": d["status"],
            "obtained_at": parse_instant(d.get("obtainedAt")),
            "provision": d["provision"],
            "effective_until": parse_day(d.get("effectiveUntil")),
            "practitioner": d["practitioners"][0] if d["practitioners"] else None,
            "valid_from": local_day(period.get("start"), tz),
            "valid_until": local_day(period.get("end"), tz, end=True),
        },
    )
    if d["status"] == "active" or d.get("effectiveUntil") or d["status"] == "inactive":
        # A version that granted it (or revoked it, so granted before): when the consent was
        # first documented here is the earliest such receipt, in any delivery order.
        c, received = orm.consents, parse_instant(d["source"]["receivedAt"])
        await uow.session.execute(update(c).where(
            c.c.practice == practice, c.c.consent_id == ref_id(d["consent"]),
            or_(c.c.received_at.is_(None), c.c.received_at > received)).values(
                received_at=received))
    if who := _corrected(changed, d["status"] in ("entered-in-error", *REVOKED), patient, before):
        await corrections.recompute_patient_months(
            uow, practice, who, f"Consent/{ref_id(d['consent'])} {d['status']}", now)


async def _zone(uow: UnitOfWork, practice: str):  # noqa: ANN202
    """The practice's time zone; None for a practice not registered here (dates as written)."""
    try:
        return await practice_zone(uow.session, practice)
    except NotFound:
        return None


async def _care_plan(practice: str, d: dict, uow: UnitOfWork, now) -> None:  # noqa: ANN001
    patient = ref_id(d["patient"])
    keys = {"practice": practice, "care_plan_id": ref_id(d["carePlan"])}
    t = orm.care_plans
    key = (t.c.practice == practice, t.c.care_plan_id == keys["care_plan_id"])
    version = version_key(d["source"])
    stored = (await uow.session.execute(select(
        t.c.patient, t.c.last_review, t.c.review_version, t.c.version).where(*key))).first()
    # The last review is that of the newest version with review evidence, in any delivery
    # order: a revision without evidence (a goal edited) keeps it, a newer review replaces it
    # (a corrected date too).
    incoming = parse_day((d.get("review") or {}).get("date"))
    review, review_version = (None, None)
    if stored is not None and stored.last_review is not None:
        # A review stored before review_version existed: of the version stored with it.
        review, review_version = stored.last_review, stored.review_version or stored.version
    if incoming is not None and (review_version is None or version > review_version):
        review, review_version = incoming, version
    tz = await _zone(uow, practice)
    completed_on = None
    if d["status"] == "completed":
        # The day it ended, as ingest keeps it: the version that completed it, whatever later
        # edits of the completed plan came (the same in any delivery order). From an ingest
        # before completedOn: the day of this version.
        completed_on = (parse_day(d.get("completedOn"))
                        or local_day(d["source"]["lastUpdated"], tz))
    changed, before = await _upsert_fact(
        uow, orm.care_plans, keys,
        {
            "patient": patient,
            "version": version,
            "status": d["status"],
            "intent": d["intent"],
            # The practice's day: created 2026-04-01T02:00Z is a March plan in New York.
            "created": local_day(d.get("created"), tz)
            or local_day((d.get("period") or {}).get("start"), tz),
            "last_review": review,
            "review_version": review_version,
            "completed_on": completed_on,
        },
        before=stored.patient if stored is not None else None,  # the row is read above
    )
    if not changed and review_version == version:
        # An older version arriving late whose review is newer than any stored: it counts.
        await uow.session.execute(update(t).where(*key).values(
            last_review=review, review_version=review_version))
    if who := _corrected(changed, d["status"] in ("entered-in-error", "revoked", "completed"),
                         patient, before):
        await corrections.recompute_patient_months(
            uow, practice, who, f"CarePlan/{ref_id(d['carePlan'])} {d['status']}", now)


async def _condition(practice: str, d: dict, uow: UnitOfWork, now) -> None:  # noqa: ANN001
    """The condition's newest version, with what the months it counts for need from the
    versions before it (service_layer/conditions.py: when it began, when its resolution was
    received, whether it was chronic before it resolved)."""
    t = orm.conditions
    keys = {"practice": practice, "condition_id": ref_id(d["condition"])}
    where = (t.c.practice == practice, t.c.condition_id == keys["condition_id"])
    # Locked: what is folded into (and rewritten by a late version) is the row as it is, not
    # as it was before a concurrent version of the condition committed (found by review).
    stored = (await uow.session.execute(select(t).where(*where).with_for_update())).first()
    before = conditions.ConditionState.of_row(stored) if stored is not None else None
    received = parse_instant(d["source"]["receivedAt"])
    changed, _ = await _upsert_fact(
        uow, t, keys,
        {"patient": ref_id(d["patient"]), "version": version_key(d["source"]),
         **conditions.fold(before, d, received).columns()},
        before=stored.patient if stored is not None else None,
    )
    if not changed and before is not None:
        late = conditions.fold_late(before, d, received)
        if late != before:
            await uow.session.execute(update(t).where(*where).values(**late.columns()))


async def _visit(practice: str, d: dict, uow: UnitOfWork, now) -> None:  # noqa: ANN001
    """A qualifying visit, or its reversal (which carries no codes nor performers: a reversed
    visit initiates nothing). Either way every column comes from the newest version.

    An Encounter moved to another patient comes as the reversal for the patient it left and the
    visit for the one it joined, of one source version, in either order: the visit wins
    (``RECORDED`` over ``REVERSED``)."""
    patient, visit, reason = ref_id(d["patient"]), ref_id(d["visit"]), d.get("reason")
    v = orm.visits
    before = (await uow.session.execute(
        select(v.c.patient, v.c.status, v.c.day, v.c.performers)
        .where(v.c.practice == practice, v.c.visit_id == visit))).first()
    now_is = (patient, reason or "finished", parse_day(d["date"]),
              json.dumps(d.get("performers") or []))
    await _moved(uow, practice, before.patient if before is not None else None, patient)
    changed = await _upsert(
        uow, orm.visits, {"practice": practice, "visit_id": visit},
        {
            "patient": patient,
            "version": version_key(d["source"]) + (REVERSED if reason else RECORDED),
            "status": now_is[1],
            "day": now_is[2],
            "codes": json.dumps(d.get("codes") or []),
            "performers": now_is[3],
        },
    )
    if not changed or (before is not None and tuple(before) == now_is):
        return  # nothing a decision reads changed (e.g. another element of the Encounter)
    # It may have initiated (or now initiate) CCM in a closed month — G0506, the missing-visit
    # warning or blocker — of the patient it is for and of the one it left: those months are
    # recomputed, and cancelled and reissued where their lines change.
    # Each (patient, day) it was or is: a day moved out of the lookback matters as much as one
    # moved into it. All affected patients are corrected together, month by month (one by one,
    # the first replacement would bill a moved visit's G0506 to both).
    days: dict[str, list] = {patient: [now_is[2]]}
    if before is not None:
        days[patient].append(before.day)
        days.setdefault(before.patient, []).append(before.day)
    affected = [who for who, dates in days.items()
                if who and await _may_initiate(uow, practice, who, dates)]
    if affected:
        await corrections.recompute_patient_months(
            uow, practice, affected, f"Encounter/{visit} {reason or 'recorded'}", now,
            decided=True, since=str(Month.of(min(min(dates) for dates in days.values()))))


async def _may_initiate(uow: UnitOfWork, practice: str, patient: str, days) -> bool:  # noqa: ANN001
    """Whether a visit of one of ``days`` can be the initiating visit of one of the patient's
    consents: on or before a dated consent and within the lookback before it, or any visit when
    a consent is undated. Routine visits after every consent (or long before it) never are, so
    they recompute no closed month."""
    c = orm.consents
    consented = (await uow.session.execute(select(c.c.obtained_at).where(
        c.c.practice == practice, c.c.patient == patient, c.c.provision == "permit",
        c.c.status.not_in(NOT_ENROLLING)))).scalars().all()
    try:
        tz = await practice_zone(uow.session, practice)
    except NotFound:
        return True
    lookback = _widest_lookback()
    for at in consented:
        if at is None:
            return True
        start = at.astimezone(tz).date()
        if any(add_months(start, -lookback) <= day <= start for day in days):
            return True
    return False


@functools.cache
def _widest_lookback() -> int:
    """The longest initiating-visit lookback of any year's rules (a wider window only
    recomputes more, never less)."""
    return max(ruleset_for(Month(year, 1)).setting("CCM", "initiating_visit_lookback_months")
               for year in available_years())


async def _patient(practice: str, d: dict, uow: UnitOfWork, now) -> None:  # noqa: ANN001
    pt = orm.patients
    keys = {"practice": practice, "patient_id": ref_id(d["patient"])}
    before = (await uow.session.execute(select(pt.c.mbi).where(
        pt.c.practice == practice, pt.c.patient_id == keys["patient_id"]))).scalar()
    changed = await _upsert(
        uow, pt, keys,
        {
            "version": version_key(d["source"]),
            "mbi": d.get("mbi"),
            "active": d["active"] and not d["deleted"],
        },
    )
    if changed and before != d.get("mbi"):
        # An MBI known or corrected can make, or unmake, a duplicate biller in any month: the
        # closed months of every patient with either MBI follow (this patient's too).
        plan = await corrections.duplicate_plan(uow, [before, d.get("mbi")])
        if plan:
            await corrections.correct_duplicates(uow, plan, corrections.DUPLICATE_MBI, now)


async def _role(practice: str, d: dict, uow: UnitOfWork, now) -> None:  # noqa: ANN001
    await _upsert(
        uow, orm.practitioner_roles, {"practice": practice, "role_id": ref_id(d["practitionerRole"])},
        {
            "version": version_key(d["source"]),
            "practitioner": d.get("practitioner"),
            "classification": d["classification"],
            "active": d["active"] and not d["deleted"],
        },
    )


HANDLERS = {
    "time-entry.logged": _time_logged,
    "time-entry.reversed": _time_reversed,
    "consent.granted": _consent,
    "consent.revoked": _consent,
    "consent.declined": _consent,
    "consent.voided": _consent,
    "care-plan.created": _care_plan,
    "care-plan.revised": _care_plan,
    "care-plan.closed": _care_plan,
    "condition.upserted": _condition,
    "patient.upserted": _patient,
    "practitioner-role.upserted": _role,
    "visit.recorded": _visit,
    "visit.reversed": _visit,
}
