"""FHIR R4 resource versions → CCM events (contracts/events/ingest.*). Pure functions.

Each mapper takes the accepted version's JSON, the resource's previous CCM state (what earlier
versions meant: e.g. time already logged) and the practice's configuration, and returns the
events plus the new state. A deleted resource is mapped from its last content with
``deleted=True``: a deletion ends what its stored state counted (time logged, a consent or care
plan that was CCM, for the patient it was about), whatever the configuration says now, and is
held to none of the rules a create or update must meet: it never fails.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from ccm_ingest.domain.config import IngestConfig, any_coding_matches, code_matches
from ccm_ingest.domain.model import (
    Issue,
    MappedEvent,
    Mapping,
    SourceVersion,
    isoformat,
    rejected,
)
from ccm_ingest.domain.rules import ACT_CODE, REVIEWER_TYPES, review_extensions

EVENT_TYPES = (
    "ingest.time-entry.logged.v1",
    "ingest.time-entry.reversed.v1",
    "ingest.visit.recorded.v1",
    "ingest.visit.reversed.v1",
    "ingest.consent.granted.v1",
    "ingest.consent.revoked.v1",
    "ingest.consent.declined.v1",
    "ingest.consent.voided.v1",
    "ingest.care-plan.created.v1",
    "ingest.care-plan.revised.v1",
    "ingest.care-plan.closed.v1",
    "ingest.patient.upserted.v1",
    "ingest.practitioner.upserted.v1",
    "ingest.practitioner-role.upserted.v1",
    "ingest.organization.upserted.v1",
    "ingest.condition.upserted.v1",
)
NPI = "http://hl7.org/fhir/sid/us-npi"
MBI = "http://hl7.org/fhir/sid/us-mbi"
UCUM_SECONDS = {"s": 1, "min": 60, "h": 3600}
EVENT_REFERENCE_TYPES = ("Patient", "Practitioner", "PractitionerRole", "Organization",
                         "Condition", "CarePlan", "Consent", "Encounter", "CareTeam")
_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


@dataclass(frozen=True)
class MappingContext:
    """Everything a mapper needs besides the resource itself."""

    source: SourceVersion
    config: IngestConfig
    timezone: ZoneInfo
    state: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)  # PractitionerRole id → JSON
    practitioners: dict[str, dict[str, Any]] = field(default_factory=dict)  # Practitioner id → JSON
    # Base URLs (``https://host/fhir``) under which an absolute reference is this server's.
    local_bases: tuple[str, ...] = ()
    # A deletion: the patient the deleted version was stored as being about (``Patient/id``),
    # whatever base the delete request came to (its absolute references may not read as local).
    stored_patient: str | None = None
    # How far ahead of the time a version is received its facts may be (the EHR's clock may run
    # ahead of ours): CCM time starting later has not been spent yet.
    clock_skew: timedelta = timedelta(minutes=5)

    def ref(self, value: Any, types: tuple[str, ...] = EVENT_REFERENCE_TYPES) -> str | None:
        return reference(value, types, self.local_bases)

    def refs(self, values: Any, types: tuple[str, ...] = EVENT_REFERENCE_TYPES) -> list[str]:
        return references(values, types, self.local_bases)

    def patient(self, value: Any) -> str | None:
        """The ``Patient/id`` on this server a patient link names, else (a deletion) the patient
        the deleted version was stored as being about."""
        return self.ref(value, ("Patient",)) or self.stored_patient


# ---- small readers ---------------------------------------------------------------------------

_LOCAL_TAIL = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?")


def _server_and_path(url: str) -> tuple[str, str]:
    """(host[:port] in lower case without a default port, path without a trailing slash) of an
    absolute URL; its scheme is left out: behind a TLS proxy the same server is http inside
    and https outside."""
    rest = url.partition("://")[2]
    server, slash, path = rest.partition("/")
    server = server.lower()
    for default in (":80", ":443"):
        server = server.removesuffix(default)
    return server, (slash + path).rstrip("/")


def local_path(ref: str, local_bases: tuple[str, ...] = ()) -> str | None:
    """``ref`` relative to this server: as it is when relative; ``Type/id[/_history/v]`` when it
    is an absolute URL of exactly that under one of ``local_bases``; None for another server's
    URL (FHIR: an absolute reference names the resource on the server at that base)."""
    if "://" not in ref:
        return ref
    server, path = _server_and_path(ref)
    for base in local_bases:
        base_server, base_path = _server_and_path(base)
        if server == base_server and path.startswith(base_path + "/"):
            rest = path[len(base_path) + 1:]
            return rest if _LOCAL_TAIL.fullmatch(rest) else None
    return None


def reference(value: Any, types: tuple[str, ...] = EVENT_REFERENCE_TYPES,
              local_bases: tuple[str, ...] = ()) -> str | None:
    """The ``Type/id`` on this server a Reference names (relative, or an absolute URL under
    one of ``local_bases``), else None: contained, ``urn:``, conditional, another server's."""
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str) or ref.startswith(("#", "urn:")) or "?" in ref:
        return None
    if (ref := local_path(ref, local_bases)) is None:
        return None
    match = _REF.search(ref)
    if match is None or match.group(1) not in types:
        return None
    return f"{match.group(1)}/{match.group(2)}"


