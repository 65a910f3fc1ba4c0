"""Edge cases of the rules document §8 and the rest of the CCM rules, one row or test each."""

from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest

from ccm_billing.domain.model import CarePlan, Consent, Month, PracticeOptions
from ccm_billing.domain.rules import ccm, ruleset_for
from ccm_billing.domain.rules.ruleset import RulesetMissing
from tests.unit.billing.facts import entry, local, month_facts

MARCH = date(2025, 3, 10)


def decide(facts, options=None):
    return ccm.decide(facts, ruleset_for(facts.month), options)


@pytest.mark.parametrize(
    ("staff_seconds", "codes"),
    [
        (1199, {}),  # 19:59 is not 20: seconds are summed, never rounded
        (1200, {"99490": 1}),
        (2399, {"99490": 1}),
        (2400, {"99490": 1, "99439": 1}),
        (41 * 60, {"99490": 1, "99439": 1}),
        (60 * 60, {"99490": 1, "99439": 2}),
        (85 * 60, {"99490": 1, "99439": 2}),  # add-on capped at two
    ],
)
def test_staff_ladder(staff_seconds, codes):
    d = decide(month_facts("2025-03", time_entries=[entry(1, "staff", staff_seconds, MARCH)]))
    assert d.codes == codes


@pytest.mark.parametrize(
    ("seconds", "codes"),
    [
        (59 * 60, {"99490": 1, "99439": 1}),  # complex documented, 59 min: falls back
        (60 * 60, {"99490": 1, "99439": 2}),  # 99490+2x99439 ($152.35) pays more than 99487
        (90 * 60, {"99487": 1, "99489": 1}),
        (120 * 60, {"99487": 1, "99489": 2}),
        (150 * 60, {"99487": 1, "99489": 3}),  # 99489 uncapped by default
    ],
)
def test_complex_ladder_takes_the_greatest_compliant_value(seconds, codes):
    d = decide(month_facts("2025-03", complexity_documented=True,
                           time_entries=[entry(1, "staff", seconds, MARCH)]))
    assert d.codes == codes
    assert not ({"99487", "99489"} & set(d.codes) and {"99490", "99439"} & set(d.codes))


def test_complex_activity_code_on_an_entry_documents_complexity():
    d = decide(month_facts("2025-03", time_entries=[entry(1, "staff", 95 * 60, MARCH, complex=True)]))
    assert d.codes == {"99487": 1, "99489": 1}


def test_physician_30_plus_staff_25_chooses_the_better_option_and_records_the_other():
    d = decide(month_facts("2025-03", time_entries=[
        entry(1, "practitioner", 30 * 60, MARCH), entry(2, "staff", 25 * 60, MARCH, hour=12)]))
    assert d.codes == {"99490": 1, "99439": 1}
    assert d.chosen.name == "staff" and d.chosen.medicare_amount == Decimal("106.42")
    assert [(a.name, a.codes) for a in d.alternatives] == [("practitioner", {"99491": 1})]
    assert d.seconds == {"staff": 1500, "practitioner": 1800}
    assert "over practitioner 99491" in d.notes[0]


def test_practitioner_35_minutes_goes_to_99491_and_never_also_to_99490():
    d = decide(month_facts("2025-03", time_entries=[entry(1, "practitioner", 35 * 60, MARCH)]))
    assert d.codes == {"99491": 1}
    assert [a.codes for a in d.alternatives] == [{"99490": 1}]


def test_practitioner_65_minutes_pays_more_as_staff_time_and_records_99491():
    # 99490 + 2x99439 = $152.35 > 99491 + 99437 = $139.74 (CY2025)
    d = decide(month_facts("2025-03", time_entries=[entry(1, "practitioner", 65 * 60, MARCH)]))
    assert d.codes == {"99490": 1, "99439": 2}
    assert [a.codes for a in d.alternatives] == [{"99491": 1, "99437": 1}]


def test_practitioner_add_on_cap_is_data():
    d = decide(month_facts("2025-03", time_entries=[entry(1, "practitioner", 120 * 60, MARCH)]))
    assert {"99491": 1, "99437": 1} in [a.codes for a in (d.chosen, *d.alternatives)]


def test_consent_mid_month_does_not_count_earlier_time():
    consent = Consent("c1", "active", local(date(2025, 3, 15), hour=9))
    d = decide(month_facts("2025-03", consent=consent, time_entries=[
        entry(1, "staff", 1500, date(2025, 3, 15), hour=8),
        entry(2, "staff", 1199, date(2025, 3, 15), hour=10)]))
    assert d.codes == {} and d.blockers == ("time-threshold-not-met",)
    assert [(n.entry_id, n.reason) for n in d.not_counted] == [("enc-1", "before-consent")]
    assert d.warnings == ("consent-after-service",)


