"""Billing on real PostgreSQL and Apache Kafka: ingest events on Kafka → projections →
worklist → close → Invoice event on Kafka and FHIR reads → a correction → cancel and reissue."""

import asyncio
import json
import random
import string
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from fhir.resources.R4B.chargeitem import ChargeItem
from fhir.resources.R4B.invoice import Invoice
from sqlalchemy import text

from ccm_billing.service_layer.projections import TOPICS
from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.db import Database, create_engine_for
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import create_practice, create_token
from ccm_shared.transport import KafkaTransport
from tests.integration.conftest import eventually
from tests.support.kafka_read import partitions_of, start_group_at_end
from tests.unit.billing import compliance_events as cev
from tests.unit.billing import events as ev
from tests.unit.billing.conftest import PRICING, Clock

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def read_to_end(bootstrap: str, topic: str) -> list[CloudEvent]:
    """Every event on the topic up to its current end (the topic is shared with other runs)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, max_partition_fetch_bytes=16 * 2**20)
    await consumer.start()
    try:
        partitions = await partitions_of(bootstrap, [topic])
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        events = []
        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=500)).values():
                events.extend(CloudEvent.from_json(r.value) for r in records)
        return events
    finally:
        await consumer.stop()


async def billing_events(bootstrap: str, topic: str, practice: str, expect: int) -> list[CloudEvent]:
    found: list[CloudEvent] = []

    async def arrived() -> bool:
        found[:] = [e for e in await read_to_end(bootstrap, topic) if e.tenant == practice]
        return len(found) >= expect

    await eventually(arrived, timeout=60, interval=0.5, what=f"{expect} {topic} events of {practice}")
    return found


async def billing_on_kafka(infra, kafka, clock: Clock, name: str,  # noqa: ANN001
                           schema: str | None = None) -> ServiceRuntime:
    """The billing service on the real infrastructure (schema migrated: billing's, or
    ``schema``), its projections consumer in a fresh group (``name``-…) positioned at the
    topics' ends; not started."""
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, schema or definition.schema,
                        definition.migrations_package)
    settings = load_settings(database_url=infra.database_url,
                             kafka_bootstrap_servers=infra.kafka_bootstrap_servers)
    transport = KafkaTransport(infra.kafka_bootstrap_servers, client_id=f"ccm-{name}")
    db = (Database(infra.database_url, schema=schema, pool_size=settings.db_pool_size)
          if schema else None)  # None: the service's own
    runtime = ServiceRuntime.build(definition, settings, transport=transport, clock=clock, db=db)
    group = f"{name}-{uuid.uuid4().hex[:8]}"
    await kafka.ensure_topics(TOPICS)
    await start_group_at_end(infra.kafka_bootstrap_servers, group, TOPICS)
    spec = definition.consumers(runtime)[0]
    runtime.consumers = [ConsumerRuntime(name=group, topics=spec.topics, handler=spec.handler,
                                         db=runtime.db, transport=transport)]
    return runtime


