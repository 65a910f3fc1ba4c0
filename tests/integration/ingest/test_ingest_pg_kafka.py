"""Ingest on real PostgreSQL and Kafka: duplicate-proof conditional creates, and a pushed Bundle's
events on their topics, in per-patient order, valid against contracts/."""

import asyncio
import json
import random
import uuid
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer
from sqlalchemy import func, select

from ccm_ingest.adapters.orm import resource_identifiers, resource_versions, resources
from ccm_shared.events import CloudEvent
from ccm_shared.jsontext import compact
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tables import messaging_tables
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.contracts import assert_valid_event

pytestmark = pytest.mark.asyncio(loop_scope="session")
BUNDLE = (Path(__file__).resolve().parents[3]
          / "services/ingest/examples/ccm-transaction-bundle.json")


@pytest_asyncio.fixture(loop_scope="session")
async def ingest(infra):
    """A running ingest service (relay on) for a fresh practice, and an HTTP client on it."""
    definition = discover_services()["ingest"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    settings = load_settings(database_url=infra.database_url,
                             kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
                             outbox_poll_interval_seconds=0.05)
    runtime = ServiceRuntime.build(definition, settings)
    practice = f"ingest-{uuid.uuid4().hex[:10]}"
    await create_practice(runtime.db.engine, practice_id=practice, name="Lakeside",
                          timezone="America/New_York", pricing=Pricing())
    token = await create_token(runtime.db.engine, practice_id=practice, label="ehr-test")
    await runtime.start(consumers=False, background=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                 base_url="http://ingest", timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        client.practice = practice
        client.runtime = runtime
        yield client
    await runtime.stop()


async def test_50_concurrent_identical_conditional_creates_make_exactly_one_resource(ingest):
    mrn = uuid.uuid4().hex
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}]}

    async def push():
        return await ingest.post("/fhir/Patient", json=patient,
                                 headers={"If-None-Exist": f"identifier=urn:mrn|{mrn}"})

    answers = await asyncio.gather(*(push() for _ in range(50)))
    assert sorted(r.status_code for r in answers) == [200] * 49 + [201]
    assert len({r.json()["id"] for r in answers}) == 1
    async with ingest.runtime.db.engine.connect() as conn:
        n = (await conn.execute(select(func.count()).select_from(resources).where(
            resources.c.tenant == ingest.practice, resources.c.type == "Patient"))).scalar_one()
    assert n == 1


@pytest.mark.parametrize("via", ["rest", "transaction"])
async def test_concurrent_conditional_creates_taking_over_stale_criteria_make_one_resource(
        ingest, via):
    """The criteria's owner no longer matches them (its identifier changed): every concurrent
    create finds no match, and exactly one may take the criteria over; the others then find
    its resource."""
    for _ in range(3):
        mrn = uuid.uuid4().hex
        criteria = f"identifier=urn:mrn|{mrn}"
        patient = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}]}
        first = await ingest.post("/fhir/Patient", json=patient,
                                  headers={"If-None-Exist": criteria})
        moved = {**patient, "id": first.json()["id"],
                 "identifier": [{"system": "urn:mrn", "value": f"{mrn}-old"}]}
        assert (await ingest.put(f"/fhir/Patient/{moved['id']}", json=moved)).status_code == 200

        async def push(patient=patient, criteria=criteria):
            if via == "rest":
                r = await ingest.post("/fhir/Patient", json=patient,
                                      headers={"If-None-Exist": criteria})
                return r.status_code
            r = await ingest.post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                                 "entry": [{"resource": patient, "request": {
                                                     "method": "POST", "url": "Patient",
                                                     "ifNoneExist": criteria}}]})
            assert r.status_code == 200, r.text
            return int(r.json()["entry"][0]["response"]["status"][:3])

        answers = await asyncio.gather(*(push() for _ in range(10)))
        assert sorted(answers) == [200] * 9 + [201]
        found = await ingest.get("/fhir/Patient", params={"identifier": f"urn:mrn|{mrn}"})
        assert found.json()["total"] == 1


