"""A plan dated long ago owes years of steps at once. A CarePlan created on 0001-01-01 (FHIR allows
it, ingest accepts it, an EHR can send it by mistake) made one scheduler pass record 130,000
superseded steps; one created in 1900, 8,000. A pass records the last two years' steps one by one
and one record for everything before, and the plan shows what it would without the bound."""

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_careplan.domain import schedule
from ccm_careplan.domain.rules import DEFAULT_RULES, ReviewRules
from ccm_careplan.domain.schedule import (
    DUE,
    ESCALATED,
    OVERDUE,
    REMINDER,
    TO_RESPONSIBLE_PROVIDER,
    Step,
    add_months,
    days_after,
    planned_steps,
    steps_owed,
)
from ccm_careplan.service_layer.common import tracker_id
from tests.unit.careplan import factories as f

T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)  # 09:00 in Chicago, the practices' zone
TODAY = date(2026, 1, 5)


def unbounded(
    due: date, rules: ReviewRules, today: date, recorded: dict[tuple[str, int], date]
) -> list[tuple[Step, bool]]:
    """What a pass recorded before the bound: every owed step on its own, the latest addressed to
    each person sent (when later than anything recorded for them; on one day a notice before a
    reminder), the rest superseded."""
    owed = []
    planned = planned_steps(due, rules, today)  # the whole schedule, from the first reminder
    for audience in (TO_RESPONSIBLE_PROVIDER, {ESCALATED}):
        pending = [s for s in planned if s.kind in audience and (s.kind, s.step) not in recorded]
        if not pending:
            continue
        latest = max((on for (k, _), on in recorded.items() if k in audience), default=None)
        newest = max(pending, key=lambda s: (s.on, s.kind != REMINDER))
        owed += [(s, s is newest and (latest is None or s.on > latest)) for s in pending]
    return sorted(owed)


def most_per_pass(rules: ReviewRules) -> int:
    """The bound on what one pass records for one plan: the due and overdue notices, the
    reminders and escalations of the last ``CATCH_UP_DAYS`` (and the day that begins them), and
    one record each for the reminders and escalations before."""
    window = schedule.CATCH_UP_DAYS + 1
    reminders = len(rules.reminder_days_before_due) + window // rules.overdue_reminder_every_days
    escalations = window // rules.escalation_repeat_days if rules.escalation_repeat_days else 0
    return 2 + (reminders + 1) + (escalations + 1) + 2


def state(recorded_sent: list[tuple[str, int]]) -> tuple[int, int]:
    """What the tracker row shows of a cycle's steps: reminders sent, escalation level."""
    return (sum(1 for kind, _ in recorded_sent if kind == REMINDER),
            max((step for kind, step in recorded_sent if kind == ESCALATED), default=0))


# -- the schedule (pure) -------------------------------------------------------------------------

@pytest.mark.parametrize(("created", "skipped_reminders", "skipped_escalations"), [
    (date(1, 1, 1), 105_506, 24_617),
    (date(1900, 1, 1), 6_421, 1_497),
])
def test_one_pass_over_a_plan_created_long_ago_records_two_years_and_one_record_for_the_rest(
    created, skipped_reminders, skipped_escalations
):
    due = add_months(created, 12)
    owed = steps_owed(due, DEFAULT_RULES, TODAY, {})
    before = unbounded(due, DEFAULT_RULES, TODAY, {})
    assert len(owed) <= most_per_pass(DEFAULT_RULES) < len(before)
    # The same steps are sent: the latest reminder and escalation.
    assert [d.step for d in owed if d.send] == [s for s, send in before if send]
    # Every owed step is accounted for: by a record of its own or by the one standing for it.
    assert sum(d.stands_for for d in owed) == len(before)
    assert {d.step for d in owed} <= {s for s, _ in before}
    window_opens = TODAY - timedelta(days=schedule.CATCH_UP_DAYS)
    catch_up = [(d.step.kind, d.stands_for) for d in owed if d.stands_for > 1]
    assert catch_up == [(ESCALATED, skipped_escalations), (REMINDER, skipped_reminders)]
    assert all(not d.send and d.step.on < window_opens for d in owed if d.stands_for > 1)
    assert all(d.step.on >= window_opens for d in owed
               if d.stands_for == 1 and d.step.kind in (REMINDER, ESCALATED))


