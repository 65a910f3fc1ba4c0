"""A closed month shows at once what happened to it after its close, without anyone recomputing
it: time logged for it late (``backdated-entry``, not billed, the Invoice stands) and a duplicate
biller found in another practice (``duplicate-biller``, a blocker: the patient's lines are
cancelled and the Invoice reissued without them, billed again once the flag is lifted)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from ccm_billing.adapters import filed, orm
from ccm_billing.service_layer import corrections
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver, march_practice, outboxed

MBI = "1EG4TE5MK73"
MARCH = "/v1/practices/{}/billing-periods/2025-03"


async def close_march(billing, practice: str = "alpha") -> dict:  # noqa: ANN001
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    r = await api(billing, practice).post(f"{MARCH.format(practice)}/close")
    assert r.status_code == 200, r.text
    return r.json()


async def worklist(billing, practice: str = "alpha") -> dict:  # noqa: ANN001
    r = await api(billing, practice).get(f"{MARCH.format(practice)}/worklist")
    assert r.status_code == 200, r.text
    assert r.json()["period"] == "closed" or practice != "alpha"
    return {row["patient"].removeprefix("Patient/"): row for row in r.json()["patients"]}


async def current_invoice(billing, practice: str = "alpha") -> dict | None:  # noqa: ANN001
    """The month's invoice that is not cancelled (there is one at most), or None."""
    r = await api(billing, practice).get(f"/v1/practices/{practice}/invoices")
    live = [x for x in r.json()["invoices"]
            if x["month"] == "2025-03" and x["status"] != "cancelled"]
    assert len(live) <= 1, live
    return live[0] if live else None


async def filings(billing, patient: str) -> list[tuple[int, str]]:  # noqa: ANN001
    f = filed.filings
    async with billing.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(f.c.revision, f.c.reason).where(
            f.c.practice == "alpha", f.c.month == "2025-03", f.c.patient == patient)
            .order_by(f.c.revision))).all()
    return [tuple(r) for r in rows]


# -- time logged after close ---------------------------------------------------------------------


async def test_time_logged_after_close_shows_backdated_entry_at_once_and_the_invoice_stands(
        billing):
    await march_practice(billing)  # p1 45 min (99490 + 99439), p2 19:59
    first = (await close_march(billing))["invoice"]
    await deliver(billing,
                  ev.time_logged("alpha", "p2", "late-1", 600, "2025-03-30T10:00:00-04:00"),
                  ev.time_logged("alpha", "p1", "late-2", 1200, "2025-03-02T10:00:00-05:00"))
    rows = await worklist(billing)
    p1, p2 = rows["p1"], rows["p2"]
    assert "backdated-entry" in p1["warnings"] and "backdated-entry" in p2["warnings"]
    # Not billed: p1 keeps its codes and minutes, p2 its 19:59; the late entries not counted.
    assert (p1["codes"], p1["seconds"]["staff"]) == ({"99490": 1, "99439": 1}, 2700)
    assert (p2["codes"], p2["seconds"]["staff"]) == ({}, 1199)
    # In the decider's order (start, then id): late-2 (2 March) before p1's counted entries.
    assert p1["explanation"]["notCounted"] == [
        {"entry": "Encounter/late-2", "seconds": 1200, "reason": "logged-after-close"}]
    assert p2["explanation"]["notCounted"] == [
        {"entry": "Encounter/late-1", "seconds": 600, "reason": "logged-after-close"}]
    # The Invoice stands: neither cancelled nor reissued.
    assert (await current_invoice(billing))["id"] == first["id"]
    assert await outboxed(billing, "billing.invoice.cancelled.v1") == []
    assert await filings(billing, "p2") == [
        (0, "closed"), (1, "Encounter/late-1 logged after close")]
    # The report says it too.
    report = (await api(billing).get(f"{MARCH.format('alpha')}/report.json")).json()
    assert all("backdated-entry" in p["warnings"] for p in report["patients"])
    assert report["totals"]["amount"] == first["totalNet"]


