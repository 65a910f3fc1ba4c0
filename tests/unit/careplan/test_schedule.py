"""The review clock and the step schedule, table-driven (pure functions, no I/O)."""

from datetime import date

import pytest

from ccm_careplan.domain.rules import DEFAULT_RULES, InvalidRules, ReviewRules, rules_from_dict
from ccm_careplan.domain.schedule import (
    Step,
    add_months,
    first_escalation,
    next_review_due,
    planned_steps,
    review_state,
    steps_owed,
)
from ccm_careplan.domain.tracker import Directory, resolve_provider

D = date(2027, 3, 1)


@pytest.mark.parametrize(("day", "months", "expected"), [
    (date(2026, 1, 31), 1, date(2026, 2, 28)),
    (date(2024, 2, 29), 12, date(2025, 2, 28)),
    (date(2026, 11, 15), 3, date(2027, 2, 15)),
    (date(2026, 3, 1), 12, date(2027, 3, 1)),
])
def test_add_months_clamps_to_the_last_day_of_the_month(day, months, expected):
    assert add_months(day, months) == expected


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


def test_a_scheduler_down_for_weeks_sends_only_the_latest_step_of_each_kind():
    today = date(2027, 3, 20)
    decisions = steps_owed(D, DEFAULT_RULES, today, {})
    sent = [(d.step.kind, d.step.step) for d in decisions if d.send]
    superseded = [(d.step.kind, d.step.step) for d in decisions if not d.send]
    assert sent == [("due", 0), ("overdue", 0), ("reminder", 5)]
    assert superseded == [("reminder", 1), ("reminder", 2), ("reminder", 3), ("reminder", 4)]


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