def _foreign_patient(value: Any, ctx: MappingContext) -> bool:
    """A reference to a Patient on another server (an absolute URL under no local base)."""
    ref = value.get("reference") if isinstance(value, dict) else None
    return (isinstance(ref, str) and "://" in ref and "/Patient/" in ref
            and local_path(ref, ctx.local_bases) is None)


def references(values: Any, types: tuple[str, ...] = EVENT_REFERENCE_TYPES,
               local_bases: tuple[str, ...] = ()) -> list[str]:
    return [r for v in values or [] if (r := reference(v, types, local_bases)) is not None]


def codings(*concepts: Any) -> list[dict[str, Any]]:
    """Codings (with a code) of one or more CodeableConcepts or lists of them."""
    found = []
    for concept in concepts:
        for c in concept if isinstance(concept, list) else [concept]:
            if not isinstance(c, dict):
                continue
            for coding in c.get("coding") or []:
                if isinstance(coding, dict) and coding.get("code"):
                    found.append({"system": coding.get("system"), "code": coding["code"],
                                  "display": coding.get("display")})
    return found


def coarser_than_a_day(value: Any) -> str | None:
    """``"a year"`` or ``"a month"`` for a FHIR date or dateTime that gives no day (``2026``,
    ``2026-03``), else None: a CCM fact placed by it would invent its day."""
    if isinstance(value, str) and len(value) < len("YYYY-MM-DD"):
        return "a year" if len(value) == len("YYYY") else "a month"
    return None


def instant(value: str, tz: ZoneInfo) -> datetime:
    """A FHIR date/dateTime as an aware datetime; partial dates start in the practice's zone."""
    if len(value) == 4:
        return datetime(int(value), 1, 1, tzinfo=tz)
    if len(value) == 7:
        return datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=tz)
    parsed = datetime.fromisoformat(value)
    parsed = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=tz)
    parsed.astimezone(UTC)  # OverflowError beyond year 9999 in UTC, which consumers work in
    return parsed


def month_end(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def telecom(values: Any) -> list[dict[str, Any]]:
    return [
        {"system": t["system"], "value": t["value"], "use": t.get("use")}
        for t in values or []
        if isinstance(t, dict) and t.get("system") and t.get("value")
    ]


def human_name(values: Any) -> dict[str, Any] | None:
    names = [n for n in values or [] if isinstance(n, dict)]
    if not names:
        return None
    name = next((n for n in names if n.get("use") == "official"), names[0])
    return {"family": name.get("family"), "given": list(name.get("given") or []),
            "prefix": list(name.get("prefix") or []), "text": name.get("text")}


def identifier(values: Any, system: str) -> str | None:
    return next((i.get("value") for i in values or []
                 if isinstance(i, dict) and i.get("system") == system and i.get("value")), None)


def _period(value: Any) -> dict[str, Any]:
    value = value if isinstance(value, dict) else {}
    return {"start": value.get("start"), "end": value.get("end")}


def _warning(text: str, where: str) -> Issue:
    """What the write answers beside storing the version (an OperationOutcome warning)."""
    return Issue("warning", "business-rule", text, (where,))


def _event(kind: str, subject: str, ctx: MappingContext, **data: Any) -> MappedEvent:
    return MappedEvent(type=kind, subject=subject, data={"source": ctx.source.to_event(), **data})


def _source_day(ctx: MappingContext) -> date:
    """The practice's day of the version being mapped (its lastUpdated, in the practice zone)."""
    return ctx.source.last_updated.astimezone(ctx.timezone).date()


def _self(ctx: MappingContext) -> str:
    return f"{ctx.source.resource_type}/{ctx.source.id}"


# ---- Encounter → time logged / reversed -------------------------------------------------------

# The longest CCM time entry taken: a day. Longer is a data error (a month-long period, a unit
# mistaken), and counted it would bill a patient's month on its own.
MAX_ENCOUNTER_SECONDS = 24 * 3600
# The event's warning identifier (billing's decision vocabulary, ccm-billing-rules.md §7); the
# response's OperationOutcome says it in words.
LENGTH_PERIOD_MISMATCH = "time-length-period-mismatch"


def _encounter_seconds(res: dict[str, Any], start: datetime | None,
                       end: datetime | None, ctx: MappingContext) -> tuple[int, list[Issue]]:
    """CCM seconds of an Encounter from ``length``, else its period (``start``/``end`` parsed)."""
    warnings: list[Issue] = []
    length = res.get("length")
    by_period = None
    period = res.get("period") or {}
    # A period gives a duration only when both ends carry a time of day: "2026-03" to
    # "2026-04" is not 744 hours of care.
    timed = all("T" in str(period.get(k) or "") for k in ("start", "end"))
    if start is not None and end is not None and timed:
        delta = end - start
        if delta.total_seconds() < 0:
            raise rejected(422, "invariant", "Encounter.period.end is before period.start",
                           "Encounter.period")
        by_period = int(delta.total_seconds())
    if length is not None:
        factor = UCUM_SECONDS.get(length.get("code") or "")
        if factor is None or length.get("value") is None:
            raise rejected(422, "value", "Encounter.length must be a UCUM duration in s, min or h "
                           "to count as CCM time", "Encounter.length.code")
        if length.get("comparator") is not None:
            raise rejected(422, "value", f"Encounter.length with comparator "
                           f"{length['comparator']!r} is no exact duration: CCM time needs one",
                           "Encounter.length.comparator")
        # Seconds are summed, never rounded up (19 min 59.7 s is not 20 min): the decimal as
        # written, times the unit, cut to whole seconds (a float would make 4.35 min 260.99 s).
        exact = Decimal(repr(float(length["value"]))) * factor
        if not 1 <= exact <= MAX_ENCOUNTER_SECONDS:
            raise rejected(422, "value", f"Encounter.length {length['value']} "
                           f"{length.get('code')} is no CCM duration: at least a second and at "
                           f"most {MAX_ENCOUNTER_SECONDS // 3600} hours", "Encounter.length.value")
        seconds = int(exact)
        if by_period is not None and abs(by_period - seconds) > ctx.config.length_tolerance_seconds:
            warnings.append(_warning(f"Encounter.length ({seconds} s) and period ({by_period} s) "
                                     "disagree; length was used", "Encounter.length"))
        return seconds, warnings
    if by_period is None:
        raise rejected(422, "required", "CCM time needs Encounter.length or a period with start "
                       "and end (dateTimes with a time of day)", "Encounter.length")
    if by_period > MAX_ENCOUNTER_SECONDS:
        raise rejected(422, "value", f"Encounter.period spans {by_period // 3600} hours: no CCM "
                       f"time entry is longer than {MAX_ENCOUNTER_SECONDS // 3600} hours; send "
                       "Encounter.length", "Encounter.period")
    if by_period < 1:
        raise rejected(422, "value", "Encounter.period starts and ends at the same second: no "
                       "CCM time to count (at least a second)", "Encounter.period")
    return by_period, warnings


PRIMARY_PERFORMER = "PPRF"
# v3 ParticipationType, at its R4 address and the one before it (STU3 EHRs still send it).
PARTICIPATION_TYPES = ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                       "http://hl7.org/fhir/v3/ParticipationType")
# The first performer when the primary one names no Practitioner or PractitionerRole of this
# server: billing holds its time (staff-role-unknown) instead of classifying it by whoever else
# took part.
UNIDENTIFIED_PRIMARY = {"practitioner": None, "practitionerRole": None, "roleCodes": [],
                        "classification": "unknown"}


