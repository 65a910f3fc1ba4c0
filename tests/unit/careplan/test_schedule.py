"""The review clock and the step schedule, table-driven (pure functions, no I/O)."""

from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_careplan.domain.rules import DEFAULT_RULES, InvalidRules, ReviewRules, rules_from_dict
from ccm_careplan.domain.schedule import (
    DUE,
    ESCALATED,
    OVERDUE,
    REMINDER,
    Step,
    add_months,
    days_after,
    first_escalation,
    next_review_due,
    planned_steps,
    reminder_dates,
    review_state,
    steps_owed,
)
from ccm_careplan.domain.tracker import Directory, local_day, resolve_provider

D = date(2027, 3, 1)


@pytest.mark.parametrize(("day", "months", "expected"), [
    (date(2026, 1, 31), 1, date(2026, 2, 28)),
    (date(2024, 2, 29), 12, date(2025, 2, 28)),
    (date(2026, 11, 15), 3, date(2027, 2, 15)),
    (date(2026, 3, 1), 12, date(2027, 3, 1)),
])
def test_add_months_clamps_to_the_last_day_of_the_month(day, months, expected):
    assert add_months(day, months) == expected


# -- the ends of the calendar --------------------------------------------------------------------
# A plan created on 9999-12-31 (ingest accepts it) raised "year 10000 is out of range" in
# add_months: its creation event was dead-lettered and the plan never tracked. Every date the
# schedule computes stays on the calendar: what would fall after 9999-12-31 never comes.

LAST = date.max  # 9999-12-31
# The rules' extremes (rules.py _LIMITS): the shortest and the longest intervals and offsets.
TIGHT = ReviewRules(review_interval_months=1, reminder_days_before_due=(180, 1),
                    overdue_reminder_every_days=1, escalate_after_days_overdue=0,
                    escalate_after_reminders=100, escalation_repeat_days=1,
                    early_review_within_days=0)
LOOSE = ReviewRules(review_interval_months=24, reminder_days_before_due=(180,),
                    overdue_reminder_every_days=90, escalate_after_days_overdue=365,
                    escalate_after_reminders=0, escalation_repeat_days=365,
                    early_review_within_days=365)


@pytest.mark.parametrize(("anchor", "rules", "due"), [
    (LAST, DEFAULT_RULES, LAST),  # the fuzzed plan
    (date(9999, 1, 1), DEFAULT_RULES, LAST),  # 10000-01-01 is no date
    (date(9998, 12, 31), DEFAULT_RULES, LAST),  # 9999-12-31 itself
    (date(9999, 11, 30), TIGHT, date(9999, 12, 30)),
    (date(9999, 12, 1), TIGHT, LAST),
    (LAST, TIGHT, LAST),
    (date(9998, 1, 1), LOOSE, LAST),
    (date(9997, 12, 31), LOOSE, LAST),
    (date.min, DEFAULT_RULES, date(2, 1, 1)),
    (date.min, TIGHT, date(1, 2, 1)),
])
def test_a_review_due_past_the_calendar_is_due_on_its_last_day(anchor, rules, due):
    assert next_review_due(anchor=anchor, early_trigger=None, rules=rules) == due


@pytest.mark.parametrize(("anchor", "trigger", "due"), [
    (date(9999, 6, 1), date(9999, 7, 1), date(9999, 7, 31)),  # brought forward: a real day
    (date(9999, 6, 1), date(9999, 12, 15), LAST),  # 30 days after it: past the calendar
    (date(9999, 6, 1), LAST, LAST),
])
def test_a_clinical_change_near_the_end_of_the_calendar(anchor, trigger, due):
    assert next_review_due(anchor=anchor, early_trigger=trigger, rules=DEFAULT_RULES) == due


def test_a_review_due_on_the_last_day_is_reminded_before_and_never_overdue():
    steps = planned_steps(LAST, DEFAULT_RULES, LAST)
    assert [(s.kind, s.step, (LAST - s.on).days) for s in steps] == [
        (REMINDER, 1, 30), (REMINDER, 2, 14), (REMINDER, 3, 7), (DUE, 0, 0)]
    assert first_escalation(LAST, DEFAULT_RULES) is None
    assert [d.step.kind for d in steps_owed(LAST, DEFAULT_RULES, LAST, {}) if d.send] == [DUE]


