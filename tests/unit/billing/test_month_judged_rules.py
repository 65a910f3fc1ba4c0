"""A month is judged on what held in it (the compliance officer's findings 1, 2, 4 and 7): the
chronic conditions the patient had in the month (rules §3.2), a consent documented after the
month (rules §3.1, a warning like ``backdated-entry``), time after the consent expired (not
counted, as time before it is not), and conditions counted as chronic without a code list."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccm_billing.domain.model import Condition, Consent, Month, PracticeOptions
from ccm_billing.domain.rules import ccm, ruleset_for
from ccm_billing.service_layer.conditions import ConditionState, condition_fact, fold, fold_late
from tests.unit.billing.facts import entry, local, month_facts

SEPTEMBER = Month(2026, 9)
NY = "America/New_York"


def decide(facts, options: PracticeOptions | None = None):  # noqa: ANN001, ANN201
    return ccm.decide(facts, ruleset_for(facts.month), options)


def staff(day: date, seconds: int = 1500, n: int = 1):  # noqa: ANN201
    return entry(n, "staff", seconds, day)


# -- 1. chronic conditions counted for the service month ------------------------------------------

@pytest.mark.parametrize(("since", "until", "counts"), [
    (None, None, True),                          # dates unknown: every month, as before
    (date(2019, 4, 2), None, True),              # long-standing, not ended
    (date(2026, 9, 30), None, True),             # began on the month's last day
    (date(2026, 10, 1), None, False),            # began after the month
    (date(2026, 11, 20), None, False),           # diagnosed in November (finding 1, p04)
    (date(2019, 4, 2), date(2026, 9, 1), True),  # ended in the month: it was had in it
    (date(2019, 4, 2), date(2026, 8, 31), False),  # ended before the month began
    (date(2019, 4, 2), date(2026, 11, 12), True),  # resolution received in November (p05)
])
def test_a_condition_counts_for_a_month_it_was_had_in(since, until, counts):
    assert Condition("k", since, until).counts_in(SEPTEMBER) is counts


@pytest.mark.parametrize(("conditions", "blocked"), [
    # p04: one old condition, a second diagnosed on 2026-11-20: September stays short
    ((Condition("k1", date(2019, 1, 1), code_checked=True),
      Condition("k2", date(2026, 11, 20), code_checked=True)), True),
    # p05: one resolved in November without an abatement date: September still has two
    ((Condition("k1", date(2019, 1, 1), code_checked=True),
      Condition("k2", date(2019, 1, 1), date(2026, 11, 12), code_checked=True)), False),
    # abated in August: September has one
    ((Condition("k1", date(2019, 1, 1), code_checked=True),
      Condition("k2", date(2019, 1, 1), date(2026, 8, 15), code_checked=True)), True),
    ((Condition("k1", code_checked=True), Condition("k2", code_checked=True)), False),
])
def test_eligibility_is_judged_for_the_service_month(conditions, blocked):
    facts = month_facts("2026-09", chronic_conditions=0, conditions=conditions,
                        time_entries=[staff(date(2026, 9, 10))])
    d = decide(facts)
    assert ("insufficient-chronic-conditions" in d.blockers) is blocked
    assert d.billable is not blocked


@given(since=st.one_of(st.none(), st.dates(date(2024, 1, 1), date(2028, 12, 31))),
       length=st.one_of(st.none(), st.integers(0, 2000)),
       months=st.lists(st.integers(2025 * 12, 2028 * 12 + 11), min_size=3, max_size=3))
def test_the_months_a_condition_counts_in_are_one_unbroken_run(since, length, months):
    """Counted in two months, a condition is counted in every month between them."""
    until = (date.fromordinal((since or date(2024, 1, 1)).toordinal() + length)
             if length is not None else None)
    c = Condition("k", since, until)
    lo, mid, hi = sorted(Month(x // 12, x % 12 + 1) for x in months)
    if c.counts_in(lo) and c.counts_in(hi):
        assert c.counts_in(mid)


# -- the projection's fold of a condition's versions -------------------------------------------

AUG = datetime(2025, 8, 1, 12, tzinfo=UTC)
NOV = datetime(2026, 11, 12, 15, tzinfo=UTC)
DEC = datetime(2026, 12, 3, 15, tzinfo=UTC)


def version(clinical="active", chronic=True, *, onset=None, abatement=None,  # noqa: ANN001, ANN201
            verification="confirmed", deleted=False, **extra):
    return {"clinicalStatus": clinical, "verificationStatus": verification, "chronic": chronic,
            "deleted": deleted, "onset": onset, "abatement": abatement, **extra}


def folded(*versions: tuple[dict, datetime]) -> ConditionState:
    state = None
    for d, received in versions:
        state = fold(state, d, received)
    return state


def fact(state: ConditionState):  # noqa: ANN201
    return condition_fact("k", state, ZoneInfo(NY))


@pytest.mark.parametrize(("versions", "since", "until"), [
    # onset given: from it; no onset: from the first receipt (in the practice's zone)
    ([(version(onset="2019-04-02"), AUG)], date(2019, 4, 2), None),
    ([(version(), AUG)], date(2025, 8, 1), None),
    ([(version(onset="childhood"), AUG)], date(2025, 8, 1), None),  # no day: the receipt
    ([(version(recorded="2024-02-10"), AUG)], date(2024, 2, 10), None),  # recordedDate next
    ([(version(onset="2026-11"), DEC)], date(2026, 11, 30), None),  # partial: its last day
    ([(version(onset="2026-11-20T02:00:00Z"), DEC)], date(2026, 11, 19), None),  # NY day
    # ... or the day it was received, if earlier: it existed by then (found by review: an
    # onset "2026" received in November counted from 31 December and blocked the months before)
    ([(version(onset="2026"), NOV)], date(2026, 11, 12), None),
    ([(version(onset="2026-11-20"), NOV)], date(2026, 11, 12), None),
    # resolved without an abatement: from when the resolution was received, never before
    ([(version(onset="2019-04-02"), AUG), (version("resolved", False, onset="2019-04-02"), NOV)],
     date(2019, 4, 2), date(2026, 11, 12)),
    # resolved again (an edit in December): still from the first resolution
    ([(version(onset="2019-04-02"), AUG), (version("resolved", False, onset="2019-04-02"), NOV),
      (version("resolved", False, onset="2019-04-02"), DEC)], date(2019, 4, 2), date(2026, 11, 12)),
    # an abatement date wins; a partial one is its first day
    ([(version(onset="2019-04-02"), AUG),
      (version("resolved", False, onset="2019-04-02", abatement="2026-08-15"), NOV)],
     date(2019, 4, 2),
     date(2026, 8, 15)),
    ([(version(onset="2019-04-02"), AUG), (version("remission", False, onset="2019-04-02",
                                                   abatement="2026-09"),
                                           NOV)], date(2019, 4, 2), date(2026, 9, 1)),
    # active again (a relapse): not ended
    ([(version(onset="2019-04-02"), AUG), (version("resolved", False, onset="2019-04-02"), NOV),
      (version("relapse", onset="2019-04-02"), DEC)], date(2019, 4, 2), None),
])
def test_a_conditions_versions_fold_into_the_days_it_counts_for(versions, since, until):
    c = fact(folded(*versions))
    assert c is not None and (c.since, c.until) == (since, until)


@pytest.mark.parametrize("versions", [
    [(version(chronic=False), AUG)],  # not chronic under the practice's config
    [(version(), AUG), (version(verification="entered-in-error", clinical=None,
                                chronic=False), NOV)],  # in error: never was
    [(version(), AUG), (version(verification="refuted", chronic=False), NOV)],
    [(version(), AUG), (version(deleted=True, chronic=False), NOV)],
    [(version("resolved", False, abatement="2026-08-15"), NOV)],  # first known resolved
])
def test_a_condition_that_was_never_chronic_here_counts_for_no_month(versions):
    assert fact(folded(*versions)) is None


def test_a_row_the_previous_release_wrote_counts_for_every_month_and_as_judged():
    """billing_0025's columns empty, ``counts`` set (an old consumer during a rollout): counted
    as it was before the upgrade (it counted for no month)."""
    legacy = ConditionState(counts=True, chronic=None, onset=None, abatement=None,
                            first_received_at=None, resolved_at=None, code_checked=None)
    assert fact(legacy) == Condition("k", None, None, True)
    assert fact(replace(legacy, counts=False)) is None


@pytest.mark.parametrize(("configured", "checked"), [(True, True), (False, False),
                                                     (None, True)])  # not said: as judged
def test_a_condition_is_unverified_only_when_ingest_says_no_code_list_judged_it(
        configured, checked):
    extra = {} if configured is None else {"chronicCodesConfigured": configured}
    assert fact(folded((version(onset="2019-04-02", **extra), AUG))).code_checked is checked


def test_an_older_active_version_arriving_late_says_a_resolved_condition_was_chronic():
    resolved = folded((version("resolved", False, onset="2019-04-02"), NOV))
    assert resolved.chronic is None
    late = fold_late(resolved, version(onset="2019-04-02"), AUG)
    assert late.chronic is True and late.first_received_at == AUG
    assert fact(late).until == date(2026, 11, 12)
    # a late version never replaces what a newer one said
    assert fold_late(late, version(chronic=False), AUG) == late


# -- 2. a consent documented after the month -----------------------------------------------------

def consent(obtained: datetime, received: datetime | None) -> Consent:
    return Consent("c1", "active", obtained, received_at=received)


@pytest.mark.parametrize(("received", "warned"), [
    (None, False),                                   # not known (kept before billing_0025)
    (local(date(2026, 8, 1)), False),                # documented when obtained
    (local(date(2026, 9, 30), hour=23), False),      # in the month (its practice day)
    (datetime(2026, 10, 1, 3, tzinfo=UTC), False),   # 23:00 on 30 September in New York
    (local(date(2026, 10, 1), hour=0), True),        # the day after the month ended
    (local(date(2026, 11, 29)), True),               # p12: received on 29 November
])
def test_a_consent_received_after_the_month_is_billed_with_a_warning(received, warned):
    facts = month_facts("2026-09", consent=consent(local(date(2026, 8, 1)), received),
                        time_entries=[staff(date(2026, 9, 10))])
    d = decide(facts)
    assert d.billable  # the EHR says when it was obtained: it does not block
    assert ("consent-documented-late" in d.warnings) is warned
    assert any("received on" in n for n in d.notes) is warned


# -- 3. time after a consent expired --------------------------------------------------------------

RENEW_12 = PracticeOptions(consent_renewal_months=12)


@pytest.mark.parametrize(("obtained", "entries", "options", "counted", "expired", "blockers"), [
    # p03: obtained 2025-09-01, expires 2026-09-01: no day of September is covered (the time
    # is tallied, the month blocked)
    (date(2025, 9, 1), [(date(2026, 9, 10), 1500)], RENEW_12, 1500, 0, ("consent-not-active",)),
    # expires mid-month (2026-09-15): time before counts, time on and after the day does not
    (date(2025, 9, 15), [(date(2026, 9, 10), 1500), (date(2026, 9, 15), 600)], RENEW_12,
     1500, 600, ()),
    (date(2025, 9, 15), [(date(2026, 9, 14), 600), (date(2026, 9, 20), 1500)], RENEW_12,
     600, 1500, ("time-threshold-not-met",)),
    # no renewal interval: consents do not expire
    (date(2025, 9, 1), [(date(2026, 9, 10), 1500)], PracticeOptions(), 1500, 0, ()),
])
def test_time_on_or_after_the_consents_expiry_is_not_counted(obtained, entries, options,
                                                              counted, expired, blockers):
    facts = month_facts("2026-09", consent=Consent("c1", "active", local(obtained, hour=0)),
                        time_entries=[staff(day, s, n) for n, (day, s) in enumerate(entries)])
    d = decide(facts, options)
    assert d.seconds["staff"] == counted
    assert sum(n.seconds for n in d.not_counted if n.reason == "consent-expired") == expired
    assert ("consent-expired" in d.warnings) is bool(expired)
    assert d.blockers == blockers


def test_a_renewal_obtained_in_the_month_covers_the_time_after_it():
    """The first consent expires on 15 September, the renewal is obtained on the 20th: time
    between the two is not counted, time after the renewal is."""
    old = Consent("c1", "active", local(date(2025, 9, 15), hour=0))
    renewal = Consent("c2", "active", local(date(2026, 9, 20), hour=0))
    facts = replace(month_facts("2026-09", consent=old, time_entries=[
        staff(date(2026, 9, 10), 600, 1), staff(date(2026, 9, 17), 900, 2),
        staff(date(2026, 9, 22), 700, 3)]), consents=(old, renewal))
    d = decide(facts, RENEW_12)
    assert d.counted == ("enc-1", "enc-3") and d.seconds["staff"] == 1300
    assert [(n.entry_id, n.reason) for n in d.not_counted] == [("enc-2", "consent-expired")]


@given(obtained=st.dates(date(2025, 1, 1), date(2026, 12, 31)),
       renewal=st.integers(1, 24),
       days=st.lists(st.integers(0, 29), min_size=1, max_size=6))
def test_no_counted_time_falls_outside_the_consent(obtained, renewal, days):
    """Whatever the dates: every counted entry is on or after the consent and before its
    expiry."""
    facts = month_facts("2026-09", consent=Consent("c1", "active", local(obtained, hour=0)),
                        time_entries=[staff(date(2026, 9, 1 + d), 300, n)
                                      for n, d in enumerate(days)])
    d = decide(facts, PracticeOptions(consent_renewal_months=renewal))
    expiry = facts.consents[0].expires_on(renewal, ZoneInfo(NY))
    if "consent-not-active" in d.blockers:
        return  # no consent covers the month: nothing bills
    for e in facts.entries:
        if e.entry_id in d.counted:
            assert obtained <= e.start.date() < expiry


# -- 4. conditions counted as chronic without a code list -----------------------------------------

@pytest.mark.parametrize(("conditions", "count_only", "warned", "blocked"), [
    ((Condition("k1"), Condition("k2")), 0, True, False),  # p16: bronchitis + ankle sprain
    ((Condition("k1", code_checked=True), Condition("k2", code_checked=True)), 0, False, False),
    ((Condition("k1", code_checked=True), Condition("k2")), 0, True, False),
    ((Condition("k1", code_checked=True), Condition("k2", code_checked=True),
      Condition("k3")), 0, False, False),  # two checked ones suffice
    ((Condition("k1"),), 0, False, True),  # not eligible anyway: the blocker says so
    ((), 2, False, False),  # facts known by their number only
])
def test_a_month_eligible_only_by_unchecked_conditions_says_so(conditions, count_only, warned,
                                                               blocked):
    facts = month_facts("2026-09", chronic_conditions=count_only, conditions=conditions,
                        time_entries=[staff(date(2026, 9, 10))])
    d = decide(facts)
    assert ("chronic-conditions-unverified" in d.warnings) is warned
    assert ("insufficient-chronic-conditions" in d.blockers) is blocked
    assert d.billable is not blocked  # a warning: it does not block
