"""The compliance officer's billing findings 1, 2, 4 and 7 reproduced on the embedded database,
through ingest's events, a close and a recompute: a closed month recomputed in November is
judged on the chronic conditions the patient had in it, a consent documented after the month is
billed with a warning, time after the consent expired is not counted, and a month eligible only
by conditions no chronic code list checked says so."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import update

from ccm_billing.adapters import orm
from ccm_shared.tables import practices
from tests.unit.billing import compliance_events as cev
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver

SEPTEMBER = "2026-09"
BASE = "/v1/practices/alpha/billing-periods"


def condition(patient: str, cid: str, *, onset: str | None, received: str, version: int = 1,
              clinical: str = "active", chronic: bool = True, abatement: str | None = None,
              configured: bool | None = None):  # noqa: ANN201
    """``configured``: ingest's chronicCodesConfigured (None: an event from before it)."""
    return ev.event("alpha", "ingest.condition.upserted.v1", patient, {
        "source": cev.src("Condition", cid, version, received), "condition": f"Condition/{cid}",
        "patient": f"Patient/{patient}", "clinicalStatus": clinical,
        "verificationStatus": "confirmed", "categories": [], "code": [], "onset": onset,
        "abatement": abatement, "chronic": chronic, "deleted": False,
        **({} if configured is None else {"chronicCodesConfigured": configured})})


def consent(patient: str, *, obtained: str, received: str):  # noqa: ANN201
    return ev.event("alpha", "ingest.consent.granted.v1", patient, {
        "source": cev.src("Consent", f"{patient}-consent", 1, received),
        "consent": f"Consent/{patient}-consent", "patient": f"Patient/{patient}",
        "status": "active", "obtainedAt": obtained, "method": "written", "period": {},
        "provision": "permit", "practitioners": ["Practitioner/doc-1"], "categories": [],
        "effectiveUntil": None})


def patient_events(patient: str, *, conditions: int = 2, with_consent: bool = True,
                   configured: bool | None = None,
                   obtained: str = "2026-08-01T09:00:00-04:00",
                   entries: tuple[tuple[str, int], ...] = (("2026-09-10T10:00:00-04:00", 1500),)):
    """A patient with a care plan, ``conditions`` long-standing chronic conditions, a consent
    obtained (and received) on ``obtained`` and staff time in September 2026."""
    out = [ev.patient("alpha", patient),
           ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
           ev.care_plan("alpha", patient, f"{patient}-cp"),
           *(condition(patient, f"{patient}-k{i}", onset="2019-04-02",
                       received="2025-01-05T12:00:00Z", configured=configured)
             for i in range(1, conditions + 1)),
           *(ev.time_logged("alpha", patient, f"{patient}-e{i}", seconds, start)
             for i, (start, seconds) in enumerate(entries))]
    if with_consent:
        out.append(consent(patient, obtained=obtained, received=obtained))
    return out


async def september(billing) -> dict:  # noqa: ANN001
    rows = (await api(billing).get(f"{BASE}/{SEPTEMBER}/worklist")).json()
    return {r["patient"].removeprefix("Patient/"): r for r in rows["patients"]}


async def close_september(billing) -> None:  # noqa: ANN001
    billing.state["clock"].now = datetime(2026, 10, 2, 15, tzinfo=UTC)
    r = await api(billing).post(f"{BASE}/{SEPTEMBER}/close")
    assert r.status_code == 200, r.text


async def recompute_in_november(billing, *events) -> None:  # noqa: ANN001
    billing.state["clock"].now = datetime(2026, 11, 29, 15, tzinfo=UTC)
    await deliver(billing, *events)
    r = await api(billing).post(f"{BASE}/{SEPTEMBER}/recompute",
                                json={"reason": "compliance walkthrough"})
    assert r.status_code == 200, r.text


async def test_a_recompute_judges_a_closed_month_on_the_conditions_it_had(billing):
    """Finding 1. p04 had one chronic condition in September (blocked at close); a second one
    diagnosed on 20 November does not make September billable on recompute. p05 had two (billed
    at close); one resolved in November without an abatement date does not block September."""
    billing.state["clock"].now = datetime(2026, 9, 20, 15, tzinfo=UTC)
    await deliver(billing, *patient_events("p04", conditions=1), *patient_events("p05"))
    await close_september(billing)
    closed = await september(billing)
    assert closed["p04"]["blockers"] == ["insufficient-chronic-conditions"]
    assert closed["p05"]["codes"] == {"99490": 1} and closed["p05"]["blockers"] == []

    await recompute_in_november(
        billing,
        condition("p04", "p04-c2", onset="2026-11-20", received="2026-11-29T03:57:00Z"),
        condition("p05", "p05-k2", onset="2019-04-02", received="2026-11-12T15:00:00Z",
                  version=2, clinical="resolved", chronic=False))
    after = await september(billing)
    assert after["p04"]["blockers"] == ["insufficient-chronic-conditions"]
    assert after["p04"]["codes"] == {}
    assert after["p05"]["codes"] == {"99490": 1} and after["p05"]["blockers"] == []
    # … and each counts for the months it held in: December has p04's two, and p05's one
    # (resolved in November, it counted through November).
    december = {r["patient"].removeprefix("Patient/"): r for r in (await api(billing).get(
        f"{BASE}/2026-12/worklist")).json()["patients"]}
    assert "insufficient-chronic-conditions" not in december["p04"]["blockers"]
    assert "insufficient-chronic-conditions" in december["p05"]["blockers"]


