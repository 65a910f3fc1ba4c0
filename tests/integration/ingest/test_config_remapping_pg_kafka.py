"""An ingest config change on PostgreSQL and Kafka: the stored resources it concerns are
mapped again, their changed events go out through the outbox (on their topics, valid against
contracts/, in per-patient order), and writes racing the change are mapped with the config
they commit under."""

import asyncio
import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text

from ccm_ingest.adapters.orm import outbox
from ccm_ingest.adapters.repository import SqlResourceRepository
from ccm_ingest.domain.config import DEFAULT_CONFIG
from ccm_shared.db import lock_key
from tests.integration.ingest.test_ingest_pg_kafka import _read_tenant_events
from tests.support.contracts import assert_valid_event

pytestmark = pytest.mark.asyncio(loop_scope="session")

COORDINATOR = "urn:ehr:roles|care-coordinator"
ROLE = {"resourceType": "PractitionerRole", "id": "coord",
        "practitioner": {"reference": "Practitioner/c1"},
        "code": [{"coding": [{"system": "urn:ehr:roles", "code": "care-coordinator"}]}]}
TOPICS = ["ingest.practitioner-role.upserted.v1", "ingest.time-entry.logged.v1"]


def timed(eid: str, minutes: int = 25) -> dict:
    return {"resourceType": "Encounter", "id": eid, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "AMB"},
            "type": [{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99490"}]}],
            "subject": {"reference": "Patient/p1"},
            "period": {"start": "2026-03-02T15:00:00Z"},
            "length": {"value": minutes, "unit": "min", "system": "http://unitsofmeasure.org",
                       "code": "min"},
            "participant": [{"type": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                "code": "PPRF"}]}], "individual": {"reference": "PractitionerRole/coord"}}]}


def with_coordinator() -> dict:
    return {"clinical_staff_roles": [*DEFAULT_CONFIG.clinical_staff_roles, COORDINATOR]}


async def test_a_role_code_added_restates_the_role_and_its_time_on_kafka(ingest_pg, infra):
    """The coordinator's role (unknown when pushed) and its time: the config change sends
    both again, classified, as the same versions with the config's mapping revision."""
    assert (await ingest_pg.put("/fhir/PractitionerRole/coord", json=ROLE)).status_code == 201
    assert (await ingest_pg.put("/fhir/Encounter/e1", json=timed("e1"))).status_code == 201
    r = await ingest_pg.put(f"/v1/practices/{ingest_pg.practice}/ingest-config",
                            json=with_coordinator())
    assert r.status_code == 200, r.text
    revision = r.json()["revision"]
    assert r.json()["remapped"]["events"] == 2
    events = await _read_tenant_events(infra.kafka_bootstrap_servers, TOPICS,
                                       ingest_pg.practice, expect=4)
    assert len(events) == 4
    for event in events:
        assert_valid_event(json.loads(event.to_json()))
    roles = sorted((e for e in events if e.type == TOPICS[0]),
                   key=lambda e: e.data["source"].get("mappingRevision", 0))
    assert [e.data["classification"] for e in roles] == ["unknown", "clinical-staff"]
    assert roles[1].data["source"] == {**roles[0].data["source"], "mappingRevision": revision}
    times = sorted((e for e in events if e.type == TOPICS[1]), key=lambda e: e.sequence)
    assert [e.data["performers"][0]["classification"] for e in times] == [
        "unknown", "clinical-staff"]
    assert [e.sequence for e in times] == [1, 2]  # the patient's numbers, in order
    assert times[1].data["source"]["mappingRevision"] == revision
    assert {e.kafka_key() for e in times} == {f"{ingest_pg.practice}:p1"}