async def test_the_amended_filing_is_what_deciding_the_patient_again_gives(billing):
    """A correction of p2 with nothing else changed files nothing more: the revision a late
    entry added is the decision deciding p2 again would take."""
    await march_practice(billing)
    await close_march(billing)
    await deliver(billing,
                  ev.time_logged("alpha", "p2", "late-1", 600, "2025-03-30T10:00:00-04:00"))
    async with billing.db.unit_of_work() as uow:
        changed = await corrections.recompute(uow, "alpha", "2025-03", "check",
                                              billing.state["clock"](), patients=["p2"])
        await uow.commit()
    assert changed is False
    assert len(await filings(billing, "p2")) == 2
    whole = await api(billing).post(f"{MARCH.format('alpha')}/recompute", json={"reason": "check"})
    assert whole.json() == {"month": "2025-03", "reissued": False}
    assert len(await filings(billing, "p2")) == 2


async def test_a_late_entry_revised_or_reversed_is_shown_as_it_is_now(billing):
    await march_practice(billing)
    await close_march(billing)
    late = "2025-03-30T10:00:00-04:00"
    await deliver(billing, ev.time_logged("alpha", "p2", "late-1", 600, late),
                  ev.time_logged("alpha", "p2", "late-1", 900, late, version=2))
    p2 = (await worklist(billing))["p2"]
    assert p2["explanation"]["notCounted"] == [
        {"entry": "Encounter/late-1", "seconds": 900, "reason": "logged-after-close"}]
    await deliver(billing, ev.time_logged("alpha", "p2", "late-1", 900, late, version=2))
    assert len(await filings(billing, "p2")) == 3  # the same version again files nothing
    await deliver(billing, ev.time_reversed("alpha", "p2", "late-1", version=3))
    p2 = (await worklist(billing))["p2"]
    assert "backdated-entry" not in p2["warnings"]


async def test_a_late_entry_of_a_patient_the_close_did_not_decide_files_the_patient(billing):
    await march_practice(billing)
    await close_march(billing)
    await deliver(billing,
                  ev.time_logged("alpha", "p7", "late-7", 1500, "2025-03-30T10:00:00-04:00"))
    p7 = (await worklist(billing))["p7"]
    assert "backdated-entry" in p7["warnings"] and p7["codes"] == {}
    assert await outboxed(billing, "billing.invoice.cancelled.v1") == []


def entry(eid: str, start: str, *, late: bool = False, seconds: int = 600) -> dict:
    return {"entry": eid, "seconds": seconds, "role": "staff", "status": "finished",
            "start": start, "practitioner": None, "late": late, "complex": False}


def nc(eid: str, reason: str, seconds: int = 600) -> dict:
    return {"entry": f"Encounter/{eid}", "seconds": seconds, "reason": reason}


@pytest.mark.parametrize(("filed_entries", "filed_not_counted", "filed_warnings", "fresh_entries",
                          "fresh_not_counted", "fresh_warnings", "not_counted", "warnings"), [
    pytest.param(  # a first late entry, between two not counted: placed by its start
        [entry("a", "2025-03-01T10:00:00+00:00"), entry("c", "2025-03-20T10:00:00+00:00")],
        [nc("a", "before-consent"), nc("c", "non-clinical-performer")], ["consent-after-service"],
        [entry("b", "2025-03-10T10:00:00+00:00", late=True)],
        [nc("b", "logged-after-close")], ["backdated-entry", "care-plan-review-overdue"],
        [nc("a", "before-consent"), nc("b", "logged-after-close"),
         nc("c", "non-clinical-performer")],
        ["backdated-entry", "consent-after-service"], id="first late entry"),
    pytest.param(  # revised: its seconds now
        [entry("b", "2025-03-10T10:00:00+00:00", late=True)], [nc("b", "logged-after-close")],
        ["backdated-entry"],
        [entry("b", "2025-03-10T10:00:00+00:00", late=True, seconds=900)],
        [nc("b", "logged-after-close", 900)], ["backdated-entry"],
        [nc("b", "logged-after-close", 900)], ["backdated-entry"], id="revised"),
    pytest.param(  # moved to another patient: it leaves the filing, and the warning with it
        [entry("b", "2025-03-10T10:00:00+00:00", late=True)], [nc("b", "logged-after-close")],
        ["backdated-entry"], [], [], [], [], [], id="moved away"),
    pytest.param(  # same instant: by id, as the decider orders them
        [entry("z", "2025-03-10T10:00:00+00:00")], [nc("z", "non-clinical-performer")], [],
        [entry("y", "2025-03-10T10:00:00+00:00", late=True)], [nc("y", "logged-after-close")],
        ["backdated-entry"],
        [nc("y", "logged-after-close"), nc("z", "non-clinical-performer")], ["backdated-entry"],
        id="same start"),
])
def test_late_entries_change_only_what_is_said_of_them(
        filed_entries, filed_not_counted, filed_warnings, fresh_entries, fresh_not_counted,
        fresh_warnings, not_counted, warnings):
    doc = {"codes": {"99490": 1}, "blockers": [], "counted": ["k"], "notCounted": filed_not_counted,
           "warnings": filed_warnings, "seconds": {"staff": 1200, "practitioner": 0}}
    fresh = {"codes": {"99490": 2}, "blockers": ["x"], "counted": ["k", "m"],
             "notCounted": fresh_not_counted, "warnings": fresh_warnings}
    counted = entry("k", "2025-03-05T10:00:00+00:00", seconds=1200)
    new, entries = corrections.with_late_entries(doc, [counted, *filed_entries], fresh,
                                                 [counted, *fresh_entries])
    assert new == {**doc, "notCounted": not_counted, "warnings": warnings}
    assert sorted(e["entry"] for e in entries) == sorted(
        {"k", *(e["entry"] for e in filed_entries if not e["late"]),
         *(e["entry"] for e in fresh_entries)})


