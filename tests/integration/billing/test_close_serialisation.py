"""A month close and the projections of the same practice on real PostgreSQL: an event that
arrives while the month is being closed waits for the close to commit, then sees the month
closed (logged after close: late, not billed), instead of slipping past both the close and the
late-entry check."""

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from ccm_billing.adapters import orm
from ccm_billing.domain.model import Month
from ccm_billing.service_layer.invoicing import close_period
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


async def _billing(infra, prefix: str):  # noqa: ANN001, ANN202
    """The billing schema migrated, its Database, and a new practice of this test."""
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    runtime = ServiceRuntime.build(definition, load_settings(database_url=infra.database_url),
                                   transport=InProcessTransport(), clock=lambda: CLOSE_AT)
    practice = f"{prefix}-{uuid.uuid4().hex[:10]}"
    await create_practice(runtime.db.engine, practice_id=practice, name=prefix,
                          timezone="America/New_York", pricing=PRICING)
    return runtime.db, practice


async def _deliver(db, event) -> None:  # noqa: ANN001
    async with db.unit_of_work() as uow:
        await apply_event(event, uow, now=CLOSE_AT)
        await uow.commit()


async def _enrolled_with_time(db, practice: str, start: str) -> None:  # noqa: ANN001
    """Patient p1 enrolled, a nurse, and 25 minutes of p1's time at ``start``."""
    for e in [*ev.enrolled_patient(practice, "p1"), ev.role(practice, "nurse-1", "clinical-staff"),
              ev.time_logged(practice, "p1", "e1", 1500, start)]:
        await _deliver(db, e)


async def _waits_for_the_close(closing, work, what: str) -> None:  # noqa: ANN001
    """Start ``work`` while ``closing`` (a close not yet committed) holds the practice: it must
    wait for the close, then go on once it commits."""
    task = asyncio.create_task(work)
    await asyncio.sleep(1.0)
    assert not task.done(), f"{what} went on while the month was being closed"
    await closing.commit()
    await asyncio.wait_for(task, timeout=30)


async def test_an_event_during_a_close_waits_and_then_sees_the_month_closed(infra):
    db, practice = await _billing(infra, "ser")
    try:
        await _enrolled_with_time(db, practice, "2025-03-03T10:00:00-05:00")
        late = ev.time_logged(practice, "p1", "e2", 900, "2025-03-20T10:00:00-04:00")
        async with db.unit_of_work() as closing:
            result = await close_period(closing, practice, Month(2025, 3), CLOSE_AT)
            assert result["summary"]["minutes"]["staff"] == 25
            # The close has not committed: the event arrives now and must wait for it.
            await _waits_for_the_close(closing, _deliver(db, late), "the event")
        async with db.unit_of_work() as uow:
            t = orm.time_entries
            row = (await uow.session.execute(select(t.c.late).where(
                t.c.practice == practice, t.c.entry_id == "e2"))).one()
        assert row.late is True  # logged after close: flagged, not silently outside the invoice
    finally:
        await db.dispose()


async def test_a_decider_pass_skips_a_month_another_replica_is_refreshing(infra):
    from ccm_billing.service_layer import decision_cache
    from ccm_billing.service_layer.common import practice_info

    db, practice = await _billing(infra, "dec")
    march = Month(2025, 3)
    try:
        for e in [*ev.enrolled_patient(practice, "p1"),
                  ev.time_logged(practice, "p1", "e1", 1500, "2025-03-03T10:00:00-05:00")]:
            await _deliver(db, e)
        async with db.unit_of_work() as first:
            info = await practice_info(first.session, practice)
            assert await decision_cache.refresh(first, info, march, CLOSE_AT) == 1  # holds the lock
            async with db.unit_of_work() as other:
                skipped = await asyncio.wait_for(
                    decision_cache.refresh(other, info, march, CLOSE_AT, wait=False), timeout=5)
            assert skipped == 0
            await first.commit()
        async with db.unit_of_work() as again:
            assert await decision_cache.refresh(again, info, march, CLOSE_AT, wait=False) == 0
            assert len(await decision_cache.current_documents(again.session, info, march)) == 1
    finally:
        await db.dispose()


