"""The compliance officer's walkthrough (findings 3, 6, 8, 9 and the packet side of 2) on real
PostgreSQL: September is closed without a consent; in November the EHR writes a consent dated
August (in the platform's audit log, as ingest records it), the vendor recomputes September
(billed), and the patient's MBI changes. September's packet, asked for with an admin token,
holds the EHR's November write and the close and recompute requests (who: token label and id),
the MBI September was billed under beside today's, the consent's performer, period and time,
and a check that September is billed under a consent received after it; a practice ERP's
``billing:read`` token gets 403."""

import uuid
from datetime import UTC, datetime

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from ccm_billing.service_layer.projections import apply_event
from ccm_shared.audit import AuditRecord, record_now
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import create_practice, create_token
from ccm_shared.transport import InProcessTransport
from tests.unit.billing import compliance_events as cev
from tests.unit.billing import events as ev
from tests.unit.billing.conftest import PRICING, Clock
from tests.unit.billing.test_packet_evidence import condition, decision_ext, pdf_text

pytestmark = pytest.mark.asyncio(loop_scope="session")


def consent(practice: str, *, received: str) -> object:
    return ev.event(practice, "ingest.consent.granted.v1", "p12", {
        "source": cev.src("Consent", "p12-consent", 1, received, received),
        "consent": "Consent/p12-consent", "patient": "Patient/p12", "status": "active",
        "obtainedAt": "2025-08-01T10:00:00-04:00", "method": "verbal",
        "period": {"start": "2025-08-01"}, "provision": "permit",
        "practitioners": ["Practitioner/doc-1"], "categories": [], "effectiveUntil": None})