@pytest.mark.parametrize("status", ["inactive", "draft", "proposed"])
def test_consent_revoked_mid_month_leaves_the_month_billable(status):
    """Ingest reports a granted consent set back to draft or proposed as revoked too."""
    revoked = Consent("c1", status, local(date(2024, 1, 5)), effective_until=date(2025, 3, 31))
    facts = month_facts("2025-03", consent=revoked, time_entries=[entry(1, "staff", 1300, MARCH)])
    assert decide(facts).codes == {"99490": 1}
    april = month_facts("2025-04", consent=revoked, time_entries=[entry(1, "staff", 1300, date(2025, 4, 2))])
    assert decide(april).blockers == ("consent-not-active",)


def test_consent_entered_in_error_voids_the_time():
    voided = Consent("c1", "entered-in-error", local(date(2024, 1, 5)))
    d = decide(month_facts("2025-03", consent=voided, time_entries=[entry(1, "staff", 1800, MARCH)]))
    assert d.codes == {} and d.blockers == ("consent-missing",)
    assert d.potential_codes == {"99490": 1}
    assert "entered in error" in d.notes[0]


@pytest.mark.parametrize(("status", "provision"), [("rejected", "permit"), ("draft", "permit"),
                                                   ("active", "deny")])
def test_a_consent_that_is_not_active_blocks(status, provision):
    c = Consent("c1", status, local(date(2024, 1, 5)), provision=provision)
    d = decide(month_facts("2025-03", consent=c, time_entries=[entry(1, "staff", 1800, MARCH)]))
    assert "consent-not-active" in d.blockers or "consent-missing" in d.blockers
    assert d.codes == {}


def test_fewer_than_two_chronic_conditions_blocks():
    d = decide(month_facts("2025-03", chronic_conditions=1, time_entries=[entry(1, "staff", 1800, MARCH)]))
    assert d.blockers == ("insufficient-chronic-conditions",)


@pytest.mark.parametrize("plan", [None, CarePlan("cp", "entered-in-error", created=date(2025, 1, 1)),
                                  CarePlan("cp", "revoked", created=date(2025, 1, 1)),
                                  CarePlan("cp", "active", created=date(2025, 4, 1))])
def test_no_usable_care_plan_blocks(plan):
    d = decide(month_facts("2025-03", care_plan=plan, time_entries=[entry(1, "staff", 1800, MARCH)]))
    assert d.blockers == ("care-plan-missing",)


@pytest.mark.parametrize(("completed_on", "billable"), [
    (date(2025, 3, 10), True),    # completed in the month: in place that month
    (date(2025, 2, 28), False),   # completed before it: no plan any more
    (None, True),                 # completed, day unknown (stored before billing_0017)
])
def test_a_completed_care_plan_counts_through_the_month_it_ended(completed_on, billable):
    plan = CarePlan("cp", "completed", created=date(2024, 6, 1), last_review=date(2025, 1, 5),
                    completed_on=completed_on)
    d = decide(month_facts("2025-03", care_plan=plan, time_entries=[entry(1, "staff", 1800, MARCH)]))
    assert d.blockers == (() if billable else ("care-plan-missing",))


def test_care_plan_created_on_the_last_day_counts():
    plan = CarePlan("cp", "active", created=date(2025, 3, 31))
    d = decide(month_facts("2025-03", care_plan=plan, time_entries=[entry(1, "staff", 1800, MARCH)]))
    assert d.codes == {"99490": 1}


def test_overdue_care_plan_review_is_a_warning():
    plan = CarePlan("cp", "active", created=date(2023, 1, 1), last_review=date(2024, 1, 10))
    d = decide(month_facts("2025-03", care_plan=plan, time_entries=[entry(1, "staff", 1800, MARCH)]))
    assert d.codes == {"99490": 1} and d.warnings == ("care-plan-review-overdue",)


def test_entered_in_error_and_non_clinical_time_is_not_counted():
    d = decide(month_facts("2025-03", time_entries=[
        entry(1, "staff", 1200, MARCH), entry(2, "staff", 1200, MARCH, status="entered-in-error"),
        entry(3, "non-clinical", 1200, MARCH)]))
    assert d.codes == {"99490": 1}
    assert {(n.entry_id, n.reason) for n in d.not_counted} == {
        ("enc-2", "not-finished"), ("enc-3", "non-clinical-performer")}


def test_unknown_performer_role_blocks_until_classified():
    d = decide(month_facts("2025-03", time_entries=[entry(1, "unknown", 1800, MARCH)]))
    assert "staff-role-unknown" in d.blockers and d.codes == {}


