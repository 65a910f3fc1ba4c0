"""Chronic Care Management (99490/99439, 99491/99437, 99487/99489, G0506): one patient-month.

Pure: facts in, a self-explaining ``Decision`` out. Thresholds, caps and fees come from the
ruleset data; only the shape of the rules lives here.
"""

from __future__ import annotations

from decimal import Decimal
from zoneinfo import ZoneInfo

from ccm_billing.domain import model as m
from ccm_billing.domain.model import (
    Consent,
    Decision,
    NextThreshold,
    NotCounted,
    Option,
    PatientMonth,
    PracticeOptions,
    add_months,
)
from ccm_billing.domain.rules.ruleset import Ladder, RuleSet

PROGRAM = "CCM"
BLOCKER_ORDER = (
    m.CONSENT_MISSING,
    m.CONSENT_NOT_ACTIVE,
    m.INSUFFICIENT_CHRONIC_CONDITIONS,
    m.CARE_PLAN_MISSING,
    m.STAFF_ROLE_UNKNOWN,
    m.DUPLICATE_BILLER,
    m.INITIATING_VISIT_MISSING,
    m.EXCLUDED_COMBINATION,
    m.TIME_THRESHOLD_NOT_MET,
)
CARE_PLAN_CLOSED = {"revoked", "entered-in-error", "draft", "unknown"}
# Option preference when two combinations pay the same: the simpler claim first.
OPTION_ORDER = ("staff", "practitioner", "complex")


REVOKED = frozenset({"inactive", "draft", "proposed"})


def effective_consent(
    facts: PatientMonth, options: PracticeOptions, tz: ZoneInfo
) -> tuple[Consent | None, str | None, str | None]:
    """The consent the month can bill under (earliest obtained), else the blocker and a note."""
    valid = valid_consents(facts, options, tz)
    if valid:
        return min(valid, key=lambda c: (c.obtained_at is not None, c.obtained_at)), None, None
    if any(c.status == "entered-in-error" for c in facts.consents) and not any(
        c.status != "entered-in-error" for c in facts.consents
    ):
        return None, m.CONSENT_MISSING, "the only consent was entered in error: its time is void"
    if any(c.status != "entered-in-error" for c in facts.consents):
        return None, m.CONSENT_NOT_ACTIVE, None
    return None, m.CONSENT_MISSING, None


def valid_consents(facts: PatientMonth, options: PracticeOptions, tz: ZoneInfo) -> list[Consent]:
    """The consents that cover some day of the month: granted (or revoked in it or later),
    obtained by its end, within their provision.period, and not expired before its first day
    (a consent expiring on the 1st covers no day of that month)."""
    month = facts.month
    renewal = options.consent_renewal_months
    valid = []
    for c in facts.consents:
        if c.provision != "permit":
            continue
        # Only for months its provision.period reaches (a period ending mid-month, like a
        # revocation, leaves that month billable).
        if (c.valid_from and c.valid_from > month.last_day) or (
                c.valid_until and c.valid_until < month.first_day):
            continue
        obtained = c.obtained_at.astimezone(tz).date() if c.obtained_at else None
        if obtained is not None and obtained > month.last_day:
            continue
        if (until := c.expires_on(renewal, tz)) is not None and until <= month.first_day:
            continue
        if c.status == "active":
            valid.append(c)
        elif (c.status in REVOKED and c.effective_until
              and c.effective_until >= month.first_day):
            # Revocation takes effect at the end of the month in which it happened (ingest
            # reports a granted consent set back to draft or proposed as revoked, too).
            valid.append(c)
    return valid


def consent_expired_for(entry: m.TimeEntry, valid: list[Consent], options: PracticeOptions,
                        tz: ZoneInfo) -> bool:
    """Whether every consent obtained by the entry's time had expired by its day: time on or
    after the expiry day is not counted, as time before the consent is not (rules §3.1), unless
    another consent (a renewal) covers it."""
    day = entry.start.astimezone(tz).date()
    obtained = [c for c in valid if c.obtained_at is None or c.obtained_at <= entry.start]
    return bool(obtained) and all(
        (until := c.expires_on(options.consent_renewal_months, tz)) is not None and day >= until
        for c in obtained)