def _is_primary(participant: dict[str, Any]) -> bool:
    """participant.type has v3-ParticipationType PPRF (a PPRF of another system, or of none,
    is not that code)."""
    return any(c["code"] == PRIMARY_PERFORMER and c["system"] in PARTICIPATION_TYPES
               for c in codings(participant.get("type") or []))


def _performers(res: dict[str, Any], ctx: MappingContext) -> tuple[list[dict[str, Any]],
                                                                    list[Issue]]:
    """Who performed the time, the primary performer (participant.type PPRF) first, each with
    the codes that classify them: a PractitionerRole's code, else a Practitioner's
    qualifications (a practice may send no PractitionerRoles). When a primary performer is no
    Practitioner or PractitionerRole of this server (another server's, contained, or none named),
    an unidentified performer comes first, even before another primary one (whose time it is
    cannot be told), with a warning (the second list)."""
    found: dict[str, dict[str, Any]] = {}  # each performer once, in participant order
    primary: dict[str, None] = {}  # … the primary ones first, in the order they are named so
    unidentified: list[Issue] = []
    for n, participant in enumerate(res.get("participant") or []):
        if not isinstance(participant, dict):
            continue
        ref = ctx.ref(participant.get("individual"), ("Practitioner", "PractitionerRole"))
        if _is_primary(participant):
            if ref is None:
                unidentified.append(_warning(
                    f"Encounter.participant[{n}] is the primary performer (PPRF) but names no "
                    "Practitioner or PractitionerRole of this server: its time cannot be "
                    "classified, and billing holds it (staff-role-unknown)",
                    f"Encounter.participant[{n}].individual"))
                continue
            primary.setdefault(ref)
        if ref is not None and ref not in found:
            found[ref] = _performer(ref, ctx)
    first = [dict(UNIDENTIFIED_PRIMARY)] if unidentified else []
    return first + [found[ref] for ref in primary] + [
        p for ref, p in found.items() if ref not in primary], unidentified


def _performer(ref: str, ctx: MappingContext) -> dict[str, Any]:
    if ref.startswith("Practitioner/"):
        who = ctx.practitioners.get(ref.removeprefix("Practitioner/"), {})
        qualifications = codings([q.get("code") for q in who.get("qualification") or []
                                  if isinstance(q, dict)])
        return {"practitioner": ref, "practitionerRole": None, "roleCodes": qualifications,
                "classification": classify_role(qualifications, ctx.config)}
    role = ctx.roles.get(ref.removeprefix("PractitionerRole/"), {})
    codes = codings(role.get("code") or [])
    return {"practitioner": ctx.ref(role.get("practitioner"), ("Practitioner",)),
            "practitionerRole": ref, "roleCodes": codes,
            "classification": role_classification(codes, codings(role.get("specialty") or []),
                                                  ctx.config)}