@pytest.mark.parametrize("via", ["transaction", "batch"])
async def test_concurrent_conditional_updates_matching_nothing_make_one_resource(ingest, via):
    """``PUT Patient?identifier=…`` matching nothing creates; it claims the criteria as a
    conditional create does, so of concurrent ones one creates and the others update it (each
    made its own Patient, and CCM time Encounters were counted several times)."""
    mrn = uuid.uuid4().hex
    criteria = f"identifier=urn:mrn|{mrn}"
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}]}

    async def push(n):
        sent = {**patient, "name": [{"family": f"Put{n}"}]}
        r = await ingest.post("/fhir", json={"resourceType": "Bundle", "type": via, "entry": [
            {"resource": sent, "request": {"method": "PUT", "url": f"Patient?{criteria}"}}]})
        assert r.status_code == 200, r.text
        return r.json()["entry"][0]["response"]["status"]

    answers = await asyncio.gather(*(push(n) for n in range(12)))
    assert sorted(answers) == ["200 OK"] * 11 + ["201 Created"], answers
    found = await ingest.get("/fhir/Patient", params={"identifier": f"urn:mrn|{mrn}"})
    assert found.json()["total"] == 1
    history = await ingest.get(f"/fhir/Patient/{found.json()['entry'][0]['resource']['id']}"
                               "/_history", params={"_count": 50})
    assert history.json()["total"] == 12


@pytest.mark.parametrize("variant", ["delete", "if-match", "sequences"])
async def test_transactions_locking_in_opposite_orders_are_run_again_not_500(ingest, variant):
    """Two transactions that lock the same rows (DELETEs, ifMatch updates) or the same
    patients' event counters in opposite orders deadlock; PostgreSQL rolls one back, and ingest
    runs it again: both succeed, and their writes are all there."""
    def transaction(*entries):
        return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}

    def patient(rid, gender):
        return {"resourceType": "Patient", "id": rid, "gender": gender}

    def condition(cid, who, text):
        return {"resourceType": "Condition", "id": cid, "code": {"text": text},
                "subject": {"reference": f"Patient/{who}"}}

    for _ in range(6):
        a, b = f"dl-{uuid.uuid4().hex[:8]}", f"dl-{uuid.uuid4().hex[:8]}"
        if variant == "sequences":  # four Conditions; only their two patients are shared
            ids = [f"{a}-c{i}" for i in range(4)]
            for cid, who in zip(ids, [a, b, b, a], strict=True):
                await ingest.put(f"/fhir/Condition/{cid}", json=condition(cid, who, "x"))

            def pair(c1, p1, c2, p2):
                return transaction(
                    {"resource": condition(c1, p1, "y"),
                     "request": {"method": "PUT", "url": f"Condition/{c1}"}},
                    {"resource": condition(c2, p2, "y"),
                     "request": {"method": "PUT", "url": f"Condition/{c2}", "ifMatch": 'W/"1"'}})
            one, two = pair(ids[0], a, ids[1], b), pair(ids[2], b, ids[3], a)
        else:
            for rid in (a, b):
                await ingest.put(f"/fhir/Patient/{rid}", json=patient(rid, "male"))

            def pair(x, y, gender):
                if variant == "delete":
                    return transaction({"request": {"method": "DELETE", "url": f"Patient/{x}"}},
                                       {"request": {"method": "DELETE", "url": f"Patient/{y}"}})
                return transaction(
                    {"resource": patient(x, gender), "request": {"method": "PUT",
                                                                 "url": f"Patient/{x}"}},
                    {"resource": patient(y, gender), "request": {
                        "method": "PUT", "url": f"Patient/{y}", "ifMatch": 'W/"1"'}})
            one, two = pair(a, b, "female"), pair(b, a, "other")
        answers = await asyncio.gather(ingest.post("/fhir", json=one),
                                       ingest.post("/fhir", json=two))
        statuses = [r.status_code for r in answers]
        if variant == "if-match":  # the second to run finds version 2: its ifMatch fails
            assert sorted(statuses) == [200, 412], [r.text for r in answers]
        else:
            assert statuses == [200, 200], [r.text for r in answers]


