"""A duplicate biller found while the other practice closes its month, on PostgreSQL: the time
event of one practice holds every practice with the same MBI shared (as it holds its own), so a
close of the other practice waits for it and sees its time (flagged at close), or the event
waits for the close and then corrects the closed month. Either way the closed month ends
flagged and bills neither; the race never leaves it billed and unflagged."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_billing.adapters import orm
from ccm_billing.compliance.evidence import filed_decisions
from ccm_billing.domain.model import Month
from ccm_billing.service_layer import invoicing
from ccm_billing.service_layer.projections import apply_event
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import create_practice
from ccm_shared.transport import InProcessTransport
from tests.unit.billing import events as ev
from tests.unit.billing.conftest import PRICING

pytestmark = pytest.mark.asyncio(loop_scope="session")
CLOSE_AT = datetime(2025, 4, 2, 12, tzinfo=UTC)
WAIT = 1.0  # long enough for a statement that does not wait to have finished


@pytest_asyncio.fixture(loop_scope="session")
async def two(infra):  # noqa: ANN001, ANN201
    """(database, alpha, beta): alpha's pa has 30 minutes in March; beta's pb, the same MBI
    (one of this test's own), is enrolled without time."""
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    runtime = ServiceRuntime.build(definition, load_settings(database_url=infra.database_url),
                                   transport=InProcessTransport(), clock=lambda: CLOSE_AT)
    alpha, beta = (f"{p}-{uuid.uuid4().hex[:10]}" for p in ("dupa", "dupb"))
    for practice in (alpha, beta):
        await create_practice(runtime.db.engine, practice_id=practice, name=practice,
                              timezone="America/New_York", pricing=PRICING)
    mbi = uuid.uuid4().hex[:11].upper()
    try:
        for e in [*ev.enrolled_patient(alpha, "pa", mbi=mbi),
                  *ev.enrolled_patient(beta, "pb", mbi=mbi),
                  ev.role(alpha, "nurse-1", "clinical-staff"),
                  ev.role(beta, "nurse-1", "clinical-staff"),
                  ev.time_logged(alpha, "pa", "ea", 1800, "2025-03-03T10:00:00-05:00")]:
            await deliver(runtime.db, e)
        yield runtime.db, alpha, beta
    finally:
        await runtime.db.dispose()


async def deliver(db, event, uow=None) -> None:  # noqa: ANN001
    if uow is not None:
        await apply_event(event, uow, now=CLOSE_AT)
        return
    async with db.unit_of_work() as own:
        await apply_event(event, own, now=CLOSE_AT)
        await own.commit()


async def close(db, practice: str, uow=None) -> dict:  # noqa: ANN001
    if uow is not None:
        return await invoicing.close_period(uow, practice, Month(2025, 3), CLOSE_AT)
    async with db.unit_of_work() as own:
        result = await close(db, practice, own)
        await own.commit()
    return result


async def waits_for(holding, work, what: str):  # noqa: ANN001, ANN201
    task = asyncio.create_task(work)
    await asyncio.sleep(WAIT)
    assert not task.done(), f"{what} went on meanwhile"
    await holding.commit()
    return await asyncio.wait_for(task, timeout=30)


async def assert_flagged_and_unbilled(db, alpha: str) -> None:  # noqa: ANN001
    async with db.unit_of_work() as uow:
        (pa,) = await filed_decisions(uow.session, alpha, "2025-03")
        i = orm.invoices
        live = (await uow.session.execute(select(i.c.id).where(
            i.c.practice == alpha, i.c.month == "2025-03", i.c.status != "cancelled"))).all()
    assert (pa["blockers"], pa["billable"]) == (["duplicate-biller"], False)
    assert live == []  # pa was alpha's one line: nothing billed


async def test_a_close_waits_for_the_other_practice_s_time_and_flags_it(two):
    db, alpha, beta = two
    async with db.unit_of_work() as logging:
        await deliver(db, ev.time_logged(beta, "pb", "eb", 1800, "2025-03-04T10:00:00-05:00"),
                      logging)
        result = await waits_for(logging, close(db, alpha), "alpha's close")
    assert result["invoice"] is None
    await assert_flagged_and_unbilled(db, alpha)


async def test_the_other_practice_s_time_waits_for_a_close_and_then_corrects_it(two):
    db, alpha, beta = two
    async with db.unit_of_work() as closing:
        assert (await close(db, alpha, closing))["invoice"]["totalNet"] == "42.00"
        await waits_for(closing, deliver(db, ev.time_logged(
            beta, "pb", "eb", 1800, "2025-03-04T10:00:00-05:00")), "beta's time")
    await assert_flagged_and_unbilled(db, alpha)
