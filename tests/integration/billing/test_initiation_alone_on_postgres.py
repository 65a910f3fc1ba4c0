"""A month that bills G0506 alone, on real PostgreSQL: decided by the decider, filed in place
by the close (the Invoice's lines built by PostgreSQL), read as FHIR, and corrected by cancel
and reissue when its initiating visit is entered in error."""

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import orjson
import pytest
from fhir.resources.R4B.chargeitem import ChargeItem
from fhir.resources.R4B.invoice import Invoice

from ccm_billing.domain.model import Month
from ccm_billing.service_layer import decision_cache
from ccm_billing.service_layer.common import practice_info
from ccm_billing.service_layer.invoicing import close_period
from ccm_billing.service_layer.projections import apply_event
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import create_practice, create_token
from ccm_shared.transport import InProcessTransport
from tests.unit.billing import events as ev
from tests.unit.billing.conftest import PRICING

pytestmark = pytest.mark.asyncio(loop_scope="session")
MARCH = Month(2025, 3)
DECIDED_AT = datetime(2025, 3, 25, 12, tzinfo=UTC)
CLOSE_AT = datetime(2025, 4, 2, 12, tzinfo=UTC)


async def test_a_month_billing_g0506_alone_closes_and_corrects_on_postgres(infra):
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    runtime = ServiceRuntime.build(definition, load_settings(database_url=infra.database_url),
                                   transport=InProcessTransport(), clock=lambda: CLOSE_AT)
    db, practice = runtime.db, f"g0506-{uuid.uuid4().hex[:10]}"
    await create_practice(db.engine, practice_id=practice, name="G0506 alone",
                          timezone="America/New_York", pricing=PRICING)
    headers = {"Authorization": f"Bearer {await create_token(db.engine, practice_id=practice)}"}

    async def deliver(*events) -> None:
        for event in events:
            async with db.unit_of_work() as uow:
                await apply_event(event, uow, now=CLOSE_AT)
                await uow.commit()

    try:
        # p1: 45 staff minutes (99490 + 99439). p4: consent at an office visit on 2 March and
        # 10 minutes of time: G0506 alone.
        await deliver(*ev.enrolled_patient(practice, "p1"),
                      *ev.enrolled_patient(practice, "p4")[:-1],
                      ev.consent(practice, "p4", "c-p4", obtained="2025-03-02T11:00:00-05:00",
                                 version=2),
                      ev.visit(practice, "p4", "visit-1", day="2025-03-02"),
                      ev.role(practice, "nurse-1", "clinical-staff",
                              practitioner="Practitioner/nurse-1"),
                      ev.time_logged(practice, "p1", "e1", 2700, "2025-03-03T10:00:00-05:00"),
                      ev.time_logged(practice, "p4", "e4", 600, "2025-03-05T10:00:00-05:00"))
        async with db.unit_of_work() as uow:  # the decider's pass: the close files its rows
            info = await practice_info(uow.session, practice)
            assert await decision_cache.refresh(uow, info, MARCH, DECIDED_AT) == 2
            await uow.commit()
        async with db.unit_of_work() as uow:
            database = await decision_cache.invoice_lines(uow.session, practice, "2025-03")
            python = await decision_cache.invoice_lines(uow.session, practice, "2025-03",
                                                        aggregated=False)
        assert (orjson.dumps(database.items), database.count, database.total) == (
            orjson.dumps(python.items), 3, Decimal("120.33"))
        async with db.unit_of_work() as uow:
            closed = await close_period(uow, practice, MARCH, CLOSE_AT)
            await uow.commit()
        assert closed["invoice"]["totalNet"] == "120.33"  # 42.00 + 33.33 + G0506 45.00
        assert closed["summary"]["codes"] == {"99439": 1, "99490": 1, "G0506": 1}
        assert closed["summary"]["patientsBillable"] == 2
        first = closed["invoice"]["id"]

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                     base_url="http://billing") as client:
            async def items(patient: str) -> list[dict]:
                r = await client.get("/fhir/ChargeItem", headers=headers,
                                     params={"subject": f"Patient/{patient}"})
                return [e["resource"] for e in r.json().get("entry", [])]

            (g0506,) = await items("p4")
            ChargeItem.model_validate(g0506)
            assert g0506["code"]["coding"][0]["code"] == "G0506"
            assert g0506["occurrenceDateTime"] == "2025-03-02"
            assert g0506["supportingInformation"] == [{"reference": "Encounter/visit-1"}]
            invoice = (await client.get(f"/fhir/Invoice/{first}", headers=headers)).json()
            Invoice.model_validate(invoice)
            assert len(invoice["lineItem"]) == 3

            # The initiating visit entered in error after close: cancelled and reissued
            # without p4's line; recorded again, reissued with it.
            await deliver(ev.visit(practice, "p4", "visit-1", day="2025-03-02", version=2,
                                   reason="entered-in-error"))
            old = (await client.get(f"/v1/invoices/{first}", headers=headers)).json()
            assert old["status"] == "cancelled"
            second = (await client.get(f"/v1/invoices/{old['replacedBy']}",
                                       headers=headers)).json()
            assert second["totalNet"] == "75.33"
            assert [i["status"] for i in await items("p4")] == ["entered-in-error"]
            await deliver(ev.visit(practice, "p4", "visit-1", day="2025-03-02", version=3))
            second = (await client.get(f"/v1/invoices/{second['id']}", headers=headers)).json()
            third = (await client.get(f"/v1/invoices/{second['replacedBy']}",
                                      headers=headers)).json()
            assert (second["status"], third["status"], third["totalNet"]) == (
                "cancelled", "issued", "120.33")
            assert sorted(i["status"] for i in await items("p4")) == ["billable",
                                                                      "entered-in-error"]
    finally:
        await db.dispose()