def test_steps_past_the_last_day_are_left_out_and_those_before_it_kept():
    due = date(9999, 12, 1)
    steps = planned_steps(due, DEFAULT_RULES, LAST)
    assert (OVERDUE, 0, date(9999, 12, 2)) in [(s.kind, s.step, s.on) for s in steps]
    assert [s.on.day for s in steps if s.kind == REMINDER][-4:] == [8, 15, 22, 29]
    assert not [s for s in steps if s.kind == ESCALATED]  # due + 31 days: past the calendar
    assert first_escalation(due, DEFAULT_RULES) is None
    tight_due = date(9999, 12, 29)  # escalation every day from the day after due
    assert [s.on for s in planned_steps(tight_due, TIGHT, LAST) if s.kind == ESCALATED] == [
        date(9999, 12, 30), LAST]


def test_reminders_before_the_first_day_of_the_calendar_fall_on_it():
    assert reminder_dates(date(1, 2, 1), TIGHT, date(1, 2, 1)) == [date.min, date(1, 1, 31)]


def test_a_day_after_the_last_is_none():
    assert days_after(LAST, 0) == LAST
    assert days_after(LAST, 1) is None
    assert days_after(date(9999, 12, 30), 1) == LAST
    assert add_months(date(9999, 12, 31), 1) is None


# Any day, drawn as often from the calendar's first and last years as from the rest of it.
DAYS = st.dates() | st.dates(min_value=date(9997, 1, 1)) | st.dates(max_value=date(3, 12, 31))


@settings(max_examples=300, deadline=None)
@given(anchor=DAYS, trigger=st.none() | DAYS,
       interval=st.integers(1, 24), offsets=st.lists(st.integers(1, 180), max_size=10,
                                                     unique=True),
       every=st.integers(1, 90), after_days=st.integers(0, 365),
       after_reminders=st.integers(0, 100), repeat=st.integers(0, 365),
       within=st.integers(0, 365), ahead=st.integers(0, 400))
def test_any_day_of_the_calendar_and_any_rules_give_a_schedule(
    anchor, trigger, interval, offsets, every, after_days, after_reminders, repeat, within, ahead
):
    rules = ReviewRules(interval, tuple(sorted(offsets, reverse=True)), every, after_days,
                        after_reminders, repeat, within)
    due = next_review_due(anchor=anchor, early_trigger=trigger, rules=rules)
    assert due >= anchor
    today = days_after(due, ahead) or LAST
    steps = planned_steps(due, rules, today)
    assert steps == sorted(steps) and all(s.on <= today for s in steps)
    assert Step(due, DUE, 0) in steps
    escalation = first_escalation(due, rules)
    assert escalation is None or escalation > due
    assert (due == LAST) <= (escalation is None)
    owed = steps_owed(due, rules, today, {})
    assert {d.step for d in owed} == set(steps)


@pytest.mark.parametrize(("instant", "zone", "day"), [
    ("0001-01-01T00:00:00+00:00", "America/Chicago", date.min),  # 0000-12-31 in Chicago
    ("9999-12-31T23:00:00+00:00", "Asia/Tokyo", LAST),  # 10000-01-01 in Tokyo
    ("9999-12-31T23:00:00+00:00", "America/Chicago", LAST),
    ("2026-01-05T03:00:00+00:00", "America/Chicago", date(2026, 1, 4)),
])
def test_the_local_day_of_an_instant_at_the_ends_of_the_calendar(instant, zone, day):
    assert local_day(datetime.fromisoformat(instant), ZoneInfo(zone)) == day


@pytest.mark.parametrize(("anchor", "trigger", "expected"), [
    (date(2026, 3, 1), None, date(2027, 3, 1)),
    (date(2026, 3, 1), date(2026, 6, 1), date(2026, 7, 1)),
    (date(2026, 3, 1), date(2026, 3, 1), date(2027, 3, 1)),  # same day as the review: no
    (date(2026, 3, 1), date(2027, 2, 20), date(2027, 3, 1)),  # annual due comes first
    (date(2026, 3, 1), date(2026, 2, 1), date(2027, 3, 1)),  # before the review: ignored
])
def test_a_clinical_change_brings_the_review_forward(anchor, trigger, expected):
    assert next_review_due(anchor=anchor, early_trigger=trigger, rules=DEFAULT_RULES) == expected


