"""Compliance records on real PostgreSQL and Apache Kafka: ingest and careplan events on Kafka →
billing's evidence → months closed → a correction after close → time log with the correction as a
new filing → audit packet (FHIR Bundle validated with fhir.resources.R4B, and the PDF) →
consent tracker; another practice's requests answer 404."""

import hashlib
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from ccm_shared.events import to_message
from ccm_shared.tenancy import create_practice, create_token
from tests.integration.billing.test_billing_on_kafka_and_postgres import billing_on_kafka
from tests.integration.conftest import eventually
from tests.unit.billing import compliance_events as cev
from tests.unit.billing import events as ev
from tests.unit.billing.conftest import PRICING, Clock

pytestmark = pytest.mark.asyncio(loop_scope="session")

ENTRIES = {"2025-01": {"ja": 1500, "jb": 1200}, "2025-02": {"fa": 1500, "fb": 1200},
           "2025-03": {"ma": 1300}}


async def test_packet_time_log_and_tracker_on_real_infrastructure(infra, kafka):
    clock = Clock(datetime(2025, 1, 20, 15, tzinfo=UTC))
    runtime = await billing_on_kafka(infra, kafka, clock, "billing-compliance-it")
    practice, other = (f"comp-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for p in (practice, other):
        await create_practice(runtime.db.engine, practice_id=p, name=f"Clinic {p}",
                              timezone="America/New_York", pricing=PRICING)
    headers = {"Authorization": f"Bearer {await create_token(runtime.db.engine, practice_id=practice)}"}
    other_headers = {"Authorization": f"Bearer {await create_token(runtime.db.engine, practice_id=other)}"}
    # An MBI of this run only: the database outlives runs, and the same MBI with time in another
    # (earlier run's) practice this month is a duplicate biller, which bills nothing.
    mbi = f"1EG4TE5{uuid.uuid4().hex[:4].upper()}"
    events = [ev.patient(practice, "p1", mbi=mbi),
              cev.consent(practice, "p1", "c1", method="verbal"),
              cev.care_plan(practice, "p1", "cp1", version=1, updated="2024-12-01T12:00:00Z"),
              ev.condition(practice, "p1", "k1"), ev.condition(practice, "p1", "k2"),
              ev.role(practice, "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
              cev.review_completed(practice, "p1", "cp1", due="2025-02-15",
                                   completed="2025-02-10T15:00:00+00:00"),
              # p2: consent revoked mid-February (in force to the month end), then no consent.
              ev.patient(practice, "p2"),
              cev.consent(practice, "p2", "c2"),
              cev.consent(practice, "p2", "c2", status="inactive", version=2,
                          updated="2025-02-12T16:00:00Z", effective_until="2025-02-28"),
              ev.patient(practice, "p3")]
    sha = {}
    for month, entries in ENTRIES.items():
        for n, (entry, seconds) in enumerate(entries.items()):
            e = cev.time_logged(practice, "p1", entry, seconds, f"{month}-{3 + 10 * n:02d}T10:00:00-05:00")
            sha[entry] = e.data["source"]["sha256"]
            events.append(e)
    await runtime.start(background=False)
    try:
        await kafka.send_batch([to_message(e.type, e) for e in events + events[-3:]])  # + duplicates
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                     base_url="http://billing") as client:
            base = f"/v1/practices/{practice}"

            async def all_arrived() -> bool:
                r = await client.get(f"{base}/consents", params={"state": "all"}, headers=headers)
                states = {x["patient"]: x["state"] for x in r.json().get("patients", [])}
                log = await client.get(f"{base}/patients/p1/time-log", params={"month": "2025-03"},
                                       headers=headers)
                # ... and February's time counts, so the role, conditions and care plan (other
                # topics, read in any order) are in too before the months close.
                feb = await client.get(f"{base}/patients/p1/time-log",
                                       params={"month": "2025-02"}, headers=headers)
                return (states.get("Patient/p2") == "revoked" and log.status_code == 200
                        and len(log.json()["entries"]) == 1 and feb.status_code == 200
                        and [e["counted"] for e in feb.json()["entries"]] == [True, True])

            await eventually(all_arrived, timeout=60, what="the events to reach billing")
            for month in ENTRIES:
                y, m = map(int, month.split("-"))
                clock.now = datetime(y, m + 1, 2, 12, tzinfo=UTC)
                r = await client.post(f"{base}/billing-periods/{month}/close", headers=headers)
                assert r.status_code == 200, r.text
            tracker = (await client.get(f"{base}/consents", headers=headers)).json()
            assert {x["patient"]: x["state"] for x in tracker["patients"]} == {
                "Patient/p2": "revoked", "Patient/p3": "missing"}

            # February's second entry was entered in error, after February closed.
            reversal = cev.time_reversed(practice, "p1", "fb", updated="2025-03-06T12:00:00Z")
            await kafka.send_batch([to_message(reversal.type, reversal)])
            log = {}

            async def corrected() -> bool:
                r = await client.get(f"{base}/patients/p1/time-log", params={"month": "2025-02"},
                                     headers=headers)
                log.update(r.json())
                return len(log.get("filings", [])) == 2

            await eventually(corrected, timeout=60, what="the correction to be filed")
            rows = {e["entry"]: e for e in log["entries"]}
            assert rows["fb"]["source"]["sha256"] == sha["fb"]  # as locked at close
            assert [c["versionId"] for c in rows["fb"]["corrections"]] == ["2"]
            assert log["filings"][1]["countedRemoved"] == ["fb"]

            r = await client.get(f"{base}/patients/p1/audit-packet",
                                 params={"from": "2025-01", "to": "2025-03"}, headers=headers)
            assert r.status_code == 200, r.text
            assert hashlib.sha256(r.content).hexdigest() == r.headers["x-packet-sha256"]
            doc = r.json()
            Bundle.model_validate(doc)
            by_ref = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
                      for e in doc["entry"]}
            lists = sorted((x for x in by_ref.values() if x["resourceType"] == "List"),
                           key=lambda x: x["title"])
            items = (await client.get("/fhir/ChargeItem", params={"subject": "Patient/p1"},
                                      headers=headers)).json()
            stored = {e["resource"]["id"]: e["resource"] for e in items["entry"]}
            for month, listing in zip(ENTRIES, lists, strict=True):
                refs = [x["item"]["reference"] for x in listing["entry"]]
                assert {r.split("/")[1] for r in refs if r.startswith("Encounter/")} == set(ENTRIES[month])
                charge_ids = {r.split("/")[1] for r in refs if r.startswith("ChargeItem/")}
                assert charge_ids == {i for i, x in stored.items()
                                      if x["occurrencePeriod"]["start"].startswith(month)}
            assert any(r.startswith("Task/") for r in
                       (x["item"]["reference"] for x in lists[1]["entry"]))  # February's review
            pdf = await client.get(f"{base}/patients/p1/audit-packet",
                                   params={"from": "2025-02", "format": "pdf"}, headers=headers)
            assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")

            for path, params in ((f"{base}/patients/p1/audit-packet", {"from": "2025-01"}),
                                 (f"/v1/practices/{other}/patients/p1/audit-packet", {"from": "2025-01"}),
                                 (f"{base}/patients/p1/time-log", {"month": "2025-01"}),
                                 (f"{base}/consents", {})):
                r = await client.get(path, params=params, headers=other_headers)
                assert r.status_code == 404, (path, r.text)
    finally:
        await runtime.stop()
