"""G0506 needs no time (rules §1: threshold none, once per patient ever, with the initiating
visit's date): the month containing the initiating visit bills it when that month's other
prerequisites hold, even when no time code reaches its threshold."""

from datetime import date

import pytest

from ccm_billing.domain.model import CarePlan, PracticeOptions
from ccm_billing.domain.rules import ccm, ruleset_for
from ccm_billing.service_layer.charges import priced_lines
from ccm_billing.service_layer.common import PracticeInfo
from tests.unit.billing.test_initiating_visit import (
    CONSENTED,
    DR,
    OTHER,
    SECOND_EPISODE,
    consent,
    facts,
    visit,
)

WITH_VISIT = [visit("v1", CONSENTED)]


def decide(f, options=None):
    return ccm.decide(f, ruleset_for(f.month), options)


@pytest.mark.parametrize(
    ("case", "month", "visits", "kw", "codes", "potential", "blockers"),
    [
        ("10 minutes in the visit's month: G0506 alone", "2025-03", WITH_VISIT,
         {"minutes": 10}, {"G0506": 1}, {"G0506": 1}, ()),
        ("no time at all in the visit's month: G0506 alone", "2025-03", WITH_VISIT,
         {"minutes": 0}, {"G0506": 1}, {"G0506": 1}, ()),
        ("time reached: G0506 with the time codes, as before", "2025-03", WITH_VISIT,
         {"minutes": 25}, {"99490": 1, "G0506": 1}, {"99490": 1, "G0506": 1}, ()),
        ("no care plan: blocked, G0506 shown as potential", "2025-03", WITH_VISIT,
         {"minutes": 10, "care_plan": None}, {}, {"G0506": 1}, ("care-plan-missing",)),
        ("a care plan created after the month: blocked", "2025-03", WITH_VISIT,
         {"minutes": 10, "care_plan": CarePlan("cp", "active", created=date(2025, 4, 2))},
         {}, {"G0506": 1}, ("care-plan-missing",)),
        ("one chronic condition: blocked", "2025-03", WITH_VISIT,
         {"minutes": 10, "chronic_conditions": 1}, {}, {"G0506": 1},
         ("insufficient-chronic-conditions",)),
        ("another practice bills the patient: blocked", "2025-03", WITH_VISIT,
         {"minutes": 10, "duplicate_biller": True}, {}, {"G0506": 1}, ("duplicate-biller",)),
        ("the visit by another practitioner initiates nothing", "2025-03",
         [visit("v1", CONSENTED, OTHER)], {"minutes": 10}, {}, {},
         ("time-threshold-not-met",)),
        ("the month after the visit: no G0506, time short", "2025-04", WITH_VISIT,
         {"minutes": 10}, {}, {}, ("time-threshold-not-met",)),
        ("a second episode never bills G0506 again", "2025-03",
         [visit("v0", date(2024, 1, 5)), visit("v1", CONSENTED)],
         {"minutes": 10, "consents": SECOND_EPISODE}, {}, {}, ("time-threshold-not-met",)),
        ("an undated consent anchors no initiation", "2025-03", [visit("v1", date(2025, 3, 4))],
         {"minutes": 10, "consents": (consent(day=None),)}, {}, {},
         ("time-threshold-not-met",)),
        ("G0506 billed before the facts begin", "2025-03", WITH_VISIT,
         {"minutes": 10, "initiation_billed_before": True}, {}, {},
         ("time-threshold-not-met",)),
    ],
)
def test_g0506_in_the_visits_month_needs_its_prerequisites_not_time(case, month, visits, kw,
                                                                     codes, potential, blockers):
    d = decide(facts(month, visits, **kw))
    assert d.codes == codes, case
    assert d.potential_codes == potential, case
    assert d.blockers == blockers, case
    # Short of every time code while billing G0506: said as a warning, not a blocker.
    short = d.chosen is None and "G0506" in potential
    assert ("time-threshold-not-met" in d.warnings) == short, case


def test_a_month_billing_g0506_alone_explains_itself():
    d = decide(facts("2025-03", WITH_VISIT, minutes=10))
    assert d.billable and d.chosen is None and d.practitioner == DR
    assert d.date_of_service == CONSENTED  # the initiating visit's day
    assert (d.next_threshold.code, d.next_threshold.minutes) == ("99490", 10)
    assert "G0506 billed with the initiating visit of 2025-03-02" in d.notes
    assert "no time code reached its threshold: G0506 is the month's only code" in d.notes
    assert d.warnings == ("time-threshold-not-met",)


def test_a_practice_blocking_on_a_missing_visit_still_bills_g0506_with_one():
    d = decide(facts("2025-03", WITH_VISIT, minutes=10),
               PracticeOptions(initiating_visit_missing="blocker"))
    assert d.codes == {"G0506": 1}


def test_its_only_line_is_dated_and_supported_by_the_visit():
    d = decide(facts("2025-03", WITH_VISIT, minutes=10))
    info = PracticeInfo(id="prac-1", name="P", timezone="America/New_York",
                        pricing={"model": "flat-per-patient", "flat_fee": "40.00"})
    (line,) = priced_lines(info, d.month, [d])
    assert (line.code, line.units, line.day, line.encounters) == ("G0506", 1, CONSENTED, ("v1",))
    assert str(line.amount) == "40.00" and line.practitioner == DR