def test_default_schedule_up_to_the_first_escalation():
    steps = planned_steps(D, DEFAULT_RULES, date(2027, 4, 1))
    assert [(s.kind, s.step, (s.on - D).days) for s in steps] == [
        ("reminder", 1, -30), ("reminder", 2, -14), ("reminder", 3, -7), ("due", 0, 0),
        ("overdue", 0, 1), ("reminder", 4, 7), ("reminder", 5, 14), ("reminder", 6, 21),
        ("reminder", 7, 28), ("escalated", 1, 31),
    ]


@pytest.mark.parametrize(("changes", "days_after_due"), [
    ({}, 31),  # more than 30 days overdue
    ({"escalate_after_reminders": 5}, 14),  # the 5th reminder is the 2nd weekly one
    ({"escalate_after_reminders": 1}, 1),  # never before the review is overdue
    ({"escalate_after_reminders": 0, "escalate_after_days_overdue": 0}, 1),
    ({"escalate_after_reminders": 0, "escalate_after_days_overdue": 60}, 61),
])
def test_first_escalation_is_the_earlier_of_days_overdue_and_reminder_count(
    changes, days_after_due
):
    rules = ReviewRules(**changes)
    assert (first_escalation(D, rules) - D).days == days_after_due


def test_escalation_repeats_until_reviewed_and_reminders_never_stop():
    steps = planned_steps(D, DEFAULT_RULES, date(2027, 6, 1))
    assert [(s.on - D).days for s in steps if s.kind == "escalated"] == [31, 61, 91]
    assert max(s.step for s in steps if s.kind == "reminder") == 3 + 13  # weekly until day 91


def test_a_scheduler_down_for_weeks_sends_each_person_only_the_latest_step():
    # Three emails at once to the provider about one overdue review (due, overdue and the
    # latest reminder, each "overdue by 19 days") was what a plan pushed late, or a scheduler
    # back after weeks, sent: the provider now gets the latest, the supervisor an escalation.
    today = date(2027, 4, 10)
    decisions = steps_owed(D, DEFAULT_RULES, today, {})
    sent = [(d.step.kind, d.step.step) for d in decisions if d.send]
    superseded = [(d.step.kind, d.step.step) for d in decisions if not d.send]
    assert sent == [("escalated", 1), ("reminder", 8)]
    assert superseded == [("reminder", 1), ("reminder", 2), ("reminder", 3), ("due", 0),
                          ("overdue", 0), ("reminder", 4), ("reminder", 5), ("reminder", 6),
                          ("reminder", 7)]


@pytest.mark.parametrize(("today", "recorded", "sent"), [
    # on the due day the due notice, not the reminder of that morning (none falls on it)
    (date(2027, 3, 1), {("reminder", 3): date(2027, 2, 22)}, [("due", 0)]),
    # the day after: the overdue notice
    (date(2027, 3, 2), {("reminder", 3): date(2027, 2, 22), ("due", 0): D}, [("overdue", 0)]),
    # a week overdue: the reminder
    (date(2027, 3, 8), {("reminder", 3): date(2027, 2, 22), ("due", 0): D,
                        ("overdue", 0): date(2027, 3, 2)}, [("reminder", 4)]),
])
def test_a_scheduler_running_daily_sends_every_step_on_its_day(today, recorded, sent):
    decisions = steps_owed(D, DEFAULT_RULES, today, recorded)
    assert [(d.step.kind, d.step.step) for d in decisions if d.send] == sent
    assert all(d.send for d in decisions)


def test_on_a_day_with_an_overdue_notice_and_a_reminder_the_notice_is_sent():
    daily = ReviewRules(overdue_reminder_every_days=1)
    recorded = {("reminder", 1): date(2027, 1, 30), ("reminder", 2): date(2027, 2, 15),
                ("reminder", 3): date(2027, 2, 22), ("due", 0): D}
    decisions = steps_owed(D, daily, date(2027, 3, 2), recorded)
    assert [(d.step.kind, d.step.step, d.send) for d in decisions] == [
        ("overdue", 0, True), ("reminder", 4, False)]