def map_encounter(res: dict[str, Any], ctx: MappingContext) -> Mapping:
    """CCM time (logged / reversed) and qualifying visits (recorded / reversed): an Encounter
    may be either, both or neither; each keeps its own state."""
    patient = ctx.patient(res.get("subject"))
    activity = codings(res.get("type") or [], res.get("serviceType"))
    performers = _Performers(res, ctx)
    time = _ccm_time(res, ctx, patient, activity, performers)
    visit = _visit(res, ctx, patient, activity, performers)
    # An Encounter both CCM time and a visit warns once of what both found (its performers).
    return Mapping([*time.events, *visit.events], {**time.state, **visit.state},
                   list(dict.fromkeys([*time.warnings, *visit.warnings])))


class _Performers:
    """An Encounter's ``_performers``, worked out when first wanted and then kept: its CCM time
    and its visit name the same ones."""

    __slots__ = ("ctx", "found", "res")

    def __init__(self, res: dict[str, Any], ctx: MappingContext) -> None:
        self.res, self.ctx = res, ctx
        self.found: tuple[list[dict[str, Any]], list[Issue]] | None = None

    def __call__(self) -> tuple[list[dict[str, Any]], list[Issue]]:
        if self.found is None:
            self.found = _performers(self.res, self.ctx)
        return self.found


def _visit(res: dict[str, Any], ctx: MappingContext, patient: str | None,
           activity: list[dict[str, Any]], performers: _Performers) -> Mapping:
    """A finished Encounter with a visit code (``visit_codes``: E/M, AWV, IPPE, TCM) is a visit
    that can initiate CCM; billing decides which one did. Recorded again when it changes (same
    ``visit``), reversed when it stops being one."""
    visit = _self(ctx)
    recorded, recorded_for = ctx.state.get("visitDate"), ctx.state.get("visitPatient")

    def reversal(reason: str) -> Mapping:
        # For the patient it was recorded for, even when the subject has changed since.
        whose = recorded_for or patient
        if recorded is None or whose is None:
            return Mapping()
        return Mapping([_event("ingest.visit.reversed.v1", whose, ctx, visit=visit,
                               patient=whose, reason=reason, date=recorded)])

    if ctx.deleted:
        return reversal("deleted")
    codes = [c for c in activity if code_matches(ctx.config.visit_codes, c["system"], c["code"])]
    status = res.get("status")
    if status in ("entered-in-error", "cancelled"):
        return reversal(status)
    if not codes or status != "finished" or patient is None:
        return reversal("not-a-visit")
    start_text = (res.get("period") or {}).get("start")
    try:
        # A year or a month is no visit date.
        start = instant(start_text, ctx.timezone) \
            if start_text and not coarser_than_a_day(start_text) else None
    except ValueError:  # valid FHIR Python cannot read (a leap second)
        start = None
    if start is None:
        return Mapping(reversal("not-a-visit").events, warnings=[_warning(
            "a visit code without a readable Encounter.period.start (at least its day): not "
            "recorded as a visit", "Encounter.period.start")])
    moved = reversal("not-a-visit").events if recorded_for not in (None, patient) else []
    day = start.astimezone(ctx.timezone).date().isoformat()
    named, unidentified = performers()
    recorded_now = _event("ingest.visit.recorded.v1", patient, ctx, visit=visit, patient=patient,
                          date=day, codes=sorted({c["code"] for c in codes}),
                          performers=named)
    return Mapping([*moved, recorded_now],
                   {"visitDate": day, "visitPatient": patient}, unidentified)


def _ccm_time(res: dict[str, Any], ctx: MappingContext, patient: str | None,
              activity: list[dict[str, Any]], performers: _Performers) -> Mapping:
    entry = _self(ctx)
    logged_month = ctx.state.get("loggedMonth")
    # For the patient the time was logged for, even when the subject changed or went since
    # (state stored before loggedPatient existed: the current subject).
    logged_for = ctx.state.get("loggedPatient") or patient

    def reversal(reason: str) -> Mapping:
        if logged_month is None or logged_for is None:
            return Mapping(state={})
        return Mapping([_event("ingest.time-entry.reversed.v1", logged_for, ctx, entry=entry,
                               patient=logged_for, reason=reason, serviceMonth=logged_month)],
                       {})

    if ctx.deleted:
        return reversal("deleted")
    cls = res.get("class") if isinstance(res.get("class"), dict) else {}
    timed = [c for c in activity if code_matches(ctx.config.ccm_time_codes, c["system"], c["code"])]
    status = res.get("status")
    if not timed or cls.get("code") in ctx.config.facility_classes:
        return reversal("not-ccm")
    if status in ("entered-in-error", "cancelled"):
        return reversal(status)
    if status != "finished":
        return reversal("not-ccm")
    if patient is None:
        raise rejected(422, "required", "CCM time needs Encounter.subject to reference a Patient "
                       "of this server (Patient/id, or an absolute URL under this server's /fhir "
                       "base; another server's patient is not this practice's)",
                       "Encounter.subject")
    period = res.get("period") or {}
    start_text, end_text = period.get("start"), period.get("end")
    if coarse := coarser_than_a_day(start_text):
        raise rejected(422, "value", f"CCM time needs Encounter.period.start to give at least its "
                       f"day ({start_text!r} is {coarse}): the service date is billed",
                       "Encounter.period.start")
    start = instant(start_text, ctx.timezone) if start_text else None
    end = instant(end_text, ctx.timezone) if end_text else None
    seconds, warnings = _encounter_seconds(res, start, end, ctx)
    if start is None:
        raise rejected(422, "required", "CCM time needs Encounter.period.start to place it in a "
                       "service month", "Encounter.period.start")
    if start > ctx.source.received_at + ctx.clock_skew:
        raise rejected(422, "business-rule", f"CCM time cannot start after it was sent "
                       f"(Encounter.period.start {start_text} is later than "
                       f"{isoformat(ctx.source.received_at)}): a finished Encounter's time has "
                       "been spent", "Encounter.period.start")
    if end is None:
        end = start + timedelta(seconds=seconds)
    local = start.astimezone(ctx.timezone)
    month = f"{local.year:04d}-{local.month:02d}"
    named, unidentified = performers()
    events = []
    if logged_month is not None and (logged_month != month or logged_for != patient):
        # Moved to another month or patient: take it out of the old one first.
        events += reversal("moved").events
    events.append(_event(
        "ingest.time-entry.logged.v1", patient, ctx,
        entry=entry, patient=patient, seconds=seconds, start=start.isoformat(),
        end=end.isoformat(), serviceDate=local.date().isoformat(), serviceMonth=month,
        activityCodes=sorted({c["code"] for c in timed}),
        complex=any_coding_matches(ctx.config.complex_codes, activity),
        performers=named,
        warnings=[LENGTH_PERIOD_MISMATCH] if warnings else [],
    ))
    return Mapping(events, {"loggedMonth": month, "loggedPatient": patient},
                   warnings + unidentified)


