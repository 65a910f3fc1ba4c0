"""The initiating visit (rules document §3.4) and G0506 (§1): which visit initiated the CCM a
month bills under, the missing-visit warning or blocker, and G0506 once, with that visit."""

import json
from dataclasses import replace
from datetime import date

import pytest

from ccm_billing.domain.model import Consent, PracticeOptions, Visit
from ccm_billing.domain.rules import ccm, ruleset_for
from ccm_billing.service_layer.charges import charge_item_stub, priced_lines
from ccm_billing.service_layer.common import PracticeInfo
from tests.unit.billing.facts import entry, local, month_facts

DR = "Practitioner/dr-1"
OTHER = "Practitioner/dr-2"
CONSENTED = date(2025, 3, 2)  # the consent of every row but the second-episode ones


def visit(vid: str, day: date, *who: str, status: str = "finished") -> Visit:
    return Visit(vid, day, frozenset(who or (DR,)), status)


def consent(cid: str = "c1", day: date | None = CONSENTED, **kw) -> Consent:
    return Consent(cid, kw.pop("status", "active"), local(day, 9) if day else None,
                   practitioner=kw.pop("practitioner", DR), **kw)


def facts(month: str, visits=(), *, consents=None, practitioner=DR, minutes=30, **extra):
    """The month's facts; ``practitioner`` is the consent's billing practitioner."""
    tenth = date(int(month[:4]), int(month[5:]), 10)
    return replace(
        month_facts(month, time_entries=[entry(1, "staff", minutes * 60, tenth)], **extra),
        consents=consents or (consent(practitioner=practitioner),), visits=tuple(visits),
        initiating_visit_tracked=True, billing_practitioner=practitioner,
    )


def decide(f, options=None):
    return ccm.decide(f, ruleset_for(f.month), options)


SECOND_EPISODE = (
    consent("c0", date(2024, 1, 5), status="inactive", effective_until=date(2024, 6, 30)),
    consent("c1", date(2025, 3, 2)),
)