async def test_the_decider_never_forgets_a_month_while_it_is_being_closed_in_place(infra):
    """A late close of February (no longer an open month on 2 April) files its cached rows in
    place while the decider forgets the months that are not open: the decider waits for the close
    and then keeps February's rows, its filings."""
    from ccm_billing.adapters import filed
    from ccm_billing.entrypoints.jobs import decide_practice
    from ccm_billing.service_layer import decision_cache
    from ccm_billing.service_layer.common import practice_info

    db, practice = await _billing(infra, "fgt")
    february = Month(2025, 2)
    try:
        await _enrolled_with_time(db, practice, "2025-02-03T10:00:00-05:00")
        async with db.unit_of_work() as uow:  # decided while February was still open
            await decision_cache.refresh(uow, await practice_info(uow.session, practice),
                                         february, CLOSE_AT)
            await uow.commit()
        async with db.unit_of_work() as uow:
            info = await practice_info(uow.session, practice)
        async with db.unit_of_work() as closing:
            await close_period(closing, practice, february, CLOSE_AT)  # current: filed as it is
            await _waits_for_the_close(closing, decide_practice(db, info, CLOSE_AT), "the decider")
        async with db.unit_of_work() as uow:
            f = filed.filings
            rows = (await uow.session.execute(select(f.c.patient, f.c.revision).where(
                f.c.practice == practice, f.c.month == "2025-02"))).all()
        assert [tuple(r) for r in rows] == [("p1", 0)]
    finally:
        await db.dispose()


async def test_a_close_refused_as_too_early_never_waits_for_the_decider(infra):
    """The decider refreshes the current month every pass under the month's lock; a close of
    that month, asked too early, is refused at once instead of waiting for the refresh while it
    holds the practice (and every projection of it) — and a due close waits for it."""
    from ccm_billing.service_layer import decision_cache
    from ccm_billing.service_layer.common import practice_info
    from ccm_shared.errors import Conflict

    db, practice = await _billing(infra, "early")
    april = Month(2025, 4)  # CLOSE_AT is 2 April: still open
    try:
        await _enrolled_with_time(db, practice, "2025-04-01T10:00:00-04:00")
        await _enrolled_with_time(db, practice, "2025-03-03T10:00:00-05:00")
        async with db.unit_of_work() as deciding:  # the decider, at work on both months
            info = await practice_info(deciding.session, practice)
            assert await decision_cache.refresh(deciding, info, april, CLOSE_AT) == 1
            assert await decision_cache.refresh(deciding, info, Month(2025, 3), CLOSE_AT) == 1
            async with db.unit_of_work() as uow:
                with pytest.raises(Conflict):
                    await asyncio.wait_for(close_period(uow, practice, april, CLOSE_AT),
                                           timeout=5)
            async with db.unit_of_work() as closing:  # March is due: it waits for the lock
                await _waits_for_the_close(deciding, close_period(closing, practice,
                                                                  Month(2025, 3), CLOSE_AT),
                                           "the close")
                await closing.commit()
    finally:
        await db.dispose()


async def test_the_close_reads_the_context_the_decider_keys_its_cache_with(infra):
    """The close reads the practice, its performer roles and its EHR endpoint in one statement
    (invoicing._close_context); the decision cache's context from those roles must be the one
    the decider stored, or every close would decide every patient again."""
    from ccm_billing.service_layer import decision_cache
    from ccm_billing.service_layer.common import practice_info
    from ccm_billing.service_layer.invoicing import _close_context

    db, practice = await _billing(infra, "ctx")
    march = Month(2025, 3)
    try:
        await _enrolled_with_time(db, practice, "2025-03-03T10:00:00-05:00")
        await _deliver(db, ev.role(practice, "doc-1", "billing-practitioner",
                                   practitioner="Practitioner/doc-1"))
        async with db.unit_of_work() as uow:
            info = await practice_info(uow.session, practice)
            stored = await decision_cache.context_key(uow.session, info, march)
            read, roles, has_endpoint = await _close_context(uow.session, practice)
        assert read == info and len(roles) == 2 and has_endpoint is False
        assert decision_cache.context_of(read, march, roles) == stored
    finally:
        await db.dispose()