# ---- Consent → granted / revoked / declined / voided -----------------------------------------

CONSENT_EVENTS = {
    "active": "ingest.consent.granted.v1",
    "inactive": "ingest.consent.revoked.v1",
    "rejected": "ingest.consent.declined.v1",
    "entered-in-error": "ingest.consent.voided.v1",
}


def map_consent(res: dict[str, Any], ctx: MappingContext) -> Mapping:
    """A CCM consent's status as granted / revoked / declined / voided. One that stops being a
    CCM consent (its category, scope or patient changed) is voided, as if deleted: otherwise
    billing would go on counting it."""
    categories = codings(res.get("category") or [])
    if ctx.deleted:
        return _consent_deleted(res, ctx, categories)
    scope = codings(res.get("scope"))
    is_ccm = (any_coding_matches(ctx.config.consent_categories, categories)
              and any_coding_matches(ctx.config.consent_scopes, scope))
    patient = ctx.patient(res.get("patient"))
    if not is_ccm:
        was = ctx.state.get("ccm") and (ctx.state.get("patient") or patient)
        if not was:
            return Mapping(state={})
        return Mapping([_consent_event("ingest.consent.voided.v1", "entered-in-error", was,
                                       res, ctx, categories)], {})
    if patient is None:
        raise rejected(422, "required", "a CCM consent needs Consent.patient to reference a "
                       "Patient", "Consent.patient")
    status = res.get("status")
    kind = CONSENT_EVENTS.get(status or "")
    state: dict[str, Any] = {"ccm": True, "patient": patient}
    if kind is None and ctx.state.get("granted"):
        # Back to draft or proposed after it was granted: no longer in force, as if revoked.
        kind = "ingest.consent.revoked.v1"
    if kind is None:
        return Mapping(state=state)
    if status == "active" and consent_provision(res) == "permit":
        obtained = res.get("dateTime")
        coarse = coarser_than_a_day(obtained)
        if coarse or not isinstance(obtained, str):
            raise rejected(422, "required", "a CCM consent in force needs Consent.dateTime, when "
                           "it was obtained, to at least its day"
                           + (f" ({obtained!r} is {coarse})" if coarse else "")
                           + ": CCM time before it does not count", "Consent.dateTime")
        _obtained_by_now(obtained, ctx)
    until = None
    if kind == "ingest.consent.revoked.v1":
        # Revocation takes effect at the end of the month it happened in, the first version
        # that revoked it: a later edit of the revoked consent does not move it.
        until = ctx.state.get("effectiveUntil") or month_end(_source_day(ctx)).isoformat()
        state.update(granted=True, effectiveUntil=until)
    else:
        state["granted"] = status == "active"
        if state["granted"] and (expires := consent_expires_on(res, ctx.timezone)):
            state["expiresOn"] = expires  # what the expiry notices look for
    return Mapping([_consent_event(kind, status, patient, res, ctx, categories, until)], state)


def _obtained_by_now(obtained: str, ctx: MappingContext) -> None:
    """422 for a consent in force obtained on a day after the one its version was received
    (the practice's zone, as a review date is judged): billing counts CCM time from the day
    it was obtained, so a year typed 2030 for 2026 made every month until then unbillable,
    silently (a CCM consent dated in the future was accepted, with its ``granted`` event)."""
    if ctx.source.mapping_revision is not None:
        return  # a version stored before this rule, mapped again for a config change
    try:
        day = instant(obtained, ctx.timezone).astimezone(ctx.timezone).date()
    except (TypeError, ValueError, OverflowError):
        return  # what the validation of the dateTime refuses, or a day past the calendar
    # (an EHR's clock may run ahead of ours by the allowed difference, past midnight)
    received = (ctx.source.received_at + ctx.clock_skew).astimezone(ctx.timezone).date()
    if day > received:
        raise rejected(422, "business-rule", f"a CCM consent in force is dated "
                       f"{day.isoformat()}, after the day this version was received "
                       f"({received.isoformat()}, practice time zone): Consent.dateTime is "
                       "when it was obtained", "Consent.dateTime")


