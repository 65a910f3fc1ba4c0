"""Whose practitioner time counts (rules §1, §2): 99491/99437 are the billing practitioner's
personal time, and only their time (or clinical staff's) counts toward any code. A practitioner
role says what a performer is, not who: another physician's time never bills under the
month's billing practitioner, alone or summed with theirs."""

from dataclasses import replace
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_billing.domain.model import Consent
from ccm_billing.domain.rules import ccm, ruleset_for
from tests.unit.billing.facts import entry, local, month_facts

HART, HART_ROLE = "Practitioner/dr-hart", "PractitionerRole/role-hart"
COLE, COLE_ROLE = "Practitioner/dr-cole", "PractitionerRole/role-cole"
LOCUM_ROLE = "PractitionerRole/locum"  # a role whose Practitioner billing does not know
# Who performed an entry, named every way billing's facts name them (decisions.aliases): by
# the role, the role's Practitioner, and that Practitioner's roles.
BY = {"hart": frozenset({HART, HART_ROLE}), "cole": frozenset({COLE, COLE_ROLE}),
      "locum": frozenset({LOCUM_ROLE}), "nobody": frozenset()}
MARCH = date(2025, 3, 10)


def facts(named, time, *, other_consent=None):
    """March 2025; the consent names ``named`` (None: no one); ``time``: (role, minutes, who)."""
    entries = [entry(n, role, minutes * 60, MARCH, hour=8 + n, performers=BY[who])
               for n, (role, minutes, who) in enumerate(time)]
    consent = Consent("c1", "active", local(date(2024, 12, 1)), practitioner=named)
    return replace(month_facts("2025-03", consent=consent, time_entries=entries),
                   billing_practitioner=other_consent or named)


def decide(f):
    return ccm.decide(f, ruleset_for(f.month))


@pytest.mark.parametrize(
    ("case", "named", "time", "codes", "practitioner_minutes", "not_counted", "warning", "biller"),
    [
        ("the consent's physician, 35 min: 99491", HART,
         [("practitioner", 35, "hart")], {"99491": 1}, 35, [], None, HART),
        ("another physician's 35 min bill nothing under the consent's", HART,
         [("practitioner", 35, "cole")], {}, 0, ["other-practitioner"],
         "other-practitioner-time", HART),
        ("another physician's time is not staff time either", HART,
         [("practitioner", 30, "cole"), ("staff", 15, "nobody")], {}, 0,
         ["other-practitioner"], "other-practitioner-time", HART),
        ("never summed with the billing practitioner's: 30 + 30 is 99491, not 99490+2x99439",
         HART, [("practitioner", 30, "hart"), ("practitioner", 30, "cole")], {"99491": 1}, 30,
         ["other-practitioner"], "other-practitioner-time", HART),
        ("a consent naming the PractitionerRole: its Practitioner's time counts", HART_ROLE,
         [("practitioner", 35, "hart")], {"99491": 1}, 35, [], None, HART_ROLE),
        ("a role whose Practitioner is unknown is not the billing practitioner", HART,
         [("practitioner", 35, "locum")], {}, 0, ["other-practitioner"],
         "other-practitioner-time", HART),
        ("clinical staff's time counts whoever performed it", HART,
         [("staff", 25, "nobody")], {"99490": 1}, 0, [], None, HART),
        ("nobody named, one physician: theirs, billed under them", None,
         [("practitioner", 30, "cole"), ("practitioner", 5, "cole")], {"99491": 1}, 35, [],
         None, COLE),
        ("nobody named, two physicians: whose would bill cannot be told, none counts", None,
         [("practitioner", 35, "hart"), ("practitioner", 35, "cole")], {}, 0,
         ["billing-practitioner-unknown"] * 2, "billing-practitioner-unknown", None),
        ("nobody named, two physicians: staff time still bills", None,
         [("practitioner", 20, "hart"), ("practitioner", 20, "cole"), ("staff", 25, "nobody")],
         {"99490": 1}, 0, ["billing-practitioner-unknown"] * 2,
         "billing-practitioner-unknown", None),
    ],
)
def test_only_the_billing_practitioners_own_time_counts(case, named, time, codes,
                                                        practitioner_minutes, not_counted,
                                                        warning, biller):
    d = decide(facts(named, time))
    assert d.codes == codes, case
    assert d.seconds["practitioner"] == practitioner_minutes * 60, case
    assert [n.reason for n in d.not_counted] == not_counted, case
    foreign = {"other-practitioner-time", "billing-practitioner-unknown"}
    assert foreign & set(d.warnings) == ({warning} if warning else set()), case
    assert d.practitioner == biller, case
    if warning:  # a warning, not a blocker: the rest of the month bills as it may
        assert not foreign & set(d.blockers), case


def test_the_patients_other_consent_names_the_biller_when_the_billing_one_names_none():
    """The ChargeItem's performer is the practitioner whose time may count: the same name."""
    d = decide(facts(None, [("practitioner", 35, "cole")], other_consent=HART))
    assert d.practitioner == HART and d.codes == {}
    assert [n.reason for n in d.not_counted] == ["other-practitioner"]


def test_the_explanation_names_the_reason_and_the_warning():
    doc = decide(facts(HART, [("practitioner", 35, "cole")])).to_dict()
    assert doc["notCounted"] == [{"entry": "Encounter/enc-0", "seconds": 2100,
                                  "reason": "other-practitioner"}]
    assert doc["warnings"] == ["other-practitioner-time"]
    assert doc["blockers"] == ["time-threshold-not-met"] and doc["practitioner"] == HART


PEOPLE = st.sampled_from(sorted(BY))
TIME = st.lists(st.tuples(st.sampled_from(["staff", "practitioner"]),
                          st.integers(min_value=1, max_value=70), PEOPLE), max_size=6)


@settings(max_examples=300, deadline=None)
@given(named=st.sampled_from([None, HART, HART_ROLE, COLE]), time=TIME)
def test_counted_practitioner_time_is_always_the_billers_and_one_persons(named, time):
    d = decide(facts(named, time))
    by_id = {e.entry_id: e for e in facts(named, time).entries}
    counted = [by_id[i] for i in d.counted if by_id[i].role == "practitioner"]
    assert d.seconds["practitioner"] == sum(e.seconds for e in counted)
    # Never two physicians' time in one decision, never time billed under someone else.
    assert len({e.performer for e in counted}) <= 1
    if d.practitioner is not None:
        assert all(d.practitioner in e.performers for e in counted)
    else:
        assert all(not e.performers for e in counted)
    # Every practitioner entry is counted or says why not.
    reasons = {n.entry_id: n.reason for n in d.not_counted}
    for e in by_id.values():
        if e.role == "practitioner" and e.entry_id not in d.counted:
            assert reasons[e.entry_id] in {"other-practitioner", "billing-practitioner-unknown"}
