"""What billing knew of a patient's care plans and chronic conditions at an instant (a month's
close, or now), and how the month's decision judged them.

The projections keep only the newest state; the source versions billing consumed
(``source_versions``) say what it had applied by any instant (``recorded_at``). A fact whose every
version was applied by then is the projection's row itself, as the decision read it; otherwise
it is rebuilt from the versions applied by then, the way the projections build it. Either way
the verdict is the decision's own rule (``rules.ccm.care_plan_check``, the chronic-condition
count), never a second reading of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from ccm_billing.domain.model import CarePlan, Month, PatientMonth
from ccm_billing.domain.rules import ccm, ruleset_for
from ccm_billing.service_layer import conditions
from ccm_billing.service_layer.common import local_day, parse_day


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Known:
    """One resource as billing knew it at an instant: the versions applied by then (oldest
    first), the versions applied after it, the projection's row when that row is the state at
    the instant, and whether the resource was this patient's then."""

    resource_id: str
    applied: tuple
    later: tuple
    row: object | None
    ours: bool

    @property
    def used(self):  # noqa: ANN201 - a source_versions row, or None
        """The version the decision read: the newest applied by the instant (None when only the
        projection holds the fact, from before billing kept versions)."""
        return self.applied[-1] if self.applied else None


def known_at(resource_id: str, versions: list, row, patient: str,  # noqa: ANN001
             at: datetime | None) -> Known | None:
    """``versions`` of one resource (oldest first, by lastUpdated then versionId, whichever
    patient each names) split at ``at`` (None: now); ``row`` its projection row, if any. None
    when billing knew nothing of it, then or since."""
    applied = tuple(v for v in versions if at is None or _utc(v.recorded_at) <= at)
    later = tuple(v for v in versions if at is not None and _utc(v.recorded_at) > at)
    if row is not None and not later:
        # Every version was applied by then: the projection's row is the state at the instant,
        # exactly as the decision read it.
        return Known(resource_id, applied, later, row, row.patient == patient)
    if not applied:
        return Known(resource_id, (), later, None, False) if later else None
    return Known(resource_id, applied, later, None, applied[-1].patient == patient)


def care_plan_fact(known: Known, tz: ZoneInfo) -> CarePlan | None:
    """The CarePlan fact the decision judged: the projection's row, or the versions applied by
    the instant folded as ``projections._care_plan`` folds them."""
    if known.row is not None:
        r = known.row
        return CarePlan(r.care_plan_id, r.status, r.intent, r.created, r.last_review,
                        r.completed_on)
    return plan_from_versions(list(known.applied), tz) if known.applied else None


def plan_from_versions(versions: list, tz: ZoneInfo) -> CarePlan:
    """A care plan's projected state after ``versions`` (oldest first): the newest version's
    status, intent, created (``created``, else ``period.start``, as the practice's day) and
    completion; the review of the newest version that carries review evidence."""
    newest = versions[-1]
    d = json.loads(newest.data)
    review = None
    for v in versions:  # oldest first: the newest with evidence wins
        date_text = (json.loads(v.data).get("review") or {}).get("date")
        if date_text:
            review = parse_day(date_text)
    completed_on = None
    if d["status"] == "completed":
        completed_on = (parse_day(d.get("completedOn"))
                        or local_day(_utc(newest.last_updated).isoformat(), tz))
    created = (local_day(d.get("created"), tz)
               or local_day((d.get("period") or {}).get("start"), tz))
    return CarePlan(newest.resource_id, d["status"], d["intent"], created, review, completed_on)


def plan_verdict(plan: CarePlan, patient: str, month: Month, timezone: str
                 ) -> tuple[bool, str | None]:
    """(in force for the month, its warning) by the decision's rule, for this plan alone."""
    facts = PatientMonth(patient=patient, month=month, timezone=timezone, care_plans=(plan,))
    blocker, warning = ccm.care_plan_check(facts, ruleset_for(month))
    return blocker is None, warning


def plan_note(plan: CarePlan, in_force: bool, month: Month) -> str:
    """Why, in the words an auditor reads (the verdict itself is ``plan_verdict``'s)."""
    created = f"created {plan.created}" if plan.created else "no creation date"
    if in_force:
        note = f"in force: {plan.status}, intent {plan.intent}, {created}"
        if plan.last_review:
            note += f", last reviewed {plan.last_review}"
        return note
    if plan.status in ccm.CARE_PLAN_CLOSED:
        return f"not in force: {plan.status}"
    if plan.intent not in ("plan", "order"):
        return f"not in force: intent {plan.intent}"
    if plan.created is not None and plan.created > month.last_day:
        return f"not in force: {created}, after the month"
    if plan.completed_on is not None:
        return f"not in force: completed on {plan.completed_on}"
    return "not in force"


def condition_state(known: Known) -> conditions.ConditionState | None:
    """The condition as the projection held it at the instant: its row when that row is the
    state then, else the versions applied by then folded as ``projections._condition`` folds
    them (``service_layer/conditions.py``)."""
    if known.row is not None:
        return conditions.ConditionState.of_row(known.row)
    state = None
    for v in known.applied:  # oldest first
        state = conditions.fold(state, json.loads(v.data), _utc(v.received_at))
    return state


def condition_counts(known: Known, month: Month, tz: ZoneInfo) -> bool:
    """Whether the condition counted toward ``month``'s eligibility by the decision's own rule
    (``conditions.condition_fact(…).counts_in(month)``: a chronic condition the patient had in
    the month, by its onset and its end), over the state at the instant."""
    state = condition_state(known)
    if state is None:
        return False
    fact = conditions.condition_fact(known.resource_id, state, tz)
    return fact is not None and fact.counts_in(month)


def minimum_chronic_conditions(month: Month) -> int:
    return ruleset_for(month).setting(ccm.PROGRAM, "minimum_chronic_conditions")