async def test_concurrent_delete_only_transactions_in_any_order_queue_instead_of_deadlocking(
        ingest):
    """20 concurrent transactions deleting the same 6 Patients, each in its own order: each
    locks the rows its DELETE entries delete in (type, id) order before running them, so they
    queue; entries locking one by one in Bundle order deadlocked, and after three runs most
    answered 503. Every one answers 200 (the first to run deletes, the others find them
    deleted: 204 each)."""
    rng = random.Random(7)
    for _ in range(3):
        ids = [f"dd-{uuid.uuid4().hex[:8]}" for _ in range(6)]
        for rid in ids:  # created again for each round
            r = await ingest.put(f"/fhir/Patient/{rid}",
                                 json={"resourceType": "Patient", "id": rid})
            assert r.status_code == 201, r.text

        def deleting(order):
            return {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"request": {"method": "DELETE", "url": f"Patient/{rid}"}} for rid in order]}

        orders = [list(reversed(ids)) if n % 2 else list(ids) for n in range(10)]
        orders += [rng.sample(ids, len(ids)) for _ in range(10)]
        answers = await asyncio.gather(*(ingest.post("/fhir", json=deleting(order))
                                         for order in orders))
        assert [r.status_code for r in answers] == [200] * 20, [
            r.text for r in answers if r.status_code != 200][:2]
        for r in answers:
            assert [e["response"]["status"] for e in r.json()["entry"]] == ["204 No Content"] * 6
        for rid in ids:
            assert (await ingest.get(f"/fhir/Patient/{rid}")).status_code == 410
            history = (await ingest.get(f"/fhir/Patient/{rid}/_history")).json()
            assert history["total"] == 2  # created, deleted once


async def test_an_encounter_naming_more_performers_than_a_statement_takes_is_stored(ingest):
    """Its performers are looked up a few thousand ids at a time (one statement of all of them
    went past the 32,767 parameters PostgreSQL takes: 500)."""
    await ingest.put("/fhir/Practitioner/p32999", json={"resourceType": "Practitioner",
                                                        "id": "p32999"})
    encounter = {"resourceType": "Encounter", "id": "e-many", "status": "planned",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                           "code": "AMB"},
                 "participant": [{"individual": {"reference": f"Practitioner/p{n}"}}
                                 for n in range(33_000)]}
    r = await ingest.put("/fhir/Encounter/e-many", json=encounter)
    assert r.status_code == 201, r.text[:300]


async def _read_tenant_events(bootstrap: str, topics: list[str], tenant: str, expect: int,
                              timeout: float = 60) -> list[CloudEvent]:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: list[tuple[int, int, CloudEvent]] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found) < expect and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    # Only this test's practice's messages are read: the topics are shared
                    # with every other test (and any producer on a developer's broker).
                    if (r.key or b"").split(b":", 1)[0] != tenant.encode():
                        continue
                    event = CloudEvent.from_json(r.value)
                    if event.tenant == tenant:
                        assert r.key == event.kafka_key().encode()
                        assert b"Rivera" not in b"".join(v for _, v in r.headers)  # no PHI
                        found.append((r.timestamp, r.offset, event))
    finally:
        await consumer.stop()
    return [e for _, _, e in found]


async def test_pushed_bundle_events_reach_kafka_in_per_patient_order_and_follow_contracts(
    ingest, infra
):
    r = await ingest.post("/fhir", json=json.loads(BUNDLE.read_text()))
    assert r.status_code == 200, r.text
    patient = r.json()["entry"][1]["response"]["location"].split("/")[1]
    topics = list(discover_services()["ingest"].produces)
    # 1 org + 1 patient + 2 practitioners + 2 roles + 2 conditions + consent + plan + 2 times
    events = await _read_tenant_events(infra.kafka_bootstrap_servers, topics,
                                       ingest.practice, expect=12)
    assert len(events) == 12
    for event in events:
        assert_valid_event(json.loads(event.to_json()))
    mine = sorted((e for e in events if e.subject == f"Patient/{patient}"),
                  key=lambda e: e.sequence)
    assert [e.sequence for e in mine] == list(range(1, 8))
    assert {e.type for e in mine} == {
        "ingest.patient.upserted.v1", "ingest.condition.upserted.v1",
        "ingest.consent.granted.v1", "ingest.care-plan.created.v1",
        "ingest.time-entry.logged.v1"}
    # One partition per patient key: Kafka order within the partition is the sequence order.
    by_topic_order = [e.sequence for e in events if e.subject == f"Patient/{patient}"
                      and e.type == "ingest.time-entry.logged.v1"]
    assert by_topic_order == sorted(by_topic_order)