async def test_month_close_and_correction_on_real_infrastructure(infra, kafka):
    clock = Clock(datetime(2025, 3, 20, 15, tzinfo=UTC))
    runtime = await billing_on_kafka(infra, kafka, clock, "billing-it")
    practice = f"bill-{uuid.uuid4().hex[:8]}"
    await create_practice(runtime.db.engine, practice_id=practice, name="Integration Clinic",
                          timezone="America/New_York", pricing=PRICING)
    token = await create_token(runtime.db.engine, practice_id=practice)
    headers = {"Authorization": f"Bearer {token}"}
    await runtime.start(background=False)
    try:
        ingest = [*ev.enrolled_patient(practice, "p1"), *ev.enrolled_patient(practice, "p2"),
                  ev.role(practice, "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  ev.time_logged(practice, "p1", "e1", 1500, "2025-03-03T10:00:00-05:00"),
                  ev.time_logged(practice, "p1", "e2", 1200, "2025-03-17T10:00:00-04:00"),
                  ev.time_logged(practice, "p2", "e3", 1199, "2025-03-05T10:00:00-05:00")]
        await kafka.send_batch([to_message(e.type, e) for e in ingest + ingest[-3:]])  # + duplicates
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                     base_url="http://billing") as client:
            base = f"/v1/practices/{practice}/billing-periods/2025-03"
            rows = {}

            async def worklist_complete() -> bool:
                r = await client.get(f"{base}/worklist", headers=headers)
                rows.clear()
                rows.update({x["patient"]: x for x in r.json()["patients"]})
                # One patient's events share a partition per topic, but consent, care plan,
                # conditions and time are on different topics: wait for all of p2's facts.
                p2 = rows.get("Patient/p2", {})
                waiting_for = {"consent-missing", "care-plan-missing",
                               "insufficient-chronic-conditions", "staff-role-unknown"}
                return (rows.get("Patient/p1", {}).get("codes") == {"99490": 1, "99439": 1}
                        and p2.get("seconds", {}).get("staff") == 1199
                        and not waiting_for & set(p2.get("blockers", [])))

            await eventually(worklist_complete, timeout=60, what="the worklist to show both patients")
            assert rows["Patient/p1"]["seconds"] == {"staff": 2700, "practitioner": 0}
            assert rows["Patient/p2"]["blockers"] == ["time-threshold-not-met"]
            assert rows["Patient/p2"]["minutesToNextThreshold"] == 1

            clock.now = datetime(2025, 4, 2, 12, tzinfo=UTC)
            closed = await client.post(f"{base}/close", headers=headers)
            assert closed.status_code == 200, closed.text
            assert (await client.post(f"{base}/close", headers=headers)).json() == closed.json()
            invoice_id = closed.json()["invoice"]["id"]
            issued = await billing_events(infra.kafka_bootstrap_servers, "billing.invoice.issued.v1",
                                          practice, 1)
            assert issued[0].data["invoiceId"] == invoice_id and issued[0].data["totalNet"] == "75.33"
            Invoice.model_validate(issued[0].data["invoice"])
            period = await billing_events(infra.kafka_bootstrap_servers, "billing.period.closed.v1",
                                          practice, 1)
            assert period[0].data["patientsBillable"] == 1

            fhir_invoice = (await client.get(f"/fhir/Invoice/{invoice_id}", headers=headers)).json()
            Invoice.model_validate(fhir_invoice)
            items = (await client.get("/fhir/ChargeItem", params={"subject": "Patient/p1"},
                                      headers=headers)).json()
            for entry in items["entry"]:
                ChargeItem.model_validate(entry["resource"])
            assert sorted(e["resource"]["code"]["coding"][0]["code"] for e in items["entry"]) == [
                "99439", "99490"]
            one = items["entry"][0]["resource"]  # filed in place: served from the decided lines
            assert (await client.get(f"/fhir/ChargeItem/{one['id']}", headers=headers)).json() == one
            report = (await client.get(f"{base}/report.json", headers=headers)).json()
            assert report["totals"]["amount"] == "75.33"

            # Correction after close: the 20-minute Encounter was entered in error.
            reversal = ev.time_reversed(practice, "p1", "e2")
            await kafka.send_batch([to_message(reversal.type, reversal)])
            cancelled = await billing_events(infra.kafka_bootstrap_servers,
                                             "billing.invoice.cancelled.v1", practice, 1)
            assert cancelled[0].data["invoiceId"] == invoice_id
            replacement = cancelled[0].data["replacedBy"]
            reissued = await billing_events(infra.kafka_bootstrap_servers,
                                            "billing.invoice.issued.v1", practice, 2)
            new = next(e for e in reissued if e.data["invoiceId"] == replacement)
            assert new.data["replaces"] == invoice_id and new.data["totalNet"] == "42.00"
            old = (await client.get(f"/fhir/Invoice/{invoice_id}", headers=headers)).json()
            assert old["status"] == "cancelled"
            after = (await client.get("/fhir/ChargeItem", params={"subject": "Patient/p1"},
                                      headers=headers)).json()
            assert sorted((e["resource"]["code"]["coding"][0]["code"], e["resource"]["status"])
                          for e in after["entry"]) == [
                ("99439", "entered-in-error"), ("99490", "billable"), ("99490", "entered-in-error")]
            # Concurrent PUTs of the EHR endpoint each replace it (delete-then-insert met on
            # the key: 500s); the last one stays.
            puts = await asyncio.gather(*(client.put(
                f"/v1/practices/{practice}/ehr-endpoint", headers=headers,
                json={"baseUrl": f"https://ehr{n}.example.org/fhir"}) for n in range(6)))
            assert [p.status_code for p in puts] == [200] * 6, [p.text for p in puts]
            kept = (await client.get(f"/v1/practices/{practice}/ehr-endpoint",
                                     headers=headers)).json()["baseUrl"]
            assert kept in {f"https://ehr{n}.example.org/fhir" for n in range(6)}
            await client.delete(f"/v1/practices/{practice}/ehr-endpoint", headers=headers)
            # A value PostgreSQL cannot store (a NUL in text) is the request's: 422, not 500.
            nul = await client.post(f"/v1/invoices/{replacement}/payments", headers=headers,
                                    json={"amount": "1.00", "date": "2025-04-20",
                                          "reference": "a\u0000b"})
            assert nul.status_code == 422, nul.text
            lone = await client.post(  # escaped as JSON has it: the client cannot encode it
                f"/v1/invoices/{replacement}/payments",
                headers={**headers, "Content-Type": "application/json"},
                content='{"amount": "1.00", "date": "2025-04-20", "reference": "Jane\\ud800Doe"}')
            assert lone.status_code == 422 and "Jane" not in lone.text, lone.text
            # Concurrent payments on PostgreSQL: one at a time, never beyond the total (each read
            # the same old balance before, and the last write won).
            tries = await asyncio.gather(*(client.post(
                f"/v1/invoices/{replacement}/payments", headers=headers,
                json={"amount": "21.00", "date": "2025-04-20", "reference": f"ach-{n}"})
                for n in range(4)))
            assert sorted(t.status_code for t in tries) == [201, 201, 422, 422]
            paid = max((t for t in tries if t.status_code == 201),
                       key=lambda t: t.json()["invoice"]["status"] == "balanced")
            assert paid.json()["invoice"]["status"] == "balanced"
            await billing_events(infra.kafka_bootstrap_servers, "billing.invoice.paid.v1", practice, 1)
            assert Decimal(json.loads(json.dumps(paid.json()))["invoice"]["balance"]) == 0
    finally:
        await runtime.stop()


