"""Loading a practice-month's facts from the projections and deciding every patient in it."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Collection, Iterable

from sqlalchemy import and_, bindparam, or_, select, union
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_billing.adapters import orm
from ccm_billing.domain.model import (
    CarePlan,
    Condition,
    Consent,
    Decision,
    Month,
    PatientMonth,
    PracticeOptions,
    TimeEntry,
    Visit,
)
from ccm_billing.domain.roles import CLASSIFICATION_TO_ROLE, classify_codes
from ccm_billing.domain.rules import PROGRAMS, ruleset_for
from ccm_billing.service_layer.common import PracticeInfo, consent_renewal_months
from ccm_billing.service_layer.conditions import ConditionState, condition_fact

NOT_ENROLLING = ("entered-in-error", "rejected")  # consents that do not enrol a patient
CLASSIFICATION_PRIORITY = ("billing-practitioner", "clinical-staff", "non-clinical", "unknown")


async def _roles(session: AsyncSession, practice: str) -> tuple[dict, dict, dict]:
    """(classification by PractitionerRole, classifications by Practitioner, the Practitioner
    of each PractitionerRole)."""
    r = orm.practitioner_roles
    rows = (await session.execute(select(r).where(r.c.practice == practice))).all()
    by_role = {f"PractitionerRole/{x.role_id}": x.classification for x in rows if x.active}
    by_practitioner: dict[str, set[str]] = defaultdict(set)
    for x in rows:
        if x.active and x.practitioner:
            by_practitioner[x.practitioner].add(x.classification)
    practitioner_of = {f"PractitionerRole/{x.role_id}": x.practitioner for x in rows
                       if x.practitioner}
    return by_role, by_practitioner, practitioner_of


def aliases(named: Iterable[str | None], practitioner_of: dict, roles_of: dict) -> frozenset[str]:
    """Every reference that names the performers ``named`` (by Practitioner or by
    PractitionerRole: either can name the billing practitioner on a Consent): each counts as
    the other too (``practitioner_of`` a role, ``roles_of`` a practitioner)."""
    who = {x for x in named if x}
    who.update(practitioner_of[x] for x in list(who) if x in practitioner_of)
    who.update(role for x in list(who) for role in roles_of.get(x, ()))
    return frozenset(who)


def visit_of(row, practitioner_of: dict, roles_of: dict) -> Visit:  # noqa: ANN001
    """A projected visit, its performers named every way (``aliases``)."""
    named = [x for p in json.loads(row.performers)
             for x in (p.get("practitioner"), p.get("practitionerRole"))]
    return Visit(row.visit_id, row.day, aliases(named, practitioner_of, roles_of), row.status)


def resolve_role(practitioner_role: str | None, practitioner: str | None, role_codes: str | None,
                 by_role: dict, by_practitioner: dict, code_sets: dict,
                 performer_class: str | None = None) -> str:
    """The performer's role: its PractitionerRole's classification, else the practitioner's
    roles (the most senior), else the kind ingest gave the performer by the practice's config
    (a Practitioner's qualifications), else (entries logged before ingest sent it) the role
    codes carried on the entry, by the default code sets."""
    if practitioner_role and practitioner_role in by_role:
        return CLASSIFICATION_TO_ROLE[by_role[practitioner_role]]
    found = by_practitioner.get(practitioner or "")
    if found:
        best = next(c for c in CLASSIFICATION_PRIORITY if c in found)
        return CLASSIFICATION_TO_ROLE[best]
    if performer_class in CLASSIFICATION_TO_ROLE:  # the practice's verdict, "unknown" too
        return CLASSIFICATION_TO_ROLE[performer_class]
    return classify_codes(json.loads(role_codes or "[]"), code_sets)


@functools.cache
def duplicates_statement(one_patient: bool = False):  # noqa: ANN202 - built once per kind
    """The practice-month's patients flagged duplicate-biller (``practice``, ``month``); with
    ``one_patient``, whether ``patient`` is (its id, or nothing), looked up by its key."""
    p1, p2, t = orm.patients.alias("p1"), orm.patients.alias("p2"), orm.time_entries
    rel = orm.duplicate_releases
    practice = bindparam("practice", type_=p1.c.practice.type)
    month = bindparam("month", type_=t.c.month.type)
    other_time = (
        select(t.c.entry_id)
        .where(t.c.practice == p2.c.practice, t.c.patient == p2.c.patient_id,
               t.c.month == month, t.c.status == "finished")
        .exists()
    )
    other_released = (
        select(rel.c.patient)
        .where(rel.c.practice == p2.c.practice, rel.c.patient == p2.c.patient_id,
               rel.c.month == month)
        .exists()
    )
    found = (
        select(p1.c.patient_id)
        .join(p2, and_(p2.c.mbi == p1.c.mbi, p2.c.practice != p1.c.practice))
        .where(p1.c.practice == practice, p1.c.mbi.is_not(None), other_time, ~other_released)
        .distinct()
    )
    # A patient this practice released stays blocked here (someone else bills it).
    released = select(rel.c.patient).where(rel.c.practice == practice, rel.c.month == month)
    if one_patient:
        patient = bindparam("patient", type_=p1.c.patient_id.type)
        found = found.where(p1.c.patient_id == patient)
        released = released.where(rel.c.patient == patient)
    return union(found, released)


async def duplicate_patients(session: AsyncSession, practice: str, month: str, *,
                             patient: str | None = None) -> set[str]:
    """Patients whose MBI has finished time in another practice this month, unless released;
    with ``patient``, asked of that patient only ({patient} or nothing), not of the month."""
    params = {"practice": practice, "month": month}
    if patient is not None:
        params["patient"] = patient
    return set((await session.execute(
        duplicates_statement(patient is not None), params)).scalars())


async def load_facts(
    session: AsyncSession, info: PracticeInfo, month: Month, *, patient: str | None = None,
    patients: Collection[str] | None = None,
) -> list[PatientMonth]:
    """Facts of every enrolled patient (a consent on file, or time in the month); only of
    ``patient`` or of ``patients`` when given."""
    m = str(month)
    ruleset = ruleset_for(month)
    code_sets = ruleset.code_sets
    by_role, by_practitioner, role_practitioner = await _roles(session, info.id)
    t, c, cp, cond, v = (orm.time_entries, orm.consents, orm.care_plans, orm.conditions,
                         orm.visits)
    if patient is not None:
        patients = (patient,)

    def scoped(table, column="patient"):  # noqa: ANN001, ANN202
        cond_ = [table.c.practice == info.id]
        if patients is not None:
            cond_.append(table.c[column].in_(list(patients)))
        return cond_

    roles_of: dict[str, set[str]] = defaultdict(set)
    for role, practitioner in role_practitioner.items():
        roles_of[practitioner].add(role)
    entries: dict[str, list[TimeEntry]] = defaultdict(list)
    roles: dict[tuple, str] = {}
    performers: dict[tuple, frozenset[str]] = {}
    columns = (t.c.patient, t.c.entry_id, t.c.seconds, t.c.start, t.c.status, t.c.complex,
               t.c.practitioner, t.c.late, t.c.warnings, t.c.practitioner_role, t.c.role_codes,
               t.c.performer_class)
    result = await session.execute(select(*columns).where(*scoped(t), t.c.month == m))
    # Plain tuples: this loop runs once per time entry of the month (600k at a large close).
    for (pat, entry_id, seconds, start, status, complex_, practitioner, late, warnings,
         practitioner_role, role_codes, performer_class) in result:
        if pat is None or start is None:
            continue
        key = (practitioner_role, practitioner, role_codes, performer_class)
        role = roles.get(key)
        if role is None:
            role = roles[key] = resolve_role(practitioner_role, practitioner, role_codes,
                                             by_role, by_practitioner, code_sets, performer_class)
        who = performers.get(key[:2])
        if who is None:  # whose time it is: the billing practitioner's or another's
            who = performers[key[:2]] = aliases(key[:2], role_practitioner, roles_of)
        entries[pat].append(
            TimeEntry(entry_id, seconds, start, role, status, complex_, practitioner, late,
                      tuple(json.loads(warnings)) if warnings not in (None, "[]") else (),
                      who)
        )
    consents: dict[str, list[Consent]] = defaultdict(list)
    practitioner_of: dict[str, str] = {}
    # In consent order, so the same rows always give the same facts (the earliest active
    # consent's practitioner is the patient's billing practitioner when no consent bills).
    ordered = select(c).where(*scoped(c)).order_by(
        c.c.patient, c.c.obtained_at.asc().nulls_last(), c.c.consent_id)  # same on both engines
    for row in (await session.execute(ordered)).all():
        consents[row.patient].append(
            Consent(row.consent_id, row.status, row.obtained_at, row.provision, row.effective_until,
                    row.practitioner, row.valid_from, row.valid_until, row.received_at)
        )
        if row.status == "active" and row.practitioner:
            practitioner_of.setdefault(row.patient, row.practitioner)
    plans: dict[str, list[CarePlan]] = defaultdict(list)
    for row in (await session.execute(select(cp).where(*scoped(cp)))).all():
        plans[row.patient].append(
            CarePlan(row.care_plan_id, row.status, row.intent, row.created, row.last_review,
                     row.completed_on)
        )
    visits: dict[str, list[Visit]] = defaultdict(list)
    for row in (await session.execute(select(v).where(*scoped(v)))).all():
        visits[row.patient].append(visit_of(row, role_practitioner, roles_of))
    # Every chronic condition with its dates: each month counts those the patient had in it.
    chronic: dict[str, list[Condition]] = defaultdict(list)
    for row in (await session.execute(
            # (chronic unknown but counting: a row the previous release wrote, undated)
            select(cond).where(*scoped(cond), or_(cond.c.chronic.is_(True), and_(
                cond.c.chronic.is_(None), cond.c.counts.is_(True))))
            .order_by(cond.c.patient, cond.c.condition_id))).all():
        fact = condition_fact(row.condition_id, ConditionState.of_row(row), info.tz)
        if fact is not None and row.patient is not None:
            chronic[row.patient].append(fact)
    duplicates = await duplicate_patients(session, info.id, m)
    enrolled = set(entries) | {p for p, cs in consents.items()
                               if any(x.status not in NOT_ENROLLING for x in cs)}
    return [
        PatientMonth(
            patient=p, month=month, timezone=info.timezone, entries=tuple(entries.get(p, ())),
            consents=tuple(consents.get(p, ())), care_plans=tuple(plans.get(p, ())),
            conditions=tuple(chronic.get(p, ())), duplicate_biller=p in duplicates,
            billing_practitioner=practitioner_of.get(p),
            visits=tuple(sorted(visits.get(p, ()), key=lambda x: x.visit_id)),
            initiating_visit_tracked=True,
        )
        for p in sorted(enrolled)
    ]


def practice_options(info: PracticeInfo) -> PracticeOptions:
    """Per-practice rule options from the practice's pricing document (``rules`` key), if any."""
    rules = info.pricing.get("rules") or {}
    return PracticeOptions(
        initiating_visit_missing=rules.get("initiating_visit_missing", "warning"),
        date_of_service=rules.get("date_of_service", "month-end"),
        consent_renewal_months=consent_renewal_months(info),
    )


async def decide_month(
    session: AsyncSession, info: PracticeInfo, month: Month, *, patient: str | None = None
) -> list[Decision]:
    return (await decide_month_with_facts(session, info, month, patient=patient))[1]


async def decide_month_with_facts(
    session: AsyncSession, info: PracticeInfo, month: Month, *, patient: str | None = None,
    patients: Collection[str] | None = None,
) -> tuple[list[PatientMonth], list[Decision]]:
    """The facts loaded and the decision on each (the facts are filed with the decisions)."""
    facts = await load_facts(session, info, month, patient=patient, patients=patients)
    ruleset = ruleset_for(month)
    options = practice_options(info)
    decide = PROGRAMS["CCM"]
    return facts, [decide(f, ruleset, options) for f in facts]