def test_duplicate_biller_blocks():
    d = decide(month_facts("2025-03", duplicate_biller=True, time_entries=[entry(1, "staff", 1800, MARCH)]))
    assert d.blockers == ("duplicate-biller",) and d.potential_codes == {"99490": 1}


def test_month_boundary_is_the_practice_local_calendar_month():
    # 2025-04-01 02:30 UTC is still March 31 in New York, but April 1 in UTC.
    at = datetime.fromisoformat("2025-04-01T02:30:00+00:00")
    from ccm_billing.domain.model import TimeEntry

    e = TimeEntry("enc-late", 1800, at, "staff")
    assert decide(month_facts("2025-03", time_entries=[e])).codes == {"99490": 1}
    april = decide(month_facts("2025-04", time_entries=[e]))
    assert april.codes == {} and april.not_counted[0].reason == "other-month"
    assert decide(month_facts("2025-04", time_entries=[e], tz="UTC")).codes == {"99490": 1}


def test_time_never_carries_over_between_months():
    d = decide(month_facts("2025-03", time_entries=[
        entry(1, "staff", 1000, date(2025, 2, 27)), entry(2, "staff", 1000, MARCH)]))
    assert d.codes == {} and d.seconds["staff"] == 1000


def test_next_threshold_in_full_minutes():
    d = decide(month_facts("2025-03", time_entries=[entry(1, "staff", 1000, MARCH)]))
    assert (d.next_threshold.code, d.next_threshold.minutes) == ("99490", 4)
    d = decide(month_facts("2025-03", time_entries=[entry(1, "staff", 3600, MARCH)]))
    assert d.next_threshold is None  # at the 99439 cap, no complexity documented


def test_date_of_service_threshold_met_or_month_end():
    entries = [entry(1, "staff", 900, date(2025, 3, 3)), entry(2, "staff", 900, date(2025, 3, 12))]
    facts = month_facts("2025-03", time_entries=entries)
    assert decide(facts).date_of_service == date(2025, 3, 31)
    met = decide(facts, PracticeOptions(date_of_service="threshold-met"))
    assert met.date_of_service == date(2025, 3, 12)


def test_backdated_entry_after_close_is_not_counted_and_warned():
    d = decide(month_facts("2025-03", time_entries=[entry(1, "staff", 1800, MARCH, late=True)]))
    assert d.codes == {} and d.warnings == ("backdated-entry",)


def test_length_period_mismatch_warning_is_carried():
    d = decide(month_facts("2025-03", time_entries=[
        entry(1, "staff", 1800, MARCH, warnings=("time-length-period-mismatch",))]))
    assert d.warnings == ("time-length-period-mismatch",)


@pytest.mark.parametrize(("month", "ruleset", "fee"), [
    ("2025-12", "CY2025", Decimal("60.49")), ("2026-01", "CY2026", Decimal("62.46")),
    ("2027-05", "CY2026", Decimal("62.46"))])
def test_fee_schedules_are_year_versioned(month, ruleset, fee):
    rs = ruleset_for(Month.parse(month))
    assert rs.name == ruleset and rs.fee("99490") == fee


def test_no_rules_before_2025():
    with pytest.raises(RulesetMissing):
        ruleset_for(Month.parse("2024-12"))


def test_month_parsing_refuses_garbage():
    for bad in ("2025-13", "2025-3", "March", "2025/03", "0000-01"):
        with pytest.raises(ValueError):
            Month.parse(bad)
    assert Month.parse("2024-02").last_day == date(2024, 2, 29)
    assert Month.parse("2025-12").next() == Month(2026, 1)
    assert date(2025, 3, 1) - timedelta(days=1) == Month.parse("2025-02").last_day


@pytest.mark.parametrize(("valid_from", "valid_until", "billable"), [
    (None, None, True),
    (date(2025, 3, 20), None, True),               # starts in the month: the month is reached
    (date(2025, 4, 1), None, False),               # not yet valid
    (None, date(2025, 3, 5), True),                # ends in the month: still billable
    (None, date(2025, 2, 28), False),              # its period ended before the month
    (date(2024, 1, 1), date(2025, 12, 31), True),
])
def test_a_consent_counts_only_for_months_its_period_reaches(valid_from, valid_until, billable):
    consent = Consent("c1", "active", local(date(2024, 1, 5)), valid_from=valid_from,
                      valid_until=valid_until)
    d = decide(month_facts("2025-03", consent=consent,
                           time_entries=[entry(1, "staff", 1300, MARCH)]))
    assert (d.codes == {"99490": 1}) is billable
    assert billable or d.blockers == ("consent-not-active",)