def _consent_deleted(res: dict[str, Any], ctx: MappingContext,
                     categories: list[dict[str, Any]]) -> Mapping:
    """A deletion voids what the consent counted as when it was stored (its state: a CCM
    consent, for its patient), whatever the practice's configuration says now: none of the
    rules a create or update must meet applies (a consent the configuration has made CCM
    since, without a patient, has nothing to void for anyone)."""
    patient = ctx.state.get("patient") or ctx.patient(res.get("patient"))
    if not ctx.state.get("ccm") or patient is None:
        return Mapping(state={})
    return Mapping([_consent_event("ingest.consent.voided.v1", "entered-in-error", patient, res,
                                   ctx, categories)],
                   {"ccm": True, "patient": patient, "granted": False})


# Consent.policyRule (v3-ActCode) codes whose base rule refuses: opting out, with or without
# exceptions. A consent without ``provision.type`` follows its policy rule.
_OPT_OUT = frozenset({"OPTOUT", "OPTOUTE"})
_ACT_CODE_SYSTEMS = frozenset({None, ACT_CODE, "urn:oid:2.16.840.1.113883.5.4"})


def consent_provision(res: dict[str, Any]) -> str:
    """``permit`` or ``deny``: the consent's ``provision.type``, else its policy rule's (an
    opt-out, OPTOUT or OPTOUTE, denies; any other rule permits)."""
    provision = res.get("provision") or {}
    if (kind := provision.get("type")) in ("deny", "permit"):  # (stored before it was checked:
        return kind                                          # anything else, the rule's)
    opted_out = any(c["code"] in _OPT_OUT and c["system"] in _ACT_CODE_SYSTEMS
                    for c in codings(res.get("policyRule")))
    return "deny" if opted_out else "permit"


def consent_expires_on(res: dict[str, Any], tz: ZoneInfo) -> str | None:
    """The last day (the practice's, ISO) a permitting consent's ``provision.period`` covers,
    as billing reads it: a dateTime the day it is in ``tz`` (one Python cannot hold, such as a
    leap second: the date as written), a date as written, a partial one its last day. None
    without an end, or for a deny."""
    provision = res.get("provision") or {}
    end = (provision.get("period") or {}).get("end")
    if not isinstance(end, str) or consent_provision(res) == "deny":
        return None
    if "T" in end:
        try:
            return instant(end, tz).astimezone(tz).date().isoformat()
        except (ValueError, OverflowError):
            return end[:10]
    if len(end) == 4:
        return f"{end}-12-31"
    if len(end) == 7:
        return month_end(date(int(end[:4]), int(end[5:7]), 1)).isoformat()
    return end


def _consent_event(kind: str, status: str | None, patient: str, res: dict[str, Any],
                   ctx: MappingContext, categories: list[dict[str, Any]],
                   until: str | None = None) -> MappedEvent:
    provision = res.get("provision") or {}
    actors = [a.get("reference") for a in provision.get("actor") or [] if isinstance(a, dict)]
    practitioners = ctx.refs(actors, ("Practitioner", "PractitionerRole"))
    practitioners += [p for p in ctx.refs(res.get("performer"), ("Practitioner",
                                                                   "PractitionerRole"))
                      if p not in practitioners]
    obtained = res.get("dateTime")
    try:
        obtained_at = instant(obtained, ctx.timezone).isoformat() if obtained else None
    except (ValueError, OverflowError):  # a leap second, beyond year 9999 in the zone
        if not ctx.deleted:
            raise
        obtained_at = None  # a deletion voids whatever the content: it is no new fact
    method = ("written" if res.get("sourceAttachment")
              else "verbal" if res.get("sourceReference") else "unknown")
    return _event(
        kind, patient, ctx, consent=_self(ctx), patient=patient, status=status,
        obtainedAt=obtained_at,
        method=method, period=_period(provision.get("period")),
        provision=consent_provision(res), practitioners=practitioners,
        categories=categories, effectiveUntil=until,
    )


# ---- CarePlan → created / revised / closed ----------------------------------------------------

CLOSING = frozenset({"revoked", "completed", "entered-in-error"})


