"""The worklist's next threshold: the nearest one that would raise the month's best amount
(the decision bills the compliant option of greatest value, rules §2), and its option."""

from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_billing.domain.rules import ccm, ruleset_for
from tests.unit.billing.facts import entry, month_facts

MARCH = date(2025, 3, 10)


def facts(staff_s: int, practitioner_s: int, *, complex_=False, extra=()):
    time = [entry(1, "staff", staff_s, MARCH, hour=9), entry(2, "practitioner", practitioner_s,
                                                             MARCH, hour=11), *extra]
    return month_facts("2025-03", time_entries=[e for e in time if e.seconds],
                       complexity_documented=complex_)


def decide(f):
    return ccm.decide(f, ruleset_for(f.month))


@pytest.mark.parametrize(
    ("case", "staff", "practitioner", "complex_", "expected"),
    [
        ("physician 35 min: 99439 in 5 (as staff time) pays more than 99437 in 25", 0, 35,
         False, ("99439", 5, "staff")),
        ("physician 30 min: 99439 in 10", 0, 30, False, ("99439", 10, "staff")),
        ("physician 25 min: 99491 in 5 beats 99439 in 15", 0, 25, False,
         ("99491", 5, "practitioner")),
        ("nothing yet: 99490 in 20", 0, 0, False, ("99490", 20, "staff")),
        ("staff 16:40: 99490 in 4 full minutes", 1000 / 60, 0, False, ("99490", 4, "staff")),
        ("physician 30 + staff 25: 99439 (second unit) in 5", 25, 30, False,
         ("99439", 5, "staff")),
        ("physician 65 min: 99437 would pay less than 99490+2x99439 already does", 0, 65,
         False, None),
        ("staff at the 99439 cap, no complexity: nothing pays more", 60, 0, False, None),
        ("complex 59 min: 99439 and 99487 both in 1, 99439's option pays more", 59, 0, True,
         ("99439", 1, "staff")),
        ("complex 85 min: 99489 in 5 (99487 at 60 paid less than the staff cap)", 85, 0, True,
         ("99489", 5, "complex")),
        ("complex 95 min: the next 99489 in 25", 95, 0, True, ("99489", 25, "complex")),
    ],
)
def test_next_threshold_is_the_nearest_that_raises_the_best_amount(case, staff, practitioner,
                                                                   complex_, expected):
    d = decide(facts(int(staff * 60), practitioner * 60, complex_=complex_))
    nxt = d.next_threshold
    assert ((nxt.code, nxt.minutes, nxt.option) if nxt else None) == expected, case
    if nxt:
        assert d.to_dict()["nextThreshold"] == {"code": nxt.code, "minutes": nxt.minutes,
                                                "option": nxt.option}


def best(d) -> object:
    return d.chosen.medicare_amount if d.chosen else 0


def more(staff_s, practitioner_s, complex_, role, seconds):
    """The same month with ``seconds`` more of ``role`` time."""
    extra = (entry(3, role, seconds, MARCH, hour=13),) if seconds else ()
    return decide(facts(staff_s, practitioner_s, complex_=complex_, extra=extra))


@settings(max_examples=300, deadline=None)
@given(staff_s=st.integers(0, 150 * 60), practitioner_s=st.integers(0, 100 * 60),
       complex_=st.booleans())
def test_the_next_threshold_is_reached_by_its_minutes_and_nothing_nearer_pays_more(
        staff_s, practitioner_s, complex_):
    d = decide(facts(staff_s, practitioner_s, complex_=complex_))
    nxt = d.next_threshold
    if nxt is None:  # no further time of any kind pays more
        for role in ("staff", "practitioner"):
            assert best(more(staff_s, practitioner_s, complex_, role, 180 * 60)) <= best(d)
        return
    # Its minutes of its option's kind of time raise the best amount …
    role = "practitioner" if nxt.option == "practitioner" else "staff"
    assert best(more(staff_s, practitioner_s, complex_, role, nxt.minutes * 60)) > best(d)
    # … and a minute less of any kind (the practitioner's counts toward every option) does not.
    for role in ("staff", "practitioner"):
        shorter = more(staff_s, practitioner_s, complex_, role, (nxt.minutes - 1) * 60)
        assert best(shorter) == best(d)
