"""A condition across its versions, as the projection keeps it, and the days it counts for.

Eligibility (rules §3.2) is judged for the service month: a chronic condition counts for a month
when it began on or before the month's end — its onset, else its recordedDate, else when billing
first received it — and had not ended before the month began: its abatement when given, else
the day its resolution was received (a resolution without an abatement date is not taken back
to months before it was known). A condition entered in error, refuted or deleted never counted.
A recompute of a closed month thus counts what the patient had in that month, not what was
diagnosed or resolved later.

Ingest marks a condition ``chronic`` only while it is active (its code and category checked
under the practice's config), so a resolution keeps the verdict of the version before it; a
condition billing first hears of as already resolved has none, and counts for no month.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from zoneinfo import ZoneInfo

from ccm_billing.adapters.orm import CONDITION_DATE
from ccm_billing.domain.model import Condition
from ccm_billing.service_layer.common import local_day

ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})
RESOLVED_CLINICAL = frozenset({"inactive", "remission", "resolved"})
VOID_VERIFICATION = frozenset({"entered-in-error", "refuted"})
# Optional fields of ``ingest.condition.upserted.v1`` (ingest sends both since they were added):
# Condition.recordedDate, and whether the practice's chronic code list (ingest's
# ``chronic_codes``) judged the condition. Absent (an event from before): not known, taken as
# judged; false: the month says ``chronic-conditions-unverified``.
RECORDED = "recorded"
CODES_CONFIGURED = "chronicCodesConfigured"

_FHIR_DATE = re.compile(
    r"\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?)?)?)?")


def fhir_date(value: object) -> str | None:
    """``value`` when it is a FHIR date or dateTime (an onsetString or onsetAge is no day)."""
    if isinstance(value, str) and len(value) <= CONDITION_DATE and _FHIR_DATE.fullmatch(value):
        return value
    return None


@dataclass(frozen=True)
class ConditionState:
    """The projection's columns of a condition (orm.conditions, beside its key and version)."""

    counts: bool  # counts now: active, chronic, not in error, not deleted
    chronic: bool | None  # a chronic condition (None: first known resolved, not known)
    onset: str | None
    abatement: str | None
    first_received_at: datetime | None
    resolved_at: datetime | None
    code_checked: bool | None

    def columns(self) -> dict:
        return asdict(self)

    @classmethod
    def of_row(cls, row) -> ConditionState:  # noqa: ANN001 - an orm.conditions row
        return cls(bool(row.counts), row.chronic, row.onset, row.abatement,
                   row.first_received_at, row.resolved_at, row.code_checked)


def _earliest(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b < a else a


def fold(before: ConditionState | None, d: dict, received_at: datetime) -> ConditionState:
    """The condition after the version ``d`` (an event's data, newer than ``before``'s),
    received at ``received_at``."""
    clinical = d.get("clinicalStatus") or ""
    void = bool(d["deleted"]) or d.get("verificationStatus") in VOID_VERIFICATION
    counts = bool(d["chronic"] and not d["deleted"] and clinical in ACTIVE_CLINICAL
                  and d.get("verificationStatus") != "entered-in-error")
    chronic: bool | None
    resolved_at = None
    checked = d.get(CODES_CONFIGURED)
    if void:
        chronic = False  # never was one: not counted for any month
    elif clinical in ACTIVE_CLINICAL:
        chronic = bool(d["chronic"])
    elif clinical in RESOLVED_CLINICAL:
        # Resolved: ingest no longer says whether it is chronic; it was what it was until now.
        chronic = before.chronic if before is not None else None
        checked = before.code_checked if before is not None else None
        # The resolution takes effect when it was first received, not when edited since.
        resolved_at = (before.resolved_at if before is not None and before.resolved_at
                       else received_at)
    else:
        chronic = False  # no clinical status: no condition to count, as ingest judges it
    return ConditionState(
        counts=counts, chronic=chronic,
        onset=fhir_date(d.get("onset")) or fhir_date(d.get(RECORDED)),
        abatement=fhir_date(d.get("abatement")),
        first_received_at=_earliest(before.first_received_at if before else None, received_at),
        resolved_at=resolved_at,
        code_checked=None if checked is None else bool(checked),
    )


def fold_late(stored: ConditionState, d: dict, received_at: datetime) -> ConditionState:
    """An older version arriving after a newer one changes only what it alone can say: an
    earlier receipt, and whether a condition first known resolved was chronic while active."""
    late = replace(stored, first_received_at=_earliest(stored.first_received_at, received_at))
    void = bool(d["deleted"]) or d.get("verificationStatus") in VOID_VERIFICATION
    if (stored.chronic is None and not void
            and (d.get("clinicalStatus") or "") in ACTIVE_CLINICAL):
        checked = d.get(CODES_CONFIGURED)
        late = replace(late, chronic=bool(d["chronic"]),
                       code_checked=None if checked is None else bool(checked))
    return late


def _day(text: str | None, tz: ZoneInfo, *, end: bool = False):  # noqa: ANN202
    try:
        return local_day(text, tz, end=end)
    except ValueError:  # shaped like a date but none (2026-13-45)
        return None


def condition_fact(condition_id: str, state: ConditionState, tz: ZoneInfo) -> Condition | None:
    """The chronic condition the decision counts by month (None: not a chronic condition).

    It began by the earliest of its onset (a partial one at its last day: ``2026`` began by 31
    December) and the day billing first received it (it existed by then: an onset ``2026``
    received in January counts from January); a partial abatement ends it at its first day
    (``2026-09`` ended by 1 September). A row the previous release wrote (``chronic`` unknown,
    ``counts`` set, no dates) counts for every month, as it did. Whether a chronic code list
    judged it: not known (a version from before ingest said) is taken as judged, so only a
    condition ingest says no list judged makes the month ``chronic-conditions-unverified``."""
    if state.chronic is None and state.counts:
        return Condition(condition_id, None, None, True)
    if not state.chronic:
        return None
    began = [d for d in (_day(state.onset, tz, end=True) if state.onset else None,
                         state.first_received_at.astimezone(tz).date()
                         if state.first_received_at is not None else None) if d is not None]
    since = min(began) if began else None
    until = _day(state.abatement, tz) if state.abatement else None
    if until is None and state.resolved_at is not None:
        until = state.resolved_at.astimezone(tz).date()
    return Condition(condition_id, since, until, state.code_checked is not False)
