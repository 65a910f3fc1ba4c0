"""Whose practitioner time it is, from the projections (PractitionerRole → Practitioner) to
the worklist: the administrator's walkthrough, where Dr. Cole's 35 minutes were billed as
99491 under Dr. Hart, the consent's billing practitioner."""

from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver

HART, COLE = "Practitioner/dr-hart", "Practitioner/dr-cole"
WORKLIST = "/v1/practices/alpha/billing-periods/2025-03/worklist"


async def practice_with_two_physicians(billing, *, consent_names=HART):
    """Dr. Hart and Dr. Cole, physicians (PractitionerRoles role-hart, role-cole); p1 enrolled
    under a consent naming ``consent_names``, initiated at a visit of Dr. Hart's."""
    patient, _, care_plan, *conditions, _ = ev.enrolled_patient("alpha", "p1")
    await deliver(billing, patient, care_plan, *conditions,
                  ev.consent("alpha", "p1", "c-p1", practitioner=consent_names),
                  ev.visit("alpha", "p1", "v-p1", practitioner=HART),
                  ev.role("alpha", "role-hart", "billing-practitioner", practitioner=HART),
                  ev.role("alpha", "role-cole", "billing-practitioner", practitioner=COLE))


async def row(billing) -> dict:
    (only,) = (await api(billing).get(WORKLIST)).json()["patients"]
    return only


async def test_another_physicians_35_minutes_are_not_billed_under_the_consents(billing):
    await practice_with_two_physicians(billing)
    await deliver(billing, ev.time_logged("alpha", "p1", "e1", 35 * 60,
                                          "2025-03-07T13:00:00-05:00", practitioner=COLE,
                                          role="PractitionerRole/role-cole"))
    p1 = await row(billing)
    assert p1["codes"] == {} and p1["seconds"] == {"staff": 0, "practitioner": 0}
    assert p1["blockers"] == ["time-threshold-not-met"]
    assert p1["warnings"] == ["other-practitioner-time"]
    assert p1["explanation"]["notCounted"] == [
        {"entry": "Encounter/e1", "seconds": 2100, "reason": "other-practitioner"}]


async def test_time_named_by_the_role_alone_is_its_practitioners(billing):
    """Ingest names the role's Practitioner when it knows the role; when it did not, billing's
    projection of the PractitionerRole does."""
    await practice_with_two_physicians(billing)
    await deliver(billing, ev.time_logged("alpha", "p1", "e1", 35 * 60,
                                          "2025-03-07T13:00:00-05:00", practitioner=None,
                                          role="PractitionerRole/role-hart"))
    p1 = await row(billing)
    assert p1["codes"] == {"99491": 1} and p1["seconds"]["practitioner"] == 2100
    assert p1["warnings"] == []
    # The worklist points at the nearest threshold that pays more: 99439 as staff time.
    assert p1["nextThreshold"] == {"code": "99439", "minutes": 5, "option": "staff"}
    assert p1["minutesToNextThreshold"] == 5


async def test_a_consent_naming_the_role_takes_the_practitioners_own_time(billing):
    await practice_with_two_physicians(billing, consent_names="PractitionerRole/role-hart")
    await deliver(billing,
                  ev.time_logged("alpha", "p1", "e1", 30 * 60, "2025-03-07T13:00:00-05:00",
                                 practitioner=HART, role=None),
                  ev.time_logged("alpha", "p1", "e2", 30 * 60, "2025-03-09T13:00:00-05:00",
                                 practitioner=COLE, role=None))
    p1 = await row(billing)
    # Not 60 minutes summed (99490 + 2x99439): Dr. Hart's 30 alone, as 99491.
    assert p1["codes"] == {"99491": 1} and p1["seconds"]["practitioner"] == 1800
    assert [n["reason"] for n in p1["explanation"]["notCounted"]] == ["other-practitioner"]


async def test_a_consent_naming_no_one_bills_two_physicians_time_under_neither(billing):
    await practice_with_two_physicians(billing, consent_names=None)
    await deliver(billing,
                  ev.time_logged("alpha", "p1", "e1", 20 * 60, "2025-03-07T13:00:00-05:00",
                                 practitioner=HART, role="PractitionerRole/role-hart"),
                  ev.time_logged("alpha", "p1", "e2", 20 * 60, "2025-03-09T13:00:00-05:00",
                                 practitioner=COLE, role="PractitionerRole/role-cole"))
    p1 = await row(billing)
    assert p1["codes"] == {} and p1["warnings"] == ["billing-practitioner-unknown"]
    assert {n["reason"] for n in p1["explanation"]["notCounted"]} == {
        "billing-practitioner-unknown"}
    # One physician's time alone is theirs, and bills under them.
    await deliver(billing, ev.time_reversed("alpha", "p1", "e2"),
                  ev.time_logged("alpha", "p1", "e3", 15 * 60, "2025-03-11T13:00:00-04:00",
                                 practitioner=None, role="PractitionerRole/role-hart"))
    p1 = await row(billing)
    assert p1["codes"] == {"99491": 1} and p1["seconds"]["practitioner"] == 35 * 60