async def test_a_consent_received_after_the_month_closed_bills_it_with_a_warning(billing):
    """Finding 2. p12 had no consent at close (consent-missing); a consent dated 1 August and
    received on 29 November bills September on recompute, with ``consent-documented-late``."""
    billing.state["clock"].now = datetime(2026, 9, 20, 15, tzinfo=UTC)
    await deliver(billing, *patient_events("p12", with_consent=False),
                  *patient_events("p13"))
    await close_september(billing)
    assert (await september(billing))["p12"]["blockers"] == ["consent-missing"]

    await recompute_in_november(billing, consent("p12", obtained="2026-08-01T09:00:00-04:00",
                                                 received="2026-11-29T03:57:38Z"))
    after = await september(billing)
    assert after["p12"]["codes"] == {"99490": 1} and after["p12"]["blockers"] == []
    assert "consent-documented-late" in after["p12"]["warnings"]
    assert any("received on 2026-11-28" in n for n in after["p12"]["explanation"]["notes"])
    # A consent documented when it was obtained gets no such warning.
    assert "consent-documented-late" not in after["p13"]["warnings"]


async def renew_consents_every_twelve_months(billing) -> None:  # noqa: ANN001
    async with billing.db.unit_of_work() as uow:
        pricing = {"model": "per-code", "rates": {"99490": "42.00", "99439": "33.33"},
                   "due_days": 30, "rules": {"consent_renewal_months": 12}}
        await uow.session.execute(update(practices).where(practices.c.id == "alpha")
                                  .values(pricing=json.dumps(pricing)))
        await uow.commit()


async def test_time_after_the_consent_expired_is_not_counted(billing):
    """Finding 4. With a 12-month renewal, p03's consent of 1 September 2025 expired on 1
    September 2026: September 2026 is not billed under it. p06's consent of 15 September 2025
    covers the time before the 15th only: 25 minutes counted, the 15 minutes after not."""
    await renew_consents_every_twelve_months(billing)
    billing.state["clock"].now = datetime(2026, 9, 25, 15, tzinfo=UTC)
    await deliver(billing,
                  *patient_events("p03", obtained="2025-09-01T09:00:00-04:00"),
                  *patient_events("p06", obtained="2025-09-15T09:00:00-04:00", entries=(
                      ("2026-09-10T10:00:00-04:00", 1500), ("2026-09-20T10:00:00-04:00", 900))))
    rows = await september(billing)
    assert rows["p03"]["codes"] == {} and rows["p03"]["blockers"] == ["consent-not-active"]
    p06 = rows["p06"]
    assert p06["codes"] == {"99490": 1}  # 40 minutes would be 99490 + 99439
    assert p06["seconds"]["staff"] == 1500 and "consent-expired" in p06["warnings"]
    assert [(n["entry"], n["reason"]) for n in p06["explanation"]["notCounted"]] == [
        ("Encounter/p06-e1", "consent-expired")]


@pytest.mark.parametrize(("configured", "warned"), [(False, True), (True, False),
                                                     (None, False)])  # None: from before
async def test_a_month_eligible_only_by_unchecked_conditions_is_billed_with_a_warning(
        billing, configured, warned):
    """Finding 7. p16's two active problem-list conditions (acute bronchitis, an ankle sprain)
    were judged chronic without a chronic code list (ingest says so: its ``chronic_codes``
    empty): the billable month says ``chronic-conditions-unverified``. A list judged them, or
    an event from before ingest said: no warning."""
    billing.state["clock"].now = datetime(2026, 9, 20, 15, tzinfo=UTC)
    await deliver(billing, *patient_events("p16", configured=configured))
    p16 = (await september(billing))["p16"]
    assert p16["codes"] == {"99490": 1} and p16["blockers"] == []
    assert ("chronic-conditions-unverified" in p16["warnings"]) is warned
    assert any("chronic_codes" in n for n in p16["explanation"]["notes"]) is warned


async def test_a_condition_row_the_previous_release_wrote_still_counts(billing):
    """During a rollout (or after a rollback) the previous release's consumer writes a condition
    with ``counts`` only, billing_0025's columns empty: it counts as it did, for every month
    (found by review: it counted for none, and the month was blocked)."""
    billing.state["clock"].now = datetime(2026, 9, 20, 15, tzinfo=UTC)
    await deliver(billing, *patient_events("p02", conditions=1))
    assert "insufficient-chronic-conditions" in (await september(billing))["p02"]["blockers"]
    async with billing.db.engine.begin() as conn:
        await conn.execute(orm.conditions.insert().values(
            practice="alpha", condition_id="p02-old", patient="p02",
            version="2026-09-01T00:00:00.000000|00000000000000000001", counts=True))
    await deliver(billing, ev.patient("alpha", "p02", version=2))  # decided again
    assert "insufficient-chronic-conditions" not in (await september(billing))["p02"]["blockers"]
