"""Consent expiry notices: ingest.consent.expiring.v1 ahead of a granted CCM consent's
provision.period end (fhir-mapping.md), once per consent and end day."""

import asyncio
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest

from ccm_ingest.adapters.repository import SqlResourceRepository
from ccm_ingest.domain.config import DEFAULT_CONFIG, ConfigInvalid
from ccm_ingest.domain.mapping import consent_expires_on, map_version
from ccm_ingest.entrypoints.jobs import background
from ccm_ingest.service_layer.expiry import EXPIRING, expiry_pass
from tests.support.contracts import assert_valid_event
from tests.unit.ingest.conftest import NOW, as_practice, events
from tests.unit.ingest.test_mapping_and_config import CCM_CONSENT, ctx

NY = ZoneInfo("America/New_York")


def consent(end: str | None, **changes) -> dict:
    period = {"start": "2026-02-27", **({"end": end} if end else {})}
    return {**CCM_CONSENT, "provision": {"type": "permit", "period": period}, **changes}


@pytest.mark.parametrize("end, provision, expected", [
    ("2026-04-10", "permit", "2026-04-10"),
    ("2026-04", "permit", "2026-04-30"),  # a partial end: its last day, as billing reads it
    ("2026-02", "permit", "2026-02-28"),
    ("2026", "permit", "2026-12-31"),
    ("2026-04-01T02:00:00Z", "permit", "2026-03-31"),  # the practice's day (New York)
    ("2026-06-30T23:59:60Z", "permit", "2026-06-30"),  # a leap second: the date as written
    ("2026-04-10", "deny", None),  # a deny grants nothing to expire
    (None, "permit", None),
])
def test_the_day_a_consent_expires(end, provision, expected):
    res = consent(end)
    res["provision"]["type"] = provision
    assert consent_expires_on(res, NY) == expected


@pytest.mark.parametrize("status, kept", [("active", True), ("inactive", False),
                                          ("rejected", False), ("draft", False)])
def test_only_a_granted_consent_keeps_its_end_day(status, kept):
    state = map_version(consent("2026-04-10", status=status), ctx("Consent")).state
    assert ("expiresOn" in state) is kept


@pytest.mark.parametrize("value", [-1, 367, "30", True, 2.5])
def test_the_lead_is_a_number_of_days_up_to_a_year(value):
    with pytest.raises(ConfigInvalid, match="consent_expiring_lead_days must be an integer"):
        DEFAULT_CONFIG.merged({"consent_expiring_lead_days": value})


async def put_consent(fhir, cid: str, body: dict, practice: str = "alpha") -> None:
    r = await fhir.put(f"/fhir/Consent/{cid}", json={**body, "id": cid},
                       headers=as_practice(fhir, practice))
    assert r.status_code in (200, 201), r.text


async def notices(fhir) -> list[dict]:
    return await events(fhir, EXPIRING)


async def test_a_notice_goes_out_once_within_the_lead(fhir):
    await put_consent(fhir, "soon", consent("2026-04-10"))  # 26 days after 2026-03-15
    await put_consent(fhir, "later", consent("2026-05-30"))  # 76 days
    await put_consent(fhir, "open", consent(None))  # no end: never expires by its period
    await put_consent(fhir, "gone", consent("2026-03-01"))  # already expired: no notice
    db = fhir.runtime.db
    assert (await expiry_pass(db, NOW)).sent == 1
    (notice,) = await notices(fhir)
    assert notice["subject"] == "Patient/p1" and notice["tenant"] == "alpha"
    assert {k: notice["data"][k] for k in ("consent", "patient", "expiresOn", "daysLeft",
                                           "leadDays")} == {
        "consent": "Consent/soon", "patient": "Patient/p1", "expiresOn": "2026-04-10",
        "daysLeft": 26, "leadDays": 30}
    assert notice["data"]["source"]["id"] == "soon"
    assert notice["data"]["source"]["versionId"] == "1"
    assert_valid_event(notice)
    # Passes again, the same day and later: nothing twice.
    assert (await expiry_pass(db, NOW)).sent == 0
    assert (await expiry_pass(db, NOW + timedelta(days=20))).sent == 0
    # 30 days before 2026-05-30 (New York), "later" is due; not a day earlier.
    assert (await expiry_pass(db, NOW + timedelta(days=45))).sent == 0
    assert (await expiry_pass(db, NOW + timedelta(days=46, hours=1))).sent == 1
    assert [n["data"]["consent"] for n in await notices(fhir)] == ["Consent/soon",
                                                                     "Consent/later"]