def initiating_visit(
    facts: PatientMonth, consent: Consent | None, ruleset: RuleSet, tz: ZoneInfo
) -> m.Visit | None:
    """The visit that initiated the CCM the month bills under: the latest finished qualifying
    visit by that consent's billing practitioner (by anyone when it names none) on or before
    the day CCM started — the consent's — and within the lookback before it. It stays the same
    for every month of that consent. Without a consent or its date, CCM would start at the
    month's end at the latest (such a visit is never billed G0506: ``_first_dated_episode``)."""
    start = facts.month.last_day
    if consent is not None and consent.obtained_at is not None:
        start = min(start, consent.obtained_at.astimezone(tz).date())
    earliest = add_months(start, -ruleset.setting(PROGRAM, "initiating_visit_lookback_months"))
    by = consent.practitioner if consent is not None else facts.billing_practitioner
    found = [v for v in facts.visits
             if v.status == "finished" and earliest <= v.day <= start
             and (by is None or by in v.practitioners)]
    return max(found, key=lambda v: (v.day, v.visit_id), default=None)


def _first_dated_episode(facts: PatientMonth, consent: Consent | None) -> bool:
    """Whether the month bills under the patient's first CCM consent, and that consent is dated:
    G0506 is billed once per patient, with the first episode's initiating visit, never again.
    An undated consent anchors no initiation (its visit would move with the month)."""
    if consent is None or consent.obtained_at is None:
        return False
    # An earlier consent that was granted: active, revoked, or set back to draft/proposed
    # after it was granted (ingest gave it the end of its revocation month).
    return not any(c.provision == "permit"
                   and (c.status in ("active", "inactive")
                        or (c.status in REVOKED and c.effective_until is not None))
                   and c.obtained_at is not None and c.obtained_at < consent.obtained_at
                   for c in facts.consents)


def named_practitioner(facts: PatientMonth, consent: Consent | None) -> str | None:
    """The billing practitioner the month's facts name: the consent's it bills under, else the
    one named by the patient's earliest active consent that names one. None: no one."""
    return (consent.practitioner if consent else None) or facts.billing_practitioner


FOREIGN_TIME_WARNINGS = {m.OTHER_PRACTITIONER: m.OTHER_PRACTITIONER_TIME,
                         m.BILLING_PRACTITIONER_UNKNOWN: m.BILLING_PRACTITIONER_UNKNOWN}


def whose_time(named: str | None, entries: list[m.TimeEntry]) -> tuple[str | None, dict[str, str]]:
    """(The month's billing practitioner, why each practitioner-role entry of ``entries`` that
    is not theirs does not count). 99491/99437 are the billing practitioner's personal time
    and only their time counts as staff time (rules §1, §2): another practitioner's never
    counts. Identity, not role: an entry is the named practitioner's when one of the
    references naming its performer names them (a PractitionerRole is its Practitioner).
    Nobody named: the one practitioner who logged the time bills it; when several did, whose
    time would bill cannot be told and none of it counts (never one physician's time under
    another, never two physicians' time summed into one 99491)."""
    if named is not None:
        return named, {e.entry_id: m.OTHER_PRACTITIONER for e in entries
                       if named not in e.performers}
    people = {e.performer for e in entries}
    if len(people) > 1:
        return None, {e.entry_id: m.BILLING_PRACTITIONER_UNKNOWN for e in entries}
    return next(iter(people), None), {}


def care_plan_check(facts: PatientMonth, ruleset: RuleSet) -> tuple[str | None, str | None]:
    """(blocker, warning) from the patient's care plans."""
    month_end = facts.month.last_day
    plans = [
        p
        for p in facts.care_plans
        if p.status not in CARE_PLAN_CLOSED
        and p.intent in ("plan", "order")
        and (p.created is None or p.created <= month_end)
        # A completed plan was in place through the month it ended, not after.
        and not (p.status == "completed" and p.completed_on
                 and p.completed_on < facts.month.first_day)
    ]
    if not plans:
        return m.CARE_PLAN_MISSING, None
    review_months = ruleset.setting(PROGRAM, "care_plan_review_months")
    if review_months:
        last = max(max(d for d in (p.last_review, p.created) if d) if (p.last_review or p.created)
                   else month_end for p in plans)
        if add_months(last, review_months) < month_end:
            return None, m.CARE_PLAN_REVIEW_OVERDUE
    return None, None