def test_a_catch_up_record_is_kept_and_a_later_pass_owes_only_what_came_due_since():
    due = date(2, 1, 1)
    recorded = {(d.step.kind, d.step.step): d.step.on
                for d in steps_owed(due, DEFAULT_RULES, TODAY, {})}
    assert steps_owed(due, DEFAULT_RULES, TODAY, recorded) == []
    week = steps_owed(due, DEFAULT_RULES, TODAY + timedelta(days=7), recorded)
    before = unbounded(due, DEFAULT_RULES, TODAY + timedelta(days=7), {
        (s.kind, s.step): s.on for s, _ in unbounded(due, DEFAULT_RULES, TODAY, {})})
    assert [(d.step, d.send, d.stands_for) for d in week] == [(s, send, 1) for s, send in before]


def test_an_escalation_only_once_and_years_old_is_sent_as_ever():
    rules = ReviewRules(escalation_repeat_days=0)
    owed = steps_owed(date(1900, 1, 1), rules, TODAY, {})
    assert [(d.step.kind, d.step.step, d.send) for d in owed if d.step.kind == ESCALATED] == [
        (ESCALATED, 1, True)]


def test_a_plan_overdue_for_less_than_the_window_records_what_it_always_did():
    due = TODAY - timedelta(days=schedule.CATCH_UP_DAYS - 31)  # its first reminder: in the window
    owed = steps_owed(due, DEFAULT_RULES, TODAY, {})
    assert [(d.step, d.send) for d in owed] == unbounded(due, DEFAULT_RULES, TODAY, {})
    assert all(d.stands_for == 1 for d in owed)


# Rules as the practice may set them (rules.py _LIMITS), reminders at most every 3 days so the
# schedule without the bound stays cheap to compute.
RULES = st.builds(
    ReviewRules,
    review_interval_months=st.integers(1, 24),
    reminder_days_before_due=st.lists(st.integers(1, 180), max_size=10, unique=True).map(
        lambda d: tuple(sorted(d, reverse=True))),
    overdue_reminder_every_days=st.integers(3, 90),
    escalate_after_days_overdue=st.integers(0, 365),
    escalate_after_reminders=st.integers(0, 100),
    escalation_repeat_days=st.integers(0, 365),
)


@settings(max_examples=150, deadline=None)
@given(created=st.dates(date(2006, 1, 1), date(2026, 1, 5)), rules=RULES,
       gaps=st.lists(st.integers(0, 900), min_size=1, max_size=4))
def test_passes_with_and_without_the_bound_send_the_same_and_account_for_every_step(
    created, rules, gaps
):
    """Any plan created in the last 20 years, any rules, a first pass today and later passes
    after gaps of up to 900 days (a scheduler down for longer than the window)."""
    due = add_months(created, rules.review_interval_months)
    bounded_recorded: dict[tuple[str, int], date] = {}
    plain_recorded: dict[tuple[str, int], date] = {}
    bounded_sent: list[tuple[str, int]] = []
    plain_sent: list[tuple[str, int]] = []
    day = TODAY
    for gap in [0, *gaps]:
        day = days_after(day, gap)
        owed = steps_owed(due, rules, day, bounded_recorded)
        before = unbounded(due, rules, day, plain_recorded)
        assert [d.step for d in owed if d.send] == [s for s, send in before if send]
        assert sum(d.stands_for for d in owed) == len(before)
        assert len(owed) <= most_per_pass(rules)
        if len(before) <= len(owed):  # nothing to bound: exactly what was recorded before
            assert [(d.step, d.send, d.stands_for) for d in owed] == [
                (s, send, 1) for s, send in before]
        bounded_recorded |= {(d.step.kind, d.step.step): d.step.on for d in owed}
        plain_recorded |= {(s.kind, s.step): s.on for s, _ in before}
        bounded_sent += [(d.step.kind, d.step.step) for d in owed if d.send]
        plain_sent += [(s.kind, s.step) for s, send in before if send]
        assert state(bounded_sent) == state(plain_sent)
        assert steps_owed(due, rules, day, bounded_recorded) == []  # a second pass: nothing