# -- duplicate billers found after close -----------------------------------------------------------


async def alpha_closed_with_pa(billing) -> dict:  # noqa: ANN001
    """alpha: p1 45 min, p2 19:59 and pa 30 min (MBI shared with beta's pb), March closed:
    p1 75.33 + pa 42.00 = 117.33. beta's pb is enrolled, no time yet."""
    await march_practice(billing)
    await deliver(billing, *ev.enrolled_patient("alpha", "pa", mbi=MBI),
                  ev.time_logged("alpha", "pa", "ea", 1800, "2025-03-03T10:00:00-05:00"),
                  *ev.enrolled_patient("beta", "pb", mbi=MBI),
                  ev.role("beta", "nurse-1", "clinical-staff"))
    first = (await close_march(billing))["invoice"]
    assert first["totalNet"] == "117.33"
    return first


async def test_a_duplicate_found_after_close_flags_the_closed_month_and_cancels_its_lines(billing):
    first = await alpha_closed_with_pa(billing)
    await deliver(billing, ev.time_logged("beta", "pb", "eb", 1800, "2025-03-04T10:00:00-06:00"))
    pa = (await worklist(billing))["pa"]
    assert (pa["billable"], pa["blockers"]) == (False, ["duplicate-biller"])
    assert pa["potentialCodes"] == {"99490": 1}
    # Bill neither until resolved: pa's line is cancelled, the Invoice reissued without it.
    new = await current_invoice(billing)
    assert new["totalNet"] == "75.33" and new["replaces"] == first["id"]
    (cancelled,) = await outboxed(billing, "billing.invoice.cancelled.v1")
    assert cancelled["tenant"] == "alpha"
    assert cancelled["data"]["reason"] == f"corrected: {corrections.DUPLICATE_TIME}"
    assert "beta" not in json.dumps(cancelled) and "pb" not in cancelled["data"]["reason"]
    # beta's month (open) is flagged too.
    assert (await worklist(billing, "beta"))["pb"]["blockers"] == ["duplicate-biller"]
    # Another entry of beta's changes nothing more.
    await deliver(billing, ev.time_logged("beta", "pb", "eb2", 600, "2025-03-05T10:00:00-06:00"))
    assert (await current_invoice(billing))["id"] == new["id"]


async def test_a_release_or_reclaim_by_the_other_practice_corrects_the_closed_month(billing):
    await alpha_closed_with_pa(billing)
    await deliver(billing, ev.time_logged("beta", "pb", "eb", 1800, "2025-03-04T10:00:00-06:00"))
    resolve = f"{MARCH.format('beta')}/duplicates/pb/resolve"
    released = await api(billing, "beta").post(resolve, json={"decision": "release"})
    assert released.status_code == 200
    pa = (await worklist(billing))["pa"]
    assert (pa["billable"], pa["codes"]) == (True, {"99490": 1})
    assert (await current_invoice(billing))["totalNet"] == "117.33"
    assert (await worklist(billing, "beta"))["pb"]["blockers"] == ["duplicate-biller"]
    reclaimed = await api(billing, "beta").post(resolve, json={"decision": "reclaim"})
    assert reclaimed.status_code == 200
    assert (await worklist(billing))["pa"]["blockers"] == ["duplicate-biller"]
    assert (await current_invoice(billing))["totalNet"] == "75.33"
    reasons = [e["data"]["reason"]
               for e in await outboxed(billing, "billing.invoice.cancelled.v1")]
    assert reasons == [f"corrected: {corrections.DUPLICATE_TIME}",
                       f"corrected: {corrections.DUPLICATE_RELEASE}",
                       f"corrected: {corrections.DUPLICATE_RELEASE}"]


