"""Two corrections of one closed month at the same time, on PostgreSQL: the consumer's
correction of a late event and the explicit recompute (``POST …/recompute``). Each holds the
practice-month (its ``billing_periods`` row) before it reads anything, so the second waits for
the first and then works on what it left: one current invoice per practice-month, whose lines
are what deciding the month now gives, whatever the order."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select, update

from ccm_billing.adapters import filed, orm
from ccm_billing.domain.model import Month
from ccm_billing.service_layer import corrections, invoicing
from ccm_billing.service_layer.charges import priced_lines
from ccm_billing.service_layer.common import practice_info
from ccm_billing.service_layer.decisions import decide_month
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tables import practices
from ccm_shared.tenancy import create_practice, create_token
from ccm_shared.transport import InProcessTransport
from tests.unit.billing import events as ev
from tests.unit.billing.conftest import PRICING

pytestmark = pytest.mark.asyncio(loop_scope="session")
CLOSE_AT = datetime(2025, 4, 2, 12, tzinfo=UTC)
WAIT = 1.0  # long enough for a statement that does not wait to have finished


class Billing:
    """Billing on PostgreSQL with a practice of the test's own, closed for March 2025: p1 25 +
    20 staff minutes (99490 42.00 + 99439 33.33), p2 25 minutes (99490 42.00)."""

    def __init__(self, runtime: ServiceRuntime, practice: str, token: str) -> None:
        self.runtime, self.practice = runtime, practice
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                        base_url="http://billing",
                                        headers={"Authorization": f"Bearer {token}"})

    async def deliver(self, event, uow=None) -> None:  # noqa: ANN001
        """The event through billing's consumer handler: in ``uow`` (left open) or in a
        transaction of its own."""
        handler = self.runtime.definition.consumers(self.runtime)[0].handler
        if uow is not None:
            await handler(event, uow)
            return
        async with self.runtime.db.unit_of_work() as own:
            await handler(event, own)
            await own.commit()

    async def recompute(self, reason: str = "contract amended") -> httpx.Response:
        return await self.client.post(
            f"/v1/practices/{self.practice}/billing-periods/2025-03/recompute",
            json={"reason": reason})

    async def reprice_99490(self, rate: str) -> None:
        doc = json.loads(PRICING.to_json())
        doc["rates"]["99490"] = rate
        async with self.runtime.db.unit_of_work() as uow:
            await uow.session.execute(update(practices).where(
                practices.c.id == self.practice).values(pricing=json.dumps(doc)))
            await uow.commit()


@pytest_asyncio.fixture(loop_scope="session")
async def march(infra):  # noqa: ANN001, ANN201
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    runtime = ServiceRuntime.build(definition, load_settings(database_url=infra.database_url),
                                   transport=InProcessTransport(), clock=lambda: CLOSE_AT)
    practice = f"race-{uuid.uuid4().hex[:10]}"
    await create_practice(runtime.db.engine, practice_id=practice, name="race",
                          timezone="America/New_York", pricing=PRICING)
    b = Billing(runtime, practice, await create_token(runtime.db.engine, practice_id=practice))
    try:
        for e in [*ev.enrolled_patient(practice, "p1"), *ev.enrolled_patient(practice, "p2"),
                  ev.role(practice, "nurse-1", "clinical-staff",
                          practitioner="Practitioner/nurse-1"),
                  ev.time_logged(practice, "p1", "e1", 1500, "2025-03-03T10:00:00-05:00"),
                  ev.time_logged(practice, "p1", "e2", 1200, "2025-03-17T10:00:00-04:00"),
                  ev.time_logged(practice, "p2", "e3", 1500, "2025-03-05T10:00:00-05:00")]:
            await b.deliver(e)
        async with runtime.db.unit_of_work() as uow:
            closed = await invoicing.close_period(uow, practice, Month(2025, 3), CLOSE_AT)
            await uow.commit()
        assert closed["invoice"]["totalNet"] == "117.33"
        yield b
    finally:
        await b.client.aclose()
        await runtime.db.dispose()


async def waits_for(holding, work, what: str):  # noqa: ANN001, ANN201
    """Start ``work`` while ``holding`` (a correction not yet committed) holds the month: it
    must wait, then go on once ``holding`` commits; its result."""
    task = asyncio.create_task(work)
    await asyncio.sleep(WAIT)
    assert not task.done(), f"{what} went on while the month was being corrected"
    await holding.commit()
    return await asyncio.wait_for(task, timeout=30)


async def assert_one_current_invoice_as_decided_now(b: Billing) -> list:
    """Exactly one invoice of March is not cancelled; its ChargeItems are the lines deciding
    the whole month now gives, priced under the month's terms; each cancelled one names the one
    that replaced it. Answers the month's invoices by revision."""
    i, ci = orm.invoices, filed.charge_items
    async with b.runtime.db.unit_of_work() as uow:
        invoices = (await uow.session.execute(select(i).where(
            i.c.practice == b.practice, i.c.month == "2025-03").order_by(i.c.revision))).all()
        live = [x for x in invoices if x.status != "cancelled"]
        assert len(live) == 1, [(x.id, x.status, x.total_net) for x in invoices]
        billed = sorted(
            (r.patient, r.code, r.amount) for r in (await uow.session.execute(
                select(ci.c.patient, ci.c.code, ci.c.amount).where(
                    ci.c.invoice_id == live[0].id))).all())
        period = await invoicing.get_period(uow.session, b.practice, Month(2025, 3))
        info = (await practice_info(uow.session, b.practice)).under(period.terms)
        decided = await decide_month(uow.session, info, Month(2025, 3))
        fresh = sorted((x.patient, x.code, f"{x.amount:.2f}")
                       for x in priced_lines(info, Month(2025, 3), decided))
        assert period.invoice_id == live[0].id
    assert billed == fresh
    for older, newer in zip(invoices, invoices[1:], strict=False):
        assert (older.status, older.replaced_by) == ("cancelled", newer.id)
    return invoices