async def test_septembers_packet_holds_its_trail_billed_mbi_and_consent_on_postgres(infra):
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    clock = Clock(datetime(2025, 9, 20, 15, tzinfo=UTC))
    runtime = ServiceRuntime.build(definition, load_settings(database_url=infra.database_url),
                                   transport=InProcessTransport(), clock=clock)
    db, practice = runtime.db, f"trail-{uuid.uuid4().hex[:10]}"
    # An MBI of this run only: the database outlives runs (a duplicate biller otherwise).
    mbi, new_mbi = (f"{n}{uuid.uuid4().hex[:10].upper()}" for n in (1, 9))
    await create_practice(db.engine, practice_id=practice, name="Trail Clinic",
                          timezone="America/New_York", pricing=PRICING)
    staff = {"Authorization": "Bearer " + await create_token(
        db.engine, practice_id=practice, label="vendor-staff")}
    erp = {"Authorization": "Bearer " + await create_token(
        db.engine, practice_id=practice, label="erp", scopes=("billing:read",))}

    async def deliver(*events) -> None:
        for event in events:
            async with db.unit_of_work() as uow:
                await apply_event(event, uow, now=clock())
                await uow.commit()

    try:
        await deliver(ev.patient(practice, "p12", mbi=mbi),
                      ev.role(practice, "nurse-1", "clinical-staff",
                              practitioner="Practitioner/nurse-1"),
                      cev.care_plan(practice, "p12", "p12-cp", version=1,
                                    updated="2025-01-05T12:00:00Z"),
                      condition(practice, "p12", "p12-k1", updated="2025-01-05T12:00:00Z"),
                      condition(practice, "p12", "p12-k2", updated="2025-01-05T12:00:00Z"),
                      cev.time_logged(practice, "p12", "p12-e1", 1500,
                                      "2025-09-03T10:00:00-04:00"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                     base_url="http://billing") as client:
            base = f"/v1/practices/{practice}"
            clock.now = datetime(2025, 10, 2, 15, tzinfo=UTC)
            r = await client.post(f"{base}/billing-periods/2025-09/close", headers=staff)
            assert r.status_code == 200, r.text
            clock.now = datetime(2025, 11, 29, 14, tzinfo=UTC)
            await record_now(db.engine, AuditRecord(
                practice=practice, service="ingest", actor_type="client", actor="tok-ehr",
                actor_label="ehr", action="U", what="PUT /fhir/{rtype}/{rid}",
                entity="Consent/p12-consent", patient="p12"))
            await deliver(consent(practice, received="2025-11-29T13:57:38Z"))
            clock.now = datetime(2025, 11, 29, 15, tzinfo=UTC)
            r = await client.post(f"{base}/billing-periods/2025-09/recompute", headers=staff,
                                  json={"reason": "consent received late"})
            assert r.status_code == 200, r.text
            clock.now = datetime(2025, 11, 30, 15, tzinfo=UTC)
            await deliver(ev.patient(practice, "p12", mbi=new_mbi, version=2))

            packet = f"{base}/patients/p12/audit-packet"
            for fmt in ("fhir", "pdf"):  # the ERP's token reads no audit trail
                r = await client.get(packet, headers=erp, params={"from": "2025-09",
                                                                  "format": fmt})
                assert r.status_code == 403 and "'admin' scope" in r.text, r.text
            r = await client.get(packet, headers=staff, params={"from": "2025-09"})
            assert r.status_code == 200, r.text
            doc = r.json()
            Bundle.model_validate(doc)
            by_key = {e["fullUrl"].removeprefix("urn:ccm:"): e["resource"] for e in doc["entry"]}
            (listing,) = [x for x in by_key.values() if x["resourceType"] == "List"]
            refs = [i["item"]["reference"] for i in listing["entry"]]

            trail = [x for x in by_key.values() if x["resourceType"] == "AuditEvent"]
            said = {next(e["valueString"] for e in x["extension"][0]["extension"]
                         if e["url"] == "operation"): x for x in trail}
            assert said["PUT /fhir/{rtype}/{rid}"]["agent"][0]["who"]["display"] == "ehr"
            for op in ("close", "recompute"):
                act = said[f"POST /v1/practices/{{practice}}/billing-periods/{{month}}/{op}"]
                assert act["agent"][0]["who"]["display"] == "vendor-staff"
                path = f"{base}/billing-periods/2025-09/{op}"
                assert act["entity"][0]["what"]["reference"] == path
                assert f"AuditEvent/{act['id']}" in refs
            basic = decision_ext(by_key, refs)
            assert [(r["operation"], r["by"]) for r in basic["request"]] == [
                ("close", "vendor-staff"), ("recompute", "vendor-staff")]
            assert [f["reason"] for f in basic["filing"]][1:] == ["consent received late"]

            (billed,) = basic["billedMbi"]
            assert billed["identifier"]["value"] == mbi and billed["currentMbi"] is False
            assert [(i["use"], i["value"]) for i in by_key["Patient/p12"]["identifier"]] == [
                ("official", new_mbi), ("old", mbi)]

            c = by_key["Consent/p12-consent"]
            assert c["performer"] == [{"reference": "Practitioner/doc-1"}]
            assert c["provision"]["period"] == {"start": "2025-08-01"}
            assert c["dateTime"] == "2025-08-01T10:00:00-04:00"
            late = [x for x in basic.get("evidenceCheck", []) if "Consent/p12-consent" in x]
            codes = [x for x in by_key[next(r for r in refs if r.startswith("Basic/"))][
                "extension"][0]["extension"] if x["url"] == "code"]
            assert codes and late, basic  # billed under it, and the packet says how late
            assert "first received on 2025-11-29" in late[0]

            r = await client.get(packet, headers=staff, params={"from": "2025-09",
                                                                "format": "pdf"})
            assert r.status_code == 200 and r.content.startswith(b"%PDF-")
            text = pdf_text(r.content)
            assert f"MBI billed {mbi} (2025-09)" in text
            assert "recompute vendor-staff (token " in text
            assert "Check: The month is billed under Consent/p12-consent" in text
    finally:
        await db.dispose()