async def test_the_longest_references_and_identifiers_are_applied_not_dead_lettered(infra, kafka):
    """A PractitionerRole id may have 64 characters (a FHIR id's most): "PractitionerRole/…" is
    81, and an MBI is any identifier value. Billing stores both (billing_0019): before, each
    such event failed on PostgreSQL six times and was dead-lettered, the time not billed and
    the old MBI kept. A value no column could hold is dead-lettered at once, never retried."""
    schema = f"t_wide_{uuid.uuid4().hex[:8]}"
    clock = Clock(datetime(2025, 3, 20, 15, tzinfo=UTC))
    runtime = await billing_on_kafka(infra, kafka, clock, "billing-wide", schema=schema)
    await kafka.ensure_topics([f"{t}.dlq" for t in TOPICS])
    consumer = runtime.consumers[0]
    practice = f"wide-{uuid.uuid4().hex[:8]}"
    await create_practice(runtime.db.engine, practice_id=practice, name="Wide Clinic",
                          timezone="America/New_York", pricing=PRICING)
    token = await create_token(runtime.db.engine, practice_id=practice)
    headers = {"Authorization": f"Bearer {token}"}
    role = "nurse." + "n" * 58
    assert len(f"PractitionerRole/{role}") == 81
    corrected = "8VD2D16CW69-CORRECTED-2026"
    # Beyond what a btree index entry holds (~2,700 bytes), and incompressible.
    huge = "".join(random.Random(19).choices(string.ascii_uppercase + string.digits, k=6000))
    moved = ev.patient(practice, "p1", mbi=corrected, version=2)
    moved.data["active"] = False
    poison = ev.time_logged(practice, "p2", "e9", 600, "2025-03-04T10:00:00-05:00")
    poison.data["source"]["versionId"] = "9" * 65  # the contract bounds it not; FHIR does
    await runtime.start(background=False)
    try:
        sent = [*ev.enrolled_patient(practice, "p1", mbi="1EG4TE5MK72"),
                ev.role(practice, role, "clinical-staff", practitioner="Practitioner/nurse-1"),
                ev.time_logged(practice, "p1", "e1", 1500, "2025-03-03T10:00:00-05:00",
                               role=f"PractitionerRole/{role}"),
                ev.consent(practice, "p2", "c-p2", practitioner=f"PractitionerRole/{role}"),
                ev.patient(practice, "p2", mbi=huge), moved, poison]
        review = cev.review_completed(practice, "p1", "cp-p1", due="2025-03-10",
                                      completed="2025-03-09T12:00:00+00:00")
        review.data["responsibleProvider"] = f"PractitionerRole/{role}"
        sent.append(review)
        await kafka.send_batch([to_message(e.type, e) for e in sent])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                     base_url="http://billing") as client:
            row = {}

            async def billed() -> bool:
                r = await client.get(f"/v1/practices/{practice}/billing-periods/2025-03/worklist",
                                     headers=headers)
                row.update(next((x for x in r.json()["patients"]
                                 if x["patient"] == "Patient/p1"), {}))
                return (row.get("codes") == {"99490": 1} and consumer.stats.dead_lettered
                        and consumer.stats.applied >= len(sent) - 1)

            await eventually(billed, timeout=60, what="p1's 25 minutes by the 81-character role")
            # Billing's /fhir on PostgreSQL: a refused search parameter or a NUL, which the
            # database cannot compare, is a 400 OperationOutcome (was 422 problem+json).
            for path, params in (("/fhir/Invoice", {"_count": "5000"}),
                                 ("/fhir/ChargeItem", {"_offset": "-1"}),
                                 ("/fhir/Invoice", {"_id": "x\x00"}),
                                 ("/fhir/ChargeItem/x%00", {}),
                                 ("/fhir/Invoice", {"foo": "bar"})):
                r = await client.get(path, params=params, headers=headers)
                assert (r.status_code, r.headers["content-type"], r.json()["resourceType"]) == (
                    400, "application/fhir+json", "OperationOutcome"), (path, params, r.text)
        assert row["seconds"] == {"staff": 1500, "practitioner": 0}
        q = f'"{schema}"'
        async with runtime.db.engine.connect() as conn:
            patients = dict((await conn.execute(text(
                f"SELECT patient_id, mbi || ':' || active FROM {q}.patients WHERE practice = :p"),
                {"p": practice})).all())
            stored = (await conn.execute(text(
                f"SELECT (SELECT practitioner FROM {q}.consents WHERE practice = :p "
                "AND consent_id = 'c-p2'), "
                f"(SELECT responsible_provider FROM {q}.care_plan_reviews WHERE practice = :p), "
                f"(SELECT count(*) FROM {q}.time_entries WHERE practice = :p AND entry_id = 'e9')"),
                {"p": practice})).one()
            dead = (await conn.execute(text(
                f"SELECT count(*) FROM {q}.inbox WHERE outcome = 'dead-lettered' AND tenant = :p"),
                {"p": practice})).scalar()
        assert patients == {"p1": f"{corrected}:false", "p2": f"{huge}:true"}
        assert stored == (f"PractitionerRole/{role}", f"PractitionerRole/{role}", 0)
        # The event whose versionId no column holds: set aside at its first attempt.
        assert (dead, consumer.stats.dead_lettered, consumer.stats.retries) == (1, 1, 0)
    finally:
        await runtime.stop()
        engine = create_engine_for(infra.database_url, schema=schema, pool_size=1)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()