async def test_a_recompute_waiting_for_a_correction_corrects_its_replacement(march):
    """p1's second Encounter is reversed (the consumer reissues March at 84.00, not committed)
    while the contract changed and an administrator recomputes: the recompute waits, then
    reprices the replacement (one current invoice, p1's reversal kept) instead of issuing a
    second current invoice from what it read before the correction committed."""
    b = march
    await b.reprice_99490("50.00")
    async with b.runtime.db.unit_of_work() as correcting:
        await b.deliver(ev.time_reversed(b.practice, "p1", "e2"), correcting)
        r = await waits_for(correcting, b.recompute(), "the recompute")
    assert r.status_code == 200, r.text
    assert r.json() == {"month": "2025-03", "reissued": True}
    invoices = await assert_one_current_invoice_as_decided_now(b)
    assert [(x.status, x.total_net) for x in invoices] == [
        ("cancelled", "117.33"), ("cancelled", "84.00"), ("issued", "100.00")]


async def test_a_correction_waiting_for_a_recompute_corrects_its_replacement(march):
    """The other order: the recompute reprices March (not committed) while p1's reversal
    arrives; the correction waits, then corrects the repriced replacement."""
    b = march
    await b.reprice_99490("50.00")
    async with b.runtime.db.unit_of_work() as recomputing:
        assert await corrections.recompute(recomputing, b.practice, "2025-03", "amended",
                                           CLOSE_AT)
        await waits_for(recomputing, b.deliver(ev.time_reversed(b.practice, "p1", "e2")),
                        "the correction")
    invoices = await assert_one_current_invoice_as_decided_now(b)
    assert [(x.status, x.total_net) for x in invoices] == [
        ("cancelled", "117.33"), ("cancelled", "133.33"), ("issued", "100.00")]


async def test_two_corrections_of_one_month_reissue_it_once_each(march):
    """Two consumers correct different patients of March at once (p1's Encounter reversed, p2's
    revised to 45 minutes): the second waits and corrects the first's replacement, keeping its
    change; neither drops the other's patient."""
    b = march
    async with b.runtime.db.unit_of_work() as correcting:
        await b.deliver(ev.time_reversed(b.practice, "p1", "e2"), correcting)
        await waits_for(correcting, b.deliver(ev.time_logged(
            b.practice, "p2", "e3", 2700, "2025-03-05T10:00:00-05:00", version=2)),
            "the second correction")
    invoices = await assert_one_current_invoice_as_decided_now(b)
    assert [(x.status, x.total_net) for x in invoices] == [
        ("cancelled", "117.33"), ("cancelled", "84.00"), ("issued", "117.33")]


async def test_a_second_recompute_of_what_the_first_did_reissues_nothing(march):
    """Two administrators recompute at once after a contract change: the second waits, finds
    the month already repriced and issues nothing."""
    b = march
    await b.reprice_99490("50.00")
    async with b.runtime.db.unit_of_work() as recomputing:
        assert await corrections.recompute(recomputing, b.practice, "2025-03", "amended",
                                           CLOSE_AT)
        r = await waits_for(recomputing, b.recompute(), "the second recompute")
    assert r.json() == {"month": "2025-03", "reissued": False}
    invoices = await assert_one_current_invoice_as_decided_now(b)
    assert [(x.status, x.total_net) for x in invoices] == [
        ("cancelled", "117.33"), ("issued", "133.33")]