async def test_a_transaction_failing_after_its_creates_were_written_leaves_nothing_behind(ingest):
    """On PostgreSQL the creates go to the database in bulk (COPY, raw prepared INSERTs on the
    session's connection) before a later entry fails: they must roll back with it."""
    patient = f"urn:uuid:{uuid.uuid4()}"
    entries = [{"fullUrl": patient, "request": {"method": "POST", "url": "Patient"},
                "resource": {"resourceType": "Patient", "name": [{"family": "Rollback"}]}}]
    entries += [{"request": {"method": "POST", "url": "Encounter"}, "resource": {
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99490"}]}],
        "subject": {"reference": patient}, "identifier": [{"system": "urn:x", "value": str(i)}],
        "period": {"start": "2026-03-02T10:00:00-05:00", "end": "2026-03-02T10:20:00-05:00"}}}
        for i in range(30)]
    # Runs after every POST (FHIR order) and fails: the resource does not exist at version 3.
    entries.append({"request": {"method": "PUT", "url": "Patient/never-there", "ifMatch": 'W/"3"'},
                    "resource": {"resourceType": "Patient", "id": "never-there"}})
    outbox, _, sequences = messaging_tables(resources.metadata)

    async def rows() -> dict[str, int]:
        async with ingest.runtime.db.engine.connect() as conn:
            return {t.name: (await conn.execute(select(func.count()).select_from(t).where(
                t.c.tenant == ingest.practice))).scalar_one()
                for t in (resources, resource_versions, resource_identifiers, outbox, sequences)}

    # A first write warms the practice cache: then nothing but the bulk writes (no SQLAlchemy
    # statement, which would BEGIN) runs before the failing entry.
    first = await ingest.post("/fhir/Patient", json={"resourceType": "Patient"})
    assert first.status_code == 201
    before = await rows()
    r = await ingest.post("/fhir", json={"resourceType": "Bundle", "type": "transaction",
                                         "entry": entries})
    assert r.status_code == 412, r.text
    assert r.json()["issue"][0]["expression"] == ["Bundle.entry[31].request.ifMatch"]
    assert await rows() == before


async def test_stored_text_and_times_survive_postgresql_exactly(ingest):
    """Rows reach PostgreSQL as JSON text (json_to_recordset): quotes, backslashes, line breaks,
    non-BMP characters, JSON-looking strings and microsecond times with offsets come back as
    sent, and the identifiers and event rows of the same statement are right."""
    tricky = 'Zoë "quoted" \\back\\slash\nline\ttab 😀 \u2028 {"json": [1]} \\u0041'
    patient = {"resourceType": "Patient", "active": True,
               "meta": {"lastUpdated": "2026-03-04T05:06:07.123456-05:00"},
               "identifier": [{"system": "urn:mrn", "value": tricky}],
               "name": [{"family": tricky, "given": ["Ann"]}]}
    created = await ingest.post("/fhir/Patient", json=patient)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    read = (await ingest.get(f"/fhir/Patient/{rid}")).json()
    assert read["name"] == patient["name"] and read["identifier"] == patient["identifier"]
    assert read["meta"]["lastUpdated"] == "2026-03-04T10:06:07.123456+00:00"
    found = await ingest.get("/fhir/Patient", params={"identifier": f"urn:mrn|{tricky}"})
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [rid]
    outbox = messaging_tables(discover_services()["ingest"].metadata)[0]
    async with ingest.runtime.db.engine.connect() as conn:
        stored, text = (await conn.execute(select(
            resource_versions.c.last_updated, resource_versions.c.resource).where(
            resource_versions.c.tenant == ingest.practice,
            resource_versions.c.id == rid))).one()
        state = (await conn.execute(select(resources.c.ccm_state).where(
            resources.c.tenant == ingest.practice, resources.c.id == rid))).scalar_one()
        payloads = (await conn.execute(select(outbox.c.payload).where(
            outbox.c.tenant == ingest.practice,
            outbox.c.event_type == "ingest.patient.upserted.v1"))).scalars().all()
    assert stored.isoformat() == "2026-03-04T10:06:07.123456+00:00"
    # The version's text is its compact JSON (not a JSON string of it), as the CCM state's is.
    assert text == compact(read) and json.loads(state) == {}
    (event,) = [CloudEvent.from_json(p) for p in payloads
                if CloudEvent.from_json(p).data["source"]["id"] == rid]

    def strings(value):
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert tricky in strings(event.data)
    history = f"/fhir/Patient/{rid}/_history"
    since = (await ingest.get(history, params={"_since": "2026-03-04T10:06:07Z"})).json()
    assert since["total"] == 1 and since["entry"][0]["response"]["status"] == "201"
    after = (await ingest.get(history, params={"_since": "2026-03-04T05:06:08-05:00"})).json()
    assert after["total"] == 0 and "entry" not in after