def test_nothing_is_owed_twice():
    today = date(2027, 3, 20)
    recorded = {(d.step.kind, d.step.step): d.step.on for d in steps_owed(D, DEFAULT_RULES,
                                                                          today, {})}
    assert steps_owed(D, DEFAULT_RULES, today, recorded) == []


def test_after_a_rule_change_an_older_reminder_is_not_sent_late():
    # Reminder 2 (14 days before) was sent; the practice adds a 21-day reminder afterwards.
    recorded = {("reminder", 1): date(2027, 1, 30),
                ("reminder", 2): date(2027, 2, 15)}
    rules = ReviewRules(reminder_days_before_due=(30, 21, 14, 7))
    decisions = steps_owed(D, rules, date(2027, 2, 16), recorded)
    assert [(d.step.kind, d.step.step, d.send) for d in decisions] == [("reminder", 3, False)]


@pytest.mark.parametrize(("today", "level", "state"), [
    (date(2027, 1, 1), 0, "current"),
    (date(2027, 1, 30), 0, "due"),
    (date(2027, 3, 1), 0, "due"),
    (date(2027, 3, 2), 0, "overdue"),
    (date(2027, 4, 2), 1, "escalated"),
])
def test_review_state(today, level, state):
    assert review_state(next_due=D, today=today, rules=DEFAULT_RULES, escalation_level=level,
                        scheduled=True) == state


def test_unscheduled_plans_are_inactive():
    assert review_state(next_due=D, today=date(2027, 9, 1), rules=DEFAULT_RULES,
                        escalation_level=0, scheduled=False) == "inactive"


@pytest.mark.parametrize(("data", "problem"), [
    ({"review_interval_months": 0}, "review_interval_months"),
    ({"reminder_days_before_due": [30, 30]}, "distinct"),
    ({"reminder_days_before_due": [0]}, "1 to 180"),
    ({"overdue_reminder_every_days": 0}, "overdue_reminder_every_days"),
    ({"clinical_supervisor": "Patient/x"}, "clinical_supervisor"),
    ({"review_interval_months": "3"}, "review_interval_months"),
    ({"escalate_after_reminders": True}, "escalate_after_reminders"),
    ({"reminder_days_before_due": [True, 7]}, "1 to 180"),
    ({"reminder_days_before_due": ["30", 7]}, "1 to 180"),
    ({"reminder_days_before_due": 30}, "list"),
    ({"reminder_days_before_due": "30"}, "list"),
    ({"early_review_on_plan_revision": "yes"}, "early_review_on_plan_revision"),
    ({"early_review_on_new_chronic_condition": 1}, "early_review_on_new_chronic_condition"),
])
def test_unusable_rules_are_refused_with_the_field_named(data, problem):
    with pytest.raises(InvalidRules, match=problem):
        rules_from_dict(data)


def test_stored_rules_fill_missing_fields_with_defaults():
    rules = rules_from_dict({"reminder_days_before_due": [7, 30]})
    assert rules.reminder_days_before_due == (30, 7)
    assert rules.review_interval_months == DEFAULT_RULES.review_interval_months


@pytest.mark.parametrize(("author", "gps", "directory", "expected"), [
    ("Practitioner/a", [], {}, "Practitioner/a"),
    (None, ["Practitioner/gp"], {}, "Practitioner/gp"),
    ("Practitioner/a", ["Practitioner/gp"], {"Practitioner/a": Directory(None, False)},
     "Practitioner/gp"),
    ("PractitionerRole/r", [], {"PractitionerRole/r": Directory("Practitioner/p", True)},
     "Practitioner/p"),
    ("Organization/o", [], {}, None),
])
def test_responsible_provider(author, gps, directory, expected):
    assert resolve_provider(author, gps, directory) == expected


def test_steps_sort_by_date():
    assert sorted([Step(D, "reminder", 2), Step(date(2027, 1, 1), "due", 0)])[0].kind == "due"