async def test_the_other_practice_s_time_reversed_lifts_the_flag_of_the_closed_month(billing):
    await alpha_closed_with_pa(billing)
    await deliver(billing, ev.time_logged("beta", "pb", "eb", 1800, "2025-03-04T10:00:00-06:00"))
    assert (await current_invoice(billing))["totalNet"] == "75.33"
    await deliver(billing, ev.time_reversed("beta", "pb", "eb"))
    pa = (await worklist(billing))["pa"]
    assert (pa["billable"], pa["blockers"]) == (True, [])
    assert (await current_invoice(billing))["totalNet"] == "117.33"


async def test_an_mbi_known_after_close_flags_the_closed_month(billing):
    """beta's patient has time in March but no MBI yet when alpha closes; its MBI arrives
    later: alpha's closed month is flagged then, and lifted when the MBI is corrected."""
    await march_practice(billing)
    await deliver(billing, *ev.enrolled_patient("alpha", "pa", mbi=MBI),
                  ev.time_logged("alpha", "pa", "ea", 1800, "2025-03-03T10:00:00-05:00"),
                  *ev.enrolled_patient("beta", "pb"), ev.role("beta", "nurse-1", "clinical-staff"),
                  ev.time_logged("beta", "pb", "eb", 1800, "2025-03-04T10:00:00-06:00"))
    await close_march(billing)
    await deliver(billing, ev.patient("beta", "pb", mbi=MBI, version=2))
    assert (await worklist(billing))["pa"]["blockers"] == ["duplicate-biller"]
    assert (await current_invoice(billing))["totalNet"] == "75.33"
    await deliver(billing, ev.patient("beta", "pb", mbi="9ZZ9ZZ9ZZ99", version=3))
    assert (await worklist(billing))["pa"]["blockers"] == []
    assert (await current_invoice(billing))["totalNet"] == "117.33"


async def test_both_months_closed_each_follows_the_other(billing):
    """beta closes March first with pb billed; alpha's time for the same MBI then arrives late
    for alpha's March, itself closed: beta's closed month is flagged (alpha's late time is
    time in another practice all the same), alpha's late time is not billed."""
    await deliver(billing, *ev.enrolled_patient("beta", "pb", mbi=MBI),
                  ev.role("beta", "nurse-1", "clinical-staff"),
                  ev.time_logged("beta", "pb", "eb", 1800, "2025-03-04T10:00:00-06:00"),
                  *ev.enrolled_patient("alpha", "pa", mbi=MBI),
                  ev.role("alpha", "nurse-1", "clinical-staff"))
    await close_march(billing, "beta")
    await close_march(billing, "alpha")
    assert await current_invoice(billing, "beta") is not None
    assert await current_invoice(billing, "alpha") is None  # pa had no time: nothing billed
    await deliver(billing, ev.time_logged("alpha", "pa", "ea", 1800, "2025-03-03T10:00:00-05:00"))
    beta = await api(billing, "beta").get(f"{MARCH.format('beta')}/worklist")
    assert beta.json()["patients"][0]["blockers"] == ["duplicate-biller"]
    assert await current_invoice(billing, "beta") is None
    pa = (await worklist(billing))["pa"]
    assert "backdated-entry" in pa["warnings"] and pa["codes"] == {}


async def test_duplicate_patients_asks_about_the_one_patient(billing):
    await alpha_closed_with_pa(billing)
    await deliver(billing, ev.time_logged("beta", "pb", "eb", 1800, "2025-03-04T10:00:00-06:00"))
    from ccm_billing.service_layer.decisions import duplicate_patients

    async with billing.db.unit_of_work() as uow:
        assert await duplicate_patients(uow.session, "alpha", "2025-03") == {"pa"}
        assert await duplicate_patients(uow.session, "alpha", "2025-03", patient="pa") == {"pa"}
        assert await duplicate_patients(uow.session, "alpha", "2025-03", patient="p1") == set()
        f = orm.decision_filings
        assert (await uow.session.execute(select(func.count()).select_from(f).where(
            f.c.practice == "alpha", f.c.patient == "p1"))).scalar() == 0  # p1 untouched