# -- the scheduler and the tracker (embedded service) ------------------------------------------

@pytest.mark.parametrize("created", ["0001-01-01", "1900-01-01"])
async def test_a_scheduler_pass_over_a_plan_created_long_ago_is_bounded_and_shows_its_state(
    careplan, created
):
    cp = careplan
    await cp.deliver(f.care_plan("alpha", "CarePlan/old", at=T0, created=created))
    first = await cp.scheduler(T0)
    assert first.sent == 2 and first.sent + first.superseded <= most_per_pass(DEFAULT_RULES)

    due = add_months(date.fromisoformat(created), 12)
    everything = planned_steps(due, DEFAULT_RULES, TODAY)  # what the pass owed, one by one
    latest = {kind: max(s.step for s in everything if s.kind == kind)
              for kind in (REMINDER, ESCALATED)}
    plan = (await cp.client.get(f"/v1/care-plans/{tracker_id('alpha', 'CarePlan/old')}",
                                headers=cp.auth())).json()
    assert plan["next_review_due"] == due.isoformat()
    assert plan["days_overdue"] == (TODAY - due).days
    assert plan["review_state"] == "escalated"
    assert (plan["reminders_sent"], plan["escalation_level"]) == (1, latest[ESCALATED])
    notes = plan["notifications"]
    assert len(notes) == first.sent + first.superseded
    assert sum(n["stands_for"] for n in notes) == len(everything)  # nothing unaccounted for
    # one message to each person: the provider's latest reminder, the supervisor's escalation
    assert sorted((n["kind"], n["step"]) for n in notes if n["sent"]) == [
        (ESCALATED, latest[ESCALATED]), (REMINDER, latest[REMINDER])]
    events = await cp.emitted()
    assert sorted((e["type"].split(".")[2], e["data"]["step"]) for e in events
                  if e["type"].startswith("careplan.review.")) == [
        (ESCALATED, latest[ESCALATED]), (REMINDER, latest[REMINDER])]

    again = await cp.scheduler(T0 + timedelta(hours=1))
    assert (again.sent, again.superseded) == (0, 0)
    week = await cp.scheduler(T0 + timedelta(days=7))  # one more reminder and an escalation
    later = planned_steps(due, DEFAULT_RULES, TODAY + timedelta(days=7))
    assert week.sent + week.superseded == len(later) - len(everything)


def listed_steps(due: date, rules: ReviewRules, until: date) -> list[Step]:
    """The steps of a cycle as the scheduler listed them before the bound: each one walked to in
    date order (what ``planned_steps`` now computes from the steps' numbers)."""
    steps = [Step(due, DUE, 0)]
    steps += [Step(d, REMINDER, i)
              for i, d in enumerate(schedule.reminder_dates(due, rules, until), 1)]
    if (overdue := schedule.days_after(due, 1)) is not None:
        steps.append(Step(overdue, OVERDUE, 0))
    escalation, level = schedule.first_escalation(due, rules), 1
    while escalation is not None and escalation <= until:
        steps.append(Step(escalation, ESCALATED, level))
        if rules.escalation_repeat_days <= 0:
            break
        level += 1
        escalation = schedule.days_after(escalation, rules.escalation_repeat_days)
    return sorted(s for s in steps if s.on <= until)


@settings(max_examples=300, deadline=None)
@given(due=st.dates(date(1990, 1, 1), date(2030, 12, 31)), rules=RULES,
       days=st.integers(-200, 2000), since_days=st.none() | st.integers(-400, 2000))
def test_steps_computed_from_their_numbers_are_the_steps_listed_one_by_one(
        due, rules, days, since_days):
    """``planned_steps`` computes reminders and escalations from their numbers (a plan from year
    1 owed 130,000 to list): the same steps, numbers and dates as walking to each in turn."""
    until = due + timedelta(days=days)
    since = date.min if since_days is None else due + timedelta(days=since_days)
    expected = [s for s in listed_steps(due, rules, until) if s.on >= since]
    assert schedule.planned_steps(due, rules, until, since) == expected