def map_care_plan(res: dict[str, Any], ctx: MappingContext) -> Mapping:
    """A CCM care plan created / revised / closed. One that stops being a CCM care plan (its
    intent, category or subject changed) is closed as entered in error, as if deleted."""
    categories = codings(res.get("category") or [])
    patient = ctx.patient(res.get("subject"))
    if ctx.deleted:
        # What the plan counted as when stored (its state), whatever the configuration says
        # now: a deletion is held to none of the rules of a create or update.
        was = ctx.state.get("ccm") and (ctx.state.get("patient") or patient)
        if not was:
            return Mapping(state={})
        return Mapping([_care_plan_event("ingest.care-plan.closed.v1", "entered-in-error", was,
                                         res, ctx, categories, review=False)],
                       {"ccm": True, "patient": was})
    is_ccm = (res.get("intent") in ctx.config.care_plan_intents
              and any_coding_matches(ctx.config.care_plan_categories, categories))
    if is_ccm and patient is None and _foreign_patient(res.get("subject"), ctx):
        raise rejected(422, "value", "a CCM care plan needs CarePlan.subject to reference a "
                       "Patient of this server (another server's patient is not this "
                       "practice's)", "CarePlan.subject")
    if not is_ccm or patient is None:
        was = ctx.state.get("ccm") and (ctx.state.get("patient") or patient)
        if not was:
            return Mapping(state={})
        return Mapping([_care_plan_event("ingest.care-plan.closed.v1", "entered-in-error", was,
                                         res, ctx, categories, review=False)], {})
    status = res.get("status")
    if status in CLOSING:
        kind = "ingest.care-plan.closed.v1"
    elif ctx.state.get("ccm"):
        kind = "ingest.care-plan.revised.v1"
    else:
        kind = "ingest.care-plan.created.v1"
    state: dict[str, Any] = {"ccm": True, "patient": patient}
    completed_on = None
    if status == "completed":
        # The practice's day of the version that completed it; later edits of the completed
        # plan keep it (versions reach ingest in order; billing may read them out of order).
        completed_on = ctx.state.get("completedOn") or _source_day(ctx).isoformat()
        state["completedOn"] = completed_on
    return Mapping([_care_plan_event(kind, status, patient, res, ctx, categories,
                                     completed_on=completed_on)], state)


def _care_plan_event(kind: str, status: str | None, patient: str, res: dict[str, Any],
                     ctx: MappingContext, categories: list[dict[str, Any]], *,
                     review: bool = True, completed_on: str | None = None) -> MappedEvent:
    """``review=False``: a plan that is no CCM plan any more carries no review evidence."""
    return _event(
        kind, patient, ctx, carePlan=_self(ctx), patient=patient, status=status,
        completedOn=completed_on,
        intent=res.get("intent"), created=res.get("created"), period=_period(res.get("period")),
        author=ctx.ref(res.get("author")), careTeam=ctx.refs(res.get("careTeam"),
                                                                 ("CareTeam",)),
        addresses=ctx.refs(res.get("addresses"), ("Condition",)), categories=categories,
        review=care_plan_review(res, ctx) if review else None,
    )


def care_plan_review(res: dict[str, Any], ctx: MappingContext) -> dict[str, Any] | None:
    """The review evidence this version carries (the platform's care-plan-review extension,
    checked in ``rules``): ``{date, reviewer}``, the date a day in the practice's time zone.

    Evidence dated after the version was received, or whose reviewer is not a Practitioner or
    PractitionerRole here (e.g. a ``urn:uuid:`` no Bundle entry resolved), is refused.
    """
    found = review_extensions(res)
    if not found or ctx.deleted:
        return None
    index, ext = found[0]
    subs = [(j, s) for j, s in enumerate(ext.get("extension") or []) if isinstance(s, dict)]
    j, date_ext = next((j, s) for j, s in subs if s.get("url") == "date")
    where = f"CarePlan.extension[{index}].extension[{j}].valueDateTime"
    try:
        day = instant(date_ext["valueDateTime"], ctx.timezone).astimezone(ctx.timezone).date()
    except (KeyError, TypeError, ValueError):
        raise rejected(422, "value", "the review date is not a FHIR dateTime", where) from None
    received = ctx.source.received_at.astimezone(ctx.timezone).date()
    if day > received:
        raise rejected(422, "business-rule", f"the review date {day.isoformat()} is after the "
                       f"day this version was received ({received.isoformat()}, practice time "
                       "zone): review evidence records a review that happened", where)
    reviewer = None
    for j, sub in subs:
        if sub.get("url") == "reviewer":
            reviewer = ctx.ref(sub.get("valueReference"), REVIEWER_TYPES)
            if reviewer is None:
                raise rejected(422, "value", "the reviewer must reference a Practitioner or "
                               "PractitionerRole of this practice (Type/id)",
                               f"CarePlan.extension[{index}].extension[{j}].valueReference")
    return {"date": day.isoformat(), "reviewer": reviewer}


# ---- Directory and eligibility --------------------------------------------------------------

def map_patient(res: dict[str, Any], ctx: MappingContext) -> Mapping:
    me = _self(ctx)
    return Mapping([_event(
        "ingest.patient.upserted.v1", me, ctx, patient=me, active=res.get("active", True),
        mbi=identifier(res.get("identifier"), MBI), name=human_name(res.get("name")),
        managingOrganization=ctx.ref(res.get("managingOrganization"), ("Organization",)),
        generalPractitioner=ctx.refs(res.get("generalPractitioner")),
        deceased=bool(res.get("deceasedBoolean") or res.get("deceasedDateTime")),
        deleted=ctx.deleted,
    )])