@pytest.mark.parametrize(
    ("case", "month", "visits", "kw", "initiating", "codes"),
    [
        ("no visit on file", "2025-03", [], {}, None, {"99490": 1}),
        ("visit the day of consent: G0506 that month", "2025-03",
         [visit("v1", CONSENTED)], {}, "v1", {"99490": 1, "G0506": 1}),
        ("visit within 12 months before consent", "2025-03",
         [visit("v1", date(2024, 3, 2))], {}, "v1", {"99490": 1}),
        ("visit 12 months and a day before consent", "2025-03",
         [visit("v1", date(2024, 3, 1))], {}, None, {"99490": 1}),
        ("visit after the consent initiates nothing", "2025-03",
         [visit("v1", date(2025, 3, 5))], {}, None, {"99490": 1}),
        ("visit by another practitioner", "2025-03",
         [visit("v1", CONSENTED, OTHER)], {}, None, {"99490": 1}),
        ("no billing practitioner known: anyone's visit", "2025-03",
         [visit("v1", CONSENTED, OTHER)], {"practitioner": None}, "v1", {"99490": 1, "G0506": 1}),
        ("visit entered in error", "2025-03",
         [visit("v1", CONSENTED, status="entered-in-error")], {}, None, {"99490": 1}),
        ("the latest qualifying visit", "2025-03",
         [visit("v1", date(2024, 11, 5)), visit("v2", date(2025, 2, 20)),
          visit("v3", date(2025, 3, 9))], {}, "v2", {"99490": 1}),
        ("a later month keeps the visit, bills no G0506", "2025-06",
         [visit("v1", CONSENTED)], {}, "v1", {"99490": 1}),
        ("a later month keeps the visit, however long after", "2026-09",
         [visit("v1", CONSENTED)], {}, "v1", {"99490": 1}),
        ("second episode: its own visit, G0506 never again", "2025-03",
         [visit("v0", date(2024, 1, 5)), visit("v1", CONSENTED)],
         {"consents": SECOND_EPISODE}, "v1", {"99490": 1}),
        ("a second episode after a consent set back to draft: no G0506 again", "2025-03",
         [visit("v1", CONSENTED)],
         {"consents": (replace(SECOND_EPISODE[0], status="draft"), SECOND_EPISODE[1])}, "v1",
         {"99490": 1}),
        ("G0506 billed before the facts begin", "2025-03",
         [visit("v1", CONSENTED)], {"initiation_billed_before": True}, "v1", {"99490": 1}),
        ("G0506 needs no time: billed alone when no time code is reached", "2025-03",
         [visit("v1", CONSENTED)], {"minutes": 19}, "v1", {"G0506": 1}),
        ("the billing consent's practitioner, not another consent's", "2025-03",
         [visit("v1", CONSENTED, DR), visit("v2", CONSENTED, OTHER)],
         {"consents": (consent(), consent("c2", date(2025, 3, 5), practitioner=OTHER))},
         "v1", {"99490": 1, "G0506": 1}),
        ("a revoked consent still in force keeps its practitioner", "2025-03",
         [visit("v1", date(2025, 2, 20), DR), visit("v2", date(2025, 3, 1), OTHER)],
         {"consents": (consent(status="inactive", effective_until=date(2025, 3, 31)),)},
         "v1", {"99490": 1}),
        ("an undated consent: checked to the month's end, never G0506", "2025-03",
         [visit("v1", date(2025, 3, 4))], {"consents": (consent(day=None),)},
         "v1", {"99490": 1}),
        ("an undated consent: the next month bills no G0506 either", "2025-04",
         [visit("v1", date(2025, 3, 4)), visit("v2", date(2025, 4, 8))],
         {"consents": (consent(day=None),)}, "v2", {"99490": 1}),
    ],
)
def test_initiating_visit_and_g0506(case, month, visits, kw, initiating, codes):
    decision = decide(facts(month, visits, **kw))
    found = decision.initiating_visit
    assert (found.visit_id if found else None) == initiating, case
    assert decision.codes == codes, case
    missing = "initiating-visit-missing" in decision.warnings
    assert missing == (initiating is None), case
    if initiating:
        assert f"initiating visit Encounter/{initiating} of {found.day}" in decision.notes
        assert decision.to_dict()["initiatingVisit"] == {
            "encounter": f"Encounter/{initiating}", "date": found.day.isoformat()}
    else:
        assert decision.to_dict()["initiatingVisit"] is None


def test_a_practice_can_make_the_missing_visit_a_blocker():
    f = facts("2025-03", [])
    blocked = decide(f, PracticeOptions(initiating_visit_missing="blocker"))
    assert blocked.blockers == ("initiating-visit-missing",)
    assert blocked.codes == {} and blocked.potential_codes == {"99490": 1}
    assert "initiating-visit-missing" not in blocked.warnings


def test_untracked_visits_are_not_checked():
    f = month_facts("2025-03", time_entries=[entry(1, "staff", 1800, date(2025, 3, 10))])
    assert not f.initiating_visit_tracked
    decision = decide(f)
    assert decision.warnings == () and decision.initiating_visit is None


def test_the_g0506_charge_item_is_dated_and_supported_by_its_visit():
    decision = decide(facts("2025-03", [visit("v1", CONSENTED)]))
    info = PracticeInfo(id="prac-1", name="P", timezone="America/New_York",
                        pricing={"model": "percent-of-medicare", "percent": "100"})
    lines = {line.code: line for line in priced_lines(info, decision.month, [decision])}
    g0506 = lines["G0506"]
    assert (g0506.day, g0506.encounters) == (CONSENTED, ("v1",))
    assert lines["99490"].day is None and lines["99490"].encounters == ("enc-1",)
    resource = json.loads(charge_item_stub("prac-1", decision.month, g0506, revision=0)[1])
    assert resource["occurrenceDateTime"] == "2025-03-02" and "occurrencePeriod" not in resource
    assert resource["code"]["coding"] == [
        {"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "G0506"}]
    assert resource["supportingInformation"] == [{"reference": "Encounter/v1"}]
    other = json.loads(charge_item_stub("prac-1", decision.month, lines["99490"], revision=0)[1])
    assert other["occurrencePeriod"] == {"start": "2025-03-01", "end": "2025-03-31"}
    assert other["code"]["coding"][0]["system"] == "http://www.ama-assn.org/go/cpt"