async def test_a_number_orjson_cannot_write_is_stored_as_sent_on_postgresql(ingest):
    """A decimal beyond 64 bits (FHIR decimals have no limit) makes the rows' JSON fall back to
    the documents' text, in the same statement as an ordinary resource's rows."""
    big = 123456789012345678901234567890
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Patient"}, "resource": {
            "resourceType": "Patient", "extension": [
                {"url": "http://example.org/big", "valueDecimal": big}]}},
        {"request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient", "active": True}}]}
    answer = await ingest.post("/fhir", content=json.dumps(bundle),
                               headers={"Content-Type": "application/fhir+json"})
    assert answer.status_code == 200, answer.text
    ids = [e["response"]["location"].split("/")[1] for e in answer.json()["entry"]]
    async with ingest.runtime.db.engine.connect() as conn:
        texts = dict((await conn.execute(select(
            resource_versions.c.id, resource_versions.c.resource).where(
            resource_versions.c.tenant == ingest.practice,
            resource_versions.c.id.in_(ids)))).all())
    assert f'"valueDecimal":{big}' in texts[ids[0]]
    assert json.loads(texts[ids[0]])["extension"][0]["valueDecimal"] == big
    assert json.loads(texts[ids[1]])["active"] is True


async def test_consent_expiry_notices_on_postgresql_reach_kafka_once(ingest, infra):
    """The pass reads the consents' end day out of their JSON state (jsonb on PostgreSQL), and
    concurrent passes (replicas) send each notice once, none failing: rows another pass holds
    are skipped, and notices another pass recorded first are left out."""
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    from ccm_ingest.service_layer.expiry import EXPIRING, expiry_pass

    now = ingest.runtime.clock()
    today = now.astimezone(ZoneInfo("America/New_York")).date()
    consent = next(e["resource"] for e in json.loads(BUNDLE.read_text())["entry"]
                   if e["resource"]["resourceType"] == "Consent")
    r = await ingest.put("/fhir/Patient/px", json={"resourceType": "Patient", "id": "px"})
    assert r.status_code == 201, r.text
    due = {f"soon-{n}": n for n in range(1, 13)}
    for cid, days in {**due, "far": 200}.items():
        body = {**consent, "id": cid, "patient": {"reference": "Patient/px"},
                "performer": [{"reference": "Patient/px"}],
                "provision": {"type": "permit", "period": {
                    "start": "2026-01-01", "end": (today + timedelta(days=days)).isoformat()}}}
        r = await ingest.put(f"/fhir/Consent/{cid}", json=body)
        assert r.status_code == 201, r.text
    db = ingest.runtime.db
    passes = await asyncio.gather(*(expiry_pass(db, now, batch_size=3,
                                                practices=[ingest.practice])
                                    for _ in range(6)))
    assert [p.failed for p in passes] == [[]] * 6
    assert sum(p.sent for p in passes) == len(due)
    assert (await expiry_pass(db, now, practices=[ingest.practice])).sent == 0
    ingest.runtime.relay.notify()
    events = await _read_tenant_events(infra.kafka_bootstrap_servers, [EXPIRING],
                                       ingest.practice, expect=len(due), timeout=30)
    assert sorted((e.data["consent"], e.data["daysLeft"]) for e in events) == sorted(
        (f"Consent/{cid}", days) for cid, days in due.items())
    assert {e.subject for e in events} == {"Patient/px"}
    for event in events:
        assert_valid_event(json.loads(event.to_json()))