def map_practitioner(res: dict[str, Any], ctx: MappingContext) -> Mapping:
    me = _self(ctx)
    return Mapping([_event(
        "ingest.practitioner.upserted.v1", me, ctx, practitioner=me,
        active=res.get("active", True), name=human_name(res.get("name")),
        npi=identifier(res.get("identifier"), NPI), telecom=telecom(res.get("telecom")),
        qualifications=codings([q.get("code") for q in res.get("qualification") or []
                                if isinstance(q, dict)]),
        deleted=ctx.deleted,
    )])


def classify_role(role_codings: list[dict[str, Any]], config: IngestConfig) -> str:
    """billing-practitioner, clinical-staff, non-clinical or unknown, from the role's codes."""
    if any_coding_matches(config.billing_practitioner_roles, role_codings):
        return "billing-practitioner"
    if any_coding_matches(config.clinical_staff_roles, role_codings):
        return "clinical-staff"
    if any_coding_matches(config.non_clinical_roles, role_codings):
        return "non-clinical"
    return "unknown"


def role_classification(codes: list[dict[str, Any]], specialties: list[dict[str, Any]],
                        config: IngestConfig) -> str:
    """A PractitionerRole's kind: its code decides; its specialty only when the code says
    nothing (a nurse with an internal-medicine specialty is clinical staff, not a billing
    practitioner)."""
    found = classify_role(codes, config)
    return classify_role(specialties, config) if found == "unknown" else found


def map_practitioner_role(res: dict[str, Any], ctx: MappingContext) -> Mapping:
    me = _self(ctx)
    codes = codings(res.get("code") or [])
    specialties = codings(res.get("specialty") or [])
    classification = role_classification(codes, specialties, ctx.config)
    return Mapping([_event(
        "ingest.practitioner-role.upserted.v1", me, ctx, practitionerRole=me,
        practitioner=ctx.ref(res.get("practitioner"), ("Practitioner",)),
        organization=ctx.ref(res.get("organization"), ("Organization",)),
        active=res.get("active", True), codes=codes, specialties=specialties,
        classification=classification,
        telecom=telecom(res.get("telecom")), deleted=ctx.deleted,
    )])


def map_organization(res: dict[str, Any], ctx: MappingContext) -> Mapping:
    me = _self(ctx)
    return Mapping([_event(
        "ingest.organization.upserted.v1", me, ctx, organization=me,
        active=res.get("active", True), name=res.get("name"),
        npi=identifier(res.get("identifier"), NPI), telecom=telecom(res.get("telecom")),
        partOf=ctx.ref(res.get("partOf"), ("Organization",)), deleted=ctx.deleted,
    )])


ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})


def _first_code(concept: Any) -> str | None:
    found = codings(concept)
    return found[0]["code"] if found else None


def _when(res: dict[str, Any], prefix: str) -> str | None:
    for suffix in ("DateTime", "String", "Age", "Period", "Range"):
        value = res.get(prefix + suffix)
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            found = value.get("start") or value.get("value")
            return None if found is None else str(found)
    return None


def is_chronic(res: dict[str, Any], config: IngestConfig) -> bool:
    """Active, not entered in error, and in the practice's chronic categories (and codes)."""
    clinical = _first_code(res.get("clinicalStatus"))
    verification = _first_code(res.get("verificationStatus"))
    if clinical not in ACTIVE_CLINICAL or verification in ("entered-in-error", "refuted"):
        return False
    if not any_coding_matches(config.chronic_categories, codings(res.get("category") or [])):
        return False
    return not config.chronic_codes or any_coding_matches(config.chronic_codes,
                                                          codings(res.get("code")))


def map_condition(res: dict[str, Any], ctx: MappingContext) -> Mapping:
    """A Condition of a patient, chronic or not. One whose subject stops being a Patient of
    this server no longer counts for the patient it was about (sent as not chronic for them)."""
    patient = ctx.patient(res.get("subject"))
    was = ctx.state.get("patient")
    if patient is None and was is None:
        return Mapping()
    return Mapping([_event(
        "ingest.condition.upserted.v1", patient or was, ctx, condition=_self(ctx),
        patient=patient or was, clinicalStatus=_first_code(res.get("clinicalStatus")),
        verificationStatus=_first_code(res.get("verificationStatus")),
        categories=codings(res.get("category") or []), code=codings(res.get("code")),
        onset=_when(res, "onset"), abatement=_when(res, "abatement"),
        recorded=recorded if isinstance(recorded := res.get("recordedDate"), str) else None,
        chronic=patient is not None and not ctx.deleted and is_chronic(res, ctx.config),
        # whether ``chronic`` was judged by the practice's chronic code list (none: every code
        # of a chronic category counts, which billing warns of)
        chronicCodesConfigured=bool(ctx.config.chronic_codes),
        deleted=ctx.deleted,
    )], {"patient": patient} if patient is not None else {})


MAPPERS: dict[str, Callable[[dict[str, Any], MappingContext], Mapping]] = {
    "Encounter": map_encounter,
    "Consent": map_consent,
    "CarePlan": map_care_plan,
    "Patient": map_patient,
    "Practitioner": map_practitioner,
    "PractitionerRole": map_practitioner_role,
    "Organization": map_organization,
    "Condition": map_condition,
}


def map_version(resource: dict[str, Any], ctx: MappingContext) -> Mapping:
    """The CCM meaning of one accepted version (or deletion) of a supported resource."""
    return MAPPERS[ctx.source.resource_type](resource, ctx)