async def test_writes_racing_a_config_change_are_mapped_with_the_config_they_commit_under(
        ingest_pg):
    """Writes of the practice while a change maps 300 stored Encounters again: none fails,
    and every Encounter's newest event (per-patient sequence: commit order) classifies the
    coordinator's time as the config in force says; also for a process whose cached config
    predates the change."""
    assert (await ingest_pg.put("/fhir/PractitionerRole/coord", json=ROLE)).status_code == 201
    stored = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": timed(f"s{n}"), "request": {"method": "PUT", "url": f"Encounter/s{n}"}}
        for n in range(300)]}
    assert (await ingest_pg.post("/fhir", json=stored)).status_code == 200
    cache = ingest_pg.runtime.state["practice_cache"]
    stale = cache.get("practice", ingest_pg.practice)
    assert stale is not None

    async def write(n: int) -> int:
        # New Encounters, and changes of stored ones (another length: a new version).
        eid, minutes = (f"n{n}", 25) if n % 2 else (f"s{n}", 30)
        if n % 3 == 0:
            r = await ingest_pg.post("/fhir", json={
                "resourceType": "Bundle", "type": "transaction", "entry": [{
                    "resource": timed(eid, minutes),
                    "request": {"method": "PUT", "url": f"Encounter/{eid}"}}]})
            return r.status_code
        return (await ingest_pg.put(f"/fhir/Encounter/{eid}", json=timed(eid, minutes))
                ).status_code

    async def change() -> int:
        await asyncio.sleep(0.01)
        r = await ingest_pg.put(f"/v1/practices/{ingest_pg.practice}/ingest-config",
                                json=with_coordinator())
        return r.status_code

    answers = await asyncio.gather(change(), *(write(n) for n in range(40)))
    assert answers[0] == 200 and all(s in (200, 201) for s in answers[1:]), answers
    cache.put("practice", ingest_pg.practice, stale)  # a process that read it before
    late = [await write(n) for n in range(40, 46)]
    assert all(s in (200, 201) for s in late), late

    async with ingest_pg.runtime.db.engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.payload).where(
            outbox.c.tenant == ingest_pg.practice,
            outbox.c.event_type == "ingest.time-entry.logged.v1"))).scalars().all()
    newest: dict[str, dict] = {}
    for event in map(json.loads, rows):
        entry = event["data"]["entry"]
        if entry not in newest or event["sequence"] > newest[entry]["sequence"]:
            newest[entry] = event
    assert len(newest) == 300 + 23  # the stored ones and the new ones (odd n below 46)
    wrong = sorted(e for e, ev in newest.items()
                   if ev["data"]["performers"][0]["classification"] != "clinical-staff")
    assert wrong == []


async def test_a_write_that_waited_for_a_change_maps_with_the_config_the_change_made(ingest_pg):
    """A write whose transaction waits for a change's hold on the config reads the config's
    revision once the change has committed, not from before it. It read the revision in the
    statement that waited for the lock, whose snapshot predated the change: it mapped the
    coordinator's time as unknown staff with the config the change had just replaced, and
    committed after the change (so its event was the Encounter's newest)."""
    assert (await ingest_pg.put("/fhir/PractitionerRole/coord", json=ROLE)).status_code == 201
    # the API process caches the practice's config (revision 0) with this write
    assert (await ingest_pg.put("/fhir/Encounter/w0", json=timed("w0"))).status_code == 201
    async with ingest_pg.runtime.db.unit_of_work() as uow:  # a change, held open
        repo = SqlResourceRepository(uow.session, ingest_pg.practice)
        await repo.hold_config(change=True)
        await repo.save_config(with_coordinator(), datetime.now(UTC))
        write = asyncio.create_task(ingest_pg.put("/fhir/Encounter/w1", json=timed("w1")))
        await asyncio.sleep(0.5)
        assert not write.done()  # the write waits for the change
        await uow.commit()
    assert (await write).status_code == 201
    async with ingest_pg.runtime.db.engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.payload).where(
            outbox.c.tenant == ingest_pg.practice,
            outbox.c.event_type == "ingest.time-entry.logged.v1"))).scalars().all()
    classified = {event["data"]["entry"]: event["data"]["performers"][0]["classification"]
                  for event in map(json.loads, rows)}
    assert classified == {"Encounter/w0": "unknown", "Encounter/w1": "clinical-staff"}


async def test_a_batch_of_reads_does_not_wait_for_a_config_change(ingest_pg):
    """A batch Bundle's GET entries read without holding the practice's config (only writes
    map with it): while a change holds it, a batch of reads answers. Each GET entry used to
    take the config's shared hold, so it waited for the change like a write."""
    assert (await ingest_pg.put("/fhir/PractitionerRole/coord", json=ROLE)).status_code == 201
    reads = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "PractitionerRole/coord"}},
        {"request": {"method": "GET", "url": "PractitionerRole?_count=5"}}]}
    key = lock_key(f"ingest-config:{ingest_pg.practice}")
    async with ingest_pg.runtime.db.unit_of_work() as uow:  # a change, held open
        repo = SqlResourceRepository(uow.session, ingest_pg.practice)
        await repo.hold_config(change=True)
        await repo.save_config(with_coordinator(), datetime.now(UTC))
        read = asyncio.create_task(ingest_pg.post("/fhir", json=reads))
        # Until it answers, nothing may wait for the config's lock (the old code's GET entries
        # did, until the change ended: never, here). No time limit: what is seen decides.
        waited = False
        while not read.done() and not waited:
            async with ingest_pg.runtime.db.engine.connect() as conn:
                waited = bool((await conn.execute(text(
                    "select count(*) from pg_locks where locktype = 'advisory' and not granted"
                    " and classid::bigint = :hi and objid::bigint = :lo"),
                    {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF})).scalar())
            await asyncio.sleep(0.01)
        await uow.commit()
    answered = await read
    assert not waited, "a batch of reads waited for the config's lock"
    assert answered.status_code == 200
    assert [e["response"]["status"] for e in answered.json()["entry"]] == ["200 OK"] * 2