def decide(
    facts: PatientMonth, ruleset: RuleSet, options: PracticeOptions | None = None
) -> Decision:
    """Decide one patient-month under the CCM rules."""
    options = options or PracticeOptions()
    tz = ZoneInfo(facts.timezone)
    month = facts.month
    blockers: set[str] = set()
    warnings: set[str] = set()
    notes: list[str] = []

    consent, consent_blocker, consent_note = effective_consent(facts, options, tz)
    if consent_blocker:
        blockers.add(consent_blocker)
    if consent_note:
        notes.append(consent_note)
    valid = valid_consents(facts, options, tz) if consent is not None else []
    if consent is not None and consent.received_at is not None:
        received = consent.received_at.astimezone(tz).date()
        if received > month.last_day:
            # Documented after the month it bills (dated back): billable, as the EHR says when
            # it was obtained, but the reviewer must see it (rules §3.1: documented before).
            warnings.add(m.CONSENT_DOCUMENTED_LATE)
            notes.append(f"Consent/{consent.consent_id} was received on {received}, after the "
                         "month ended")

    counted: list[m.TimeEntry] = []
    not_counted: list[NotCounted] = []
    unknown_seconds = 0
    reasons: list[tuple[m.TimeEntry, str | None]] = []
    for e in sorted(facts.entries, key=lambda e: (e.start, e.entry_id)):
        day = e.start.astimezone(tz).date()
        reason = None
        if not month.contains(day):
            reason = m.OTHER_MONTH
        elif e.status != "finished":
            reason = m.NOT_FINISHED
        elif e.late:
            reason = m.LOGGED_AFTER_CLOSE
            warnings.add(m.BACKDATED_ENTRY)
        elif e.role == "non-clinical":
            reason = m.NON_CLINICAL_PERFORMER
        elif e.role == "unknown":
            reason = m.UNKNOWN_PERFORMER_ROLE
            unknown_seconds += e.seconds
        elif consent is not None and consent.obtained_at and e.start < consent.obtained_at:
            reason = m.BEFORE_CONSENT
            warnings.add(m.CONSENT_AFTER_SERVICE)
        elif consent is not None and consent_expired_for(e, valid, options, tz):
            reason = m.CONSENT_EXPIRED
            warnings.add(m.CONSENT_EXPIRED)
        reasons.append((e, reason))
    billing_practitioner, foreign = whose_time(
        named_practitioner(facts, consent),
        [e for e, reason in reasons if reason is None and e.role == "practitioner"])
    for e, reason in reasons:
        reason = reason or foreign.get(e.entry_id)
        if reason is None:
            counted.append(e)
            warnings.update(w for w in e.warnings if w == m.TIME_LENGTH_PERIOD_MISMATCH)
        else:
            not_counted.append(NotCounted(e.entry_id, e.seconds, reason))
    warnings.update(FOREIGN_TIME_WARNINGS[r] for r in foreign.values())
    if unknown_seconds:
        blockers.add(m.STAFF_ROLE_UNKNOWN)

    minimum = ruleset.setting(PROGRAM, "minimum_chronic_conditions")
    in_month = [c for c in facts.conditions if c.counts_in(month)]
    if facts.chronic_conditions + len(in_month) < minimum:
        blockers.add(m.INSUFFICIENT_CHRONIC_CONDITIONS)
    elif facts.chronic_conditions + sum(c.code_checked for c in in_month) < minimum:
        # Eligible only by conditions no chronic code list was applied to (rules §3.2: which
        # codes count as chronic is data): a reviewer must confirm they are chronic.
        warnings.add(m.CHRONIC_CONDITIONS_UNVERIFIED)
        notes.append("every active condition was counted as chronic (no chronic code list): "
                     "configure the practice's chronic_codes in ingest")
    plan_blocker, plan_warning = care_plan_check(facts, ruleset)
    if plan_blocker:
        blockers.add(plan_blocker)
    if plan_warning:
        warnings.add(plan_warning)
    if facts.duplicate_biller:
        blockers.add(m.DUPLICATE_BILLER)
    visit = None
    if facts.initiating_visit_tracked:
        visit = initiating_visit(facts, consent, ruleset, tz)
        if visit is None:
            if options.initiating_visit_missing == "blocker":
                blockers.add(m.INITIATING_VISIT_MISSING)
            else:
                warnings.add(m.INITIATING_VISIT_MISSING)
        else:
            notes.append(f"initiating visit Encounter/{visit.visit_id} of {visit.day}")

    staff_s = sum(e.seconds for e in counted if e.role == "staff")
    prac_s = sum(e.seconds for e in counted if e.role == "practitioner")
    complex_documented = facts.complexity_documented or any(e.complex for e in counted)
    staff_ladder = ruleset.ladder(PROGRAM, "staff")
    prac_ladder = ruleset.ladder(PROGRAM, "practitioner")
    complex_ladder = ruleset.ladder(PROGRAM, "complex")

    # Practitioner minutes count toward 99491/99437 or as staff time, never both.
    all_entries = counted
    prac_entries = [e for e in counted if e.role == "practitioner"]
    candidates: list[tuple[str, dict[str, int], list[m.TimeEntry], object]] = [
        ("staff", staff_ladder.codes_for(staff_s + prac_s), all_entries, staff_ladder),
        ("practitioner", prac_ladder.codes_for(prac_s), prac_entries, prac_ladder),
    ]
    if complex_documented:
        candidates.append(
            ("complex", complex_ladder.codes_for(staff_s + prac_s), all_entries, complex_ladder)
        )
    options_found: list[Option] = []
    for name, codes, entries, ladder in candidates:
        if not codes:
            continue
        running, cumulative = 0, []
        for e in entries:
            running += e.seconds
            cumulative.append((running, e.start))
        options_found.append(
            Option(name, codes, ruleset.amount(codes), ladder.threshold_crossed(cumulative, codes))
        )
    options_found.sort(key=lambda o: (-o.medicare_amount, OPTION_ORDER.index(o.name)))
    chosen = options_found[0] if options_found else None
    alternatives = tuple(options_found[1:])
    if chosen is not None and alternatives:
        alt = alternatives[0]
        notes.append(
            f"chose {chosen.name} {_codes_text(chosen.codes)} (${chosen.medicare_amount}) over "
            f"{alt.name} {_codes_text(alt.codes)} (${alt.medicare_amount})"
        )

    potential = dict(chosen.codes) if chosen else {}
    # G0506 needs no time (rules §1: threshold none): the month containing the initiating
    # visit bills it when its other prerequisites hold, whether or not a time code is reached.
    initiation_due = (
        visit is not None
        and month.contains(visit.day)
        and not facts.initiation_billed_before
        and _first_dated_episode(facts, consent)
    )
    if initiation_due:
        initiation = ruleset.setting(PROGRAM, "initiation")["code"]
        potential[initiation] = 1
        notes.append(f"{initiation} billed with the initiating visit of {visit.day}")
    if chosen is None:
        if initiation_due:
            # Not what blocks the month: it bills G0506 alone, and says its time fell short.
            warnings.add(m.TIME_THRESHOLD_NOT_MET)
            notes.append(f"no time code reached its threshold: {initiation} is the month's "
                         "only code")
        else:
            blockers.add(m.TIME_THRESHOLD_NOT_MET)

    paths = [("staff", staff_ladder, staff_s + prac_s), ("practitioner", prac_ladder, prac_s)]
    if complex_documented:
        paths.append(("complex", complex_ladder, staff_s + prac_s))
    next_threshold = _next_threshold(chosen, paths, ruleset)
    date_of_service = None
    if chosen is not None:
        if options.date_of_service == "threshold-met" and chosen.threshold_met_at is not None:
            date_of_service = chosen.threshold_met_at.astimezone(tz).date()
        else:
            date_of_service = month.last_day
    elif initiation_due:
        date_of_service = visit.day  # G0506 alone: billed with the initiating visit's date
    ordered_blockers = tuple(b for b in BLOCKER_ORDER if b in blockers)
    return Decision(
        patient=facts.patient,
        month=month,
        program=PROGRAM,
        ruleset=ruleset.name,
        codes={} if ordered_blockers else potential,
        seconds={"staff": staff_s, "practitioner": prac_s},
        counted=tuple(e.entry_id for e in counted),
        not_counted=tuple(not_counted),
        blockers=ordered_blockers,
        warnings=tuple(sorted(warnings)),
        chosen=chosen,
        alternatives=alternatives,
        potential_codes=potential,
        next_threshold=next_threshold,
        date_of_service=date_of_service,
        practitioner=billing_practitioner,
        notes=tuple(notes),
        initiating_visit=visit,
    )


def _codes_text(codes: dict[str, int]) -> str:
    return "+".join(f"{c}x{n}" if n > 1 else c for c, n in codes.items())


def _next_threshold(chosen: Option | None, paths: list[tuple[str, Ladder, int]],
                    ruleset: RuleSet) -> NextThreshold | None:
    """The nearest threshold that would raise the month's best amount, on any option's path
    (``paths``: (option, its ladder, the seconds it counts)), and which option it belongs to:
    the fewest further minutes, then the greater amount, then ``OPTION_ORDER``. A step that
    pays less than the option chosen now raises nothing (e.g. 99437 at 60 practitioner
    minutes when 99439 at 40 already pays more than 99491). None: no more time pays more."""
    best = chosen.medicare_amount if chosen is not None else Decimal("0")
    found = []
    for name, ladder, have in paths:
        seconds = have
        while (step := ladder.next_step_seconds(seconds)) is not None:
            code, needed = step
            amount = ruleset.amount(ladder.codes_for(needed))
            if amount > best:
                found.append((needed - have, -amount, OPTION_ORDER.index(name), code, name))
                break
            seconds = needed
    if not found:
        return None
    short, _, _, code, name = min(found)
    return NextThreshold(code, -(-short // 60), name)
