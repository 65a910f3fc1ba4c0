"""The administrator's walkthrough on real PostgreSQL and Apache Kafka: October is billed on a
care plan pushed on 28 November (after the month, before its close) and two chronic conditions;
an Encounter is entered in error after the close. The packet's October holds that care plan and
those conditions (FHIR and PDF alike, the late receipt said plainly), and the time log's locked
view shows the Encounter as the close locked it, with its reversal as a correction."""

import re
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
from tests.unit.billing.test_packet_evidence import care_plan, condition, pdf_text

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_billed_months_packet_holds_its_care_plan_conditions_and_locked_time(infra, kafka):
    clock = Clock(datetime(2026, 11, 28, 20, tzinfo=UTC))
    runtime = await billing_on_kafka(infra, kafka, clock, "billing-packet-evidence-it")
    practice, other = (f"pkt-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for p in (practice, other):
        await create_practice(runtime.db.engine, practice_id=p, name=f"Clinic {p}",
                              timezone="America/Chicago", pricing=PRICING)
    headers, other_headers = [
        {"Authorization": f"Bearer {await create_token(runtime.db.engine, practice_id=p)}"}
        for p in (practice, other)]
    events = [ev.patient(practice, "sr11"),
              cev.consent(practice, "sr11", "c1", obtained="2026-09-15T10:00:00-05:00"),
              ev.role(practice, "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
              condition(practice, "sr11", "k1", updated="2026-02-01T12:00:00Z", code="E11.9"),
              condition(practice, "sr11", "k2", updated="2026-02-01T12:00:00Z", code="I10"),
              cev.time_logged(practice, "sr11", "e1", 1500, "2026-10-05T10:00:00-05:00"),
              cev.time_logged(practice, "sr11", "e2", 1200, "2026-10-19T10:00:00-05:00"),
              # Created in the EHR on 10 March, pushed to the platform on 28 November.
              care_plan(practice, "sr11", "sr11-cp", version=1, created="2026-03-10",
                        updated="2026-11-28T19:00:00Z"),
              # The same ids in another practice: never part of this one's packet.
              care_plan(other, "sr11", "sr11-cp", version=5, status="revoked",
                        updated="2026-10-01T12:00:00Z"),
              condition(other, "sr11", "k9", updated="2026-02-01T12:00:00Z")]
    await runtime.start(background=False)
    try:
        await kafka.send_batch([to_message(e.type, e) for e in events])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                     base_url="http://billing") as client:
            base = f"/v1/practices/{practice}"

            async def billable() -> bool:
                r = await client.get(f"{base}/billing-periods/2026-10/worklist", headers=headers)
                rows = r.json().get("patients", []) if r.status_code == 200 else []
                return bool(rows) and rows[0]["blockers"] == [] and bool(rows[0]["codes"])

            await eventually(billable, timeout=60, what="October to be billable for sr11")
            clock.now = datetime(2026, 11, 28, 22, tzinfo=UTC)
            r = await client.post(f"{base}/billing-periods/2026-10/close", headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["summary"]["patientsBillable"] == 1

            clock.now = datetime(2026, 11, 29, 16, tzinfo=UTC)
            reversal = cev.time_reversed(practice, "sr11", "e2", updated="2026-11-29T15:00:00Z")
            await kafka.send_batch([to_message(reversal.type, reversal)])
            log: dict = {}

            async def corrected() -> bool:
                r = await client.get(f"{base}/patients/sr11/time-log", params={"month": "2026-10"},
                                     headers=headers)
                log.clear()
                log.update(r.json())
                return len(log.get("filings", [])) == 2

            await eventually(corrected, timeout=60, what="the reversal to be filed")
            e2 = next(e for e in log["entries"] if e["entry"] == "e2")
            assert (e2["status"], e2["counted"], e2["seconds"], e2["source"]["versionId"]) == (
                "finished", True, 1200, "1")
            (correction,) = e2["corrections"]
            assert (correction["versionId"], correction["status"]) == ("2", "entered-in-error")
            assert correction["filing"]["revision"] == 1
            assert correction["filing"]["counted"] is False

            r = await client.get(f"{base}/patients/sr11/audit-packet",
                                 params={"from": "2026-10", "to": "2026-11"}, headers=headers)
            assert r.status_code == 200, r.text
            doc = r.json()
            Bundle.model_validate(doc)
            assert doc["type"] == "collection"
            by_key = {e["fullUrl"].removeprefix("urn:ccm:"): e["resource"] for e in doc["entry"]}
            lists = {x["title"][-7:]: [i["item"]["reference"] for i in x["entry"]]
                     for x in by_key.values() if x["resourceType"] == "List"}
            october = lists["2026-10"]
            assert "CarePlan/sr11-cp/_history/1" in october
            assert {r for r in october if r.startswith("Condition/")} == {
                "Condition/k1/_history/1", "Condition/k2/_history/1"}
            (basic,) = [by_key[r] for r in october if r.startswith("Basic/")]
            parts = basic["extension"][0]["extension"]
            (plan,) = [x for x in parts if x["url"] == "carePlan"]
            plan = {x["url"]: next(v for k, v in x.items() if k.startswith("value"))
                    for x in plan["extension"]}
            assert plan["inForce"] is True and plan["receivedAfterMonth"] is True
            counted = [x["valueInteger"] for x in parts if x["url"] == "chronicConditionsCounted"]
            assert counted == [2]
            encounter = by_key["Encounter/e2"]
            assert (encounter["status"], encounter["meta"]["versionId"]) == ("finished", "1")
            assert any(x["url"].endswith("/ccm-correction") for x in encounter["extension"])
            assert not any("_history/5" in k or "Condition/k9" in k for k in by_key)

            pdf = await client.get(f"{base}/patients/sr11/audit-packet",
                                   params={"from": "2026-10", "format": "pdf"}, headers=headers)
            assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
            text = pdf_text(pdf.content)
            plan_part = text.split("Care plan The care plan(s)")[1].split("Review evidence")[0]
            assert "None on record" not in plan_part
            assert "CarePlan/sr11-cp 1 active 2026-03-10" in plan_part
            assert "was received on 2026-11-28, after this month's services" in plan_part
            assert ": 2 (at least 2 required: met)" in text
            locked = r"e2 2026-10-19T15:00 Practitioner/nurse-1 staff 20\.0 yes - v1 "
            assert re.search(locked, text)
            assert "Correction after the lock: Encounter/e2 version 2" in text
            assert "reads and writes of this patient's data" not in text

            for path, params in ((f"{base}/patients/sr11/audit-packet", {"from": "2026-10"}),
                                 (f"{base}/patients/sr11/time-log", {"month": "2026-10"})):
                r = await client.get(path, params=params, headers=other_headers)
                assert r.status_code == 404, (path, r.text)
    finally:
        await runtime.stop()