async def test_a_new_end_day_gets_its_own_notice_and_a_revoked_consent_none(fhir):
    db = fhir.runtime.db
    await put_consent(fhir, "c1", consent("2026-04-10"))
    await put_consent(fhir, "c2", consent("2026-04-10"))
    assert (await expiry_pass(db, NOW)).sent == 2
    # c1 edited with the same end: no second notice. c1 extended into the lead again later:
    # a notice for the new day. c2 revoked before its new end comes near: none.
    await put_consent(fhir, "c1", consent("2026-04-10", dateTime="2026-02-28T10:00:00-05:00"))
    assert (await expiry_pass(db, NOW)).sent == 0
    await put_consent(fhir, "c1", consent("2026-04-12"))
    await put_consent(fhir, "c2", consent("2026-04-12", status="inactive"))
    assert (await expiry_pass(db, NOW)).sent == 1
    assert [(n["data"]["consent"], n["data"]["expiresOn"]) for n in await notices(fhir)] == [
        ("Consent/c1", "2026-04-10"), ("Consent/c2", "2026-04-10"),
        ("Consent/c1", "2026-04-12")]
    # A deleted consent expires nothing.
    await put_consent(fhir, "c3", consent("2026-04-13"))
    assert (await fhir.delete("/fhir/Consent/c3")).status_code == 204
    assert (await expiry_pass(db, NOW)).sent == 0


async def test_each_practice_its_lead_and_its_own_notices(fhir):
    async with fhir.runtime.db.unit_of_work() as uow:
        await SqlResourceRepository(uow.session, "beta").save_config(
            {"consent_expiring_lead_days": 90}, NOW)
        await SqlResourceRepository(uow.session, "alpha").save_config(
            {"consent_expiring_lead_days": 0}, NOW)
        await uow.commit()
    await put_consent(fhir, "a1", consent("2026-04-10"))
    await put_consent(fhir, "b1", consent("2026-05-30"), practice="beta")  # 76 days: within 90
    assert (await expiry_pass(fhir.runtime.db, NOW)).sent == 1  # alpha: 0 days, none
    (notice,) = await notices(fhir)
    assert notice["tenant"] == "beta" and notice["data"]["leadDays"] == 90
    assert notice["data"]["consent"] == "Consent/b1"


async def test_the_background_job_sends_the_notices(fhir):
    await put_consent(fhir, "soon", consent("2026-04-10"))
    (job,) = background(fhir.runtime)
    stopping = asyncio.Event()
    task = asyncio.create_task(job.run(stopping))
    try:
        for _ in range(200):
            if await notices(fhir):
                break
            await asyncio.sleep(0.02)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)
    assert [n["data"]["consent"] for n in await notices(fhir)] == ["Consent/soon"]


async def test_a_consent_moved_to_another_patient_is_noticed_for_that_patient(fhir):
    db = fhir.runtime.db
    await put_consent(fhir, "c1", consent("2026-04-10"))
    assert (await expiry_pass(db, NOW)).sent == 1
    await put_consent(fhir, "c1", consent("2026-04-10", patient={"reference": "Patient/p2"}))
    assert (await expiry_pass(db, NOW)).sent == 1
    assert [n["subject"] for n in await notices(fhir)] == ["Patient/p1", "Patient/p2"]


async def test_a_notice_recorded_by_a_concurrent_pass_is_not_sent_again(fhir):
    """Two passes may read the same due consents before either commits (PostgreSQL reads
    them, then locks): the second one's notices already recorded are left out, not refused."""
    from ccm_ingest.adapters.repository import SqlResourceRepository

    await put_consent(fhir, "c1", consent("2026-04-10"))
    await put_consent(fhir, "c2", consent("2026-04-11"))
    async with fhir.runtime.db.unit_of_work() as uow:
        repo = SqlResourceRepository(uow.session, "alpha")
        due = await repo.expiring_consents("2026-03-15", "2026-04-14", 10)
        assert [c.id for c in due] == ["c1", "c2"]
        assert [c.id for c in await repo.record_expiry_notices(due[:1], NOW)] == ["c1"]
        # Each notice recorded is answered once, even were it asked for twice.
        assert [c.id for c in await repo.record_expiry_notices(due + due, NOW)] == ["c2"]
        await uow.commit()
    assert (await expiry_pass(fhir.runtime.db, NOW)).sent == 0


async def test_a_pass_visits_only_practices_with_a_consent_not_yet_ended(fhir):
    """It visited every practice (several statements each): on a database of 5,325 practices
    the relay's process spent half a core finding nothing. A practice without consents, or
    whose consents ended, has nothing to notice."""
    db = fhir.runtime.db
    await put_consent(fhir, "soon", consent("2026-04-10"))  # alpha: within the lead
    await put_consent(fhir, "gone", consent("2026-03-01"), practice="beta")  # ended: nothing
    result = await expiry_pass(db, NOW)
    assert (result.practices, result.sent) == (1, 1)
    assert (await expiry_pass(db, NOW + timedelta(days=60))).practices == 0  # all ended
