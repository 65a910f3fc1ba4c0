"""The decision cache (decisions kept current during the month) never changes what is billed.

Property: the same events delivered to two databases, one refreshing its cache at arbitrary points
between events (as the scheduler does) and one never, close to identical results — decisions,
filings, ChargeItems, Invoice, summary — equal to deciding the month directly. Examples: a refresh
decides only the patients whose facts, duplicate-biller fact or practice context changed.
"""

import asyncio
import json
import tempfile

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from ccm_billing.adapters import filed, orm
from ccm_billing.compliance.evidence import filed_decisions
from ccm_billing.entrypoints.consumers import consumers
from ccm_billing.service_layer import decision_cache
from ccm_billing.service_layer.charges import priced_lines
from ccm_billing.service_layer.common import practice_info
from ccm_billing.service_layer.decisions import decide_month
from ccm_billing.service_layer.invoicing import close_period
from ccm_shared.tables import practices
from tests.unit.billing import events as ev
from tests.unit.billing.test_properties import CLOSE_AT, MARCH, _fresh_db, _Runtime

PATIENTS = 3


def _start(practice: str = "alpha") -> list:
    events = [ev.role(practice, "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1")]
    for n in range(PATIENTS):
        events += ev.enrolled_patient(practice, f"p{n}")
    return events


class _Script:
    """Turns generated operations into ingest events with increasing source versions."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.entry_patient: dict[int, int] = {}

    def version(self, key: str) -> int:
        self.versions[key] = self.versions.get(key, 1) + 1
        return self.versions[key]

    def event(self, op: tuple):  # noqa: ANN201
        kind = op[0]
        if kind == "log":
            _, entry, patient, seconds, day, doc = op
            self.entry_patient[entry] = patient
            return ev.time_logged(
                "alpha", f"p{patient}", f"e{entry}", seconds, f"2025-03-{day:02d}T10:00:00-04:00",
                version=self.version(f"e{entry}"),
                practitioner="Practitioner/doc-1" if doc else "Practitioner/nurse-1",
                role="PractitionerRole/doc-1" if doc else "PractitionerRole/nurse-1")
        if kind == "reverse":
            entry = op[1]
            return ev.time_reversed("alpha", f"p{self.entry_patient.get(entry, 0)}", f"e{entry}",
                                    version=self.version(f"e{entry}"), month="2025-03")
        if kind == "consent":
            _, patient, status = op
            return ev.consent("alpha", f"p{patient}", f"c-p{patient}", status=status,
                              version=self.version(f"c{patient}"))
        if kind == "plan":
            _, patient, status = op
            return ev.care_plan("alpha", f"p{patient}", f"cp-p{patient}", status=status,
                                version=self.version(f"cp{patient}"))
        _, classification = op
        return ev.role("alpha", "doc-1", classification, practitioner="Practitioner/doc-1",
                       version=self.version("doc-1"))


OPS = st.lists(st.one_of(
    st.tuples(st.just("log"), st.integers(0, 4), st.integers(0, PATIENTS - 1),
              st.integers(60, 1500), st.integers(1, 28), st.booleans()),
    st.tuples(st.just("reverse"), st.integers(0, 4)),
    st.tuples(st.just("consent"), st.integers(0, PATIENTS - 1),
              st.sampled_from(["active", "inactive", "entered-in-error"])),
    st.tuples(st.just("plan"), st.integers(0, PATIENTS - 1), st.sampled_from(["active", "revoked"])),
    st.tuples(st.just("role"), st.sampled_from(["clinical-staff", "billing-practitioner"])),
), min_size=1, max_size=20)
REFRESHES = st.sets(st.integers(0, 20), max_size=8)  # the warm run refreshes after these ops


async def _refresh(db) -> int:  # noqa: ANN001
    async with db.unit_of_work() as uow:
        info = await practice_info(uow.session, "alpha")
        n = await decision_cache.refresh(uow, info, MARCH, CLOSE_AT)
        await uow.commit()
    return n


async def _run(ops: list, warm: bool, refreshes: set[int] = frozenset()) -> dict:
    script = _Script()
    steps = [*_start(), "refresh"]  # the scheduler has decided everyone before the ops
    for n, op in enumerate(ops):
        steps.append(script.event(op))
        if n in refreshes:
            steps.append("refresh")
    with tempfile.TemporaryDirectory() as folder:
        db = await _fresh_db(folder)
        handler = consumers(_Runtime(db))[0].handler
        try:
            for step in steps:
                if step == "refresh":
                    if warm:
                        await _refresh(db)
                    continue
                async with db.unit_of_work() as uow:
                    await handler(step, uow)
                    await uow.commit()
            async with db.unit_of_work() as uow:
                info = await practice_info(uow.session, "alpha")
                decided = await decide_month(uow.session, info, MARCH)
                direct = [d.to_dict() for d in decided]
                direct_lines = priced_lines(info, MARCH, decided)
                live = await decision_cache.current_documents(uow.session, info, MARCH)
                live_month = await decision_cache.current_month(uow.session, info, MARCH)
            async with db.unit_of_work() as uow:
                result = await close_period(uow, "alpha", MARCH, CLOSE_AT)
                await uow.commit()
            async with db.unit_of_work() as uow:
                s = uow.session
                period = (await s.execute(select(orm.billing_periods))).one()
                items = (await s.execute(select(filed.charge_items)
                                         .order_by(filed.charge_items.c.id))).all()
                filings = (await s.execute(select(filed.filings)
                                           .order_by(filed.filings.c.patient))).all()
                invoices = [(r.id, r.total_net, await filed.invoice_resource(s, r))
                            for r in (await s.execute(select(orm.invoices))).all()]
                decisions = await filed_decisions(s, "alpha", str(MARCH))
            return {
                "direct": direct, "live": live, "result": result, "decisions": decisions,
                "direct_lines": direct_lines, "live_month": live_month,
                "summary": period.summary,
                "items": [(r.id, r.patient, r.code, r.amount, json.loads(r.resource)) for r in items],
                "filings": [tuple(r) for r in filings],
                "invoices": [(i, total, orjson.loads(orjson.dumps(doc))) for i, total, doc in invoices],
            }
        finally:
            await db.dispose()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(OPS, REFRESHES)
def test_a_warm_cache_closes_exactly_like_a_cold_one_and_like_deciding_directly(ops, refreshes):
    warm = asyncio.run(_run(ops, warm=True, refreshes=refreshes))
    cold = asyncio.run(_run(ops, warm=False))
    assert warm == cold
    assert warm["decisions"] == warm["direct"] == warm["live"]  # live: what the worklist shows
    # The open month's report: the cached decisions and lines where current, decided and priced
    # now where not, exactly what deciding and pricing everyone directly gives.
    assert warm["live_month"] == (warm["direct"], warm["direct_lines"])


async def _deliver(db, *events) -> None:  # noqa: ANN001
    handler = consumers(_Runtime(db))[0].handler
    for e in events:
        async with db.unit_of_work() as uow:
            await handler(e, uow)
            await uow.commit()


async def _counts() -> list[int]:
    with tempfile.TemporaryDirectory() as folder:
        db = await _fresh_db(folder)
        try:
            await _deliver(db, *_start(), *ev.enrolled_patient("alpha", "p3"),  # p3: no time
                           *[ev.time_logged("alpha", f"p{n}", f"e{n}", 1500, "2025-03-03T10:00:00-05:00")
                             for n in range(PATIENTS)])
            counts = [await _refresh(db), await _refresh(db)]
            await _deliver(db, ev.time_logged("alpha", "p1", "e9", 300, "2025-03-09T10:00:00-05:00"))
            counts.append(await _refresh(db))  # p1's facts changed
            await _deliver(db, ev.time_logged("alpha", "p2", "e0", 1500, "2025-03-03T10:00:00-05:00",
                                              version=2))
            counts.append(await _refresh(db))  # e0 moved from p0 to p2: both changed
            await _deliver(db, ev.role("alpha", "doc-1", "billing-practitioner"))
            counts.append(await _refresh(db))  # performer roles: every patient
            async with db.engine.begin() as conn:
                await conn.execute(update(practices).where(practices.c.id == "alpha")
                                   .values(pricing=json.dumps({"model": "flat-per-patient",
                                                               "flat_fee": "50.00"})))
            counts.append(await _refresh(db))  # pricing: every patient
            await _deliver(db, ev.patient("alpha", "p0", mbi="1EG4TE5MK73", version=2),
                           ev.patient("other", "q0", mbi="1EG4TE5MK73"),
                           ev.time_logged("other", "q0", "x0", 600, "2025-03-05T10:00:00-05:00"))
            counts.append(await _refresh(db))  # p0 is now billed elsewhere too: duplicate biller
            await _deliver(db, ev.consent("alpha", "p3", "c-p3", status="entered-in-error", version=2))
            counts.append(await _refresh(db))  # p3 is no longer enrolled: its decision is dropped
            async with db.unit_of_work() as uow:
                cached = (await uow.session.execute(
                    select(orm.month_decisions.c.patient).order_by(orm.month_decisions.c.patient)
                )).scalars().all()
            return counts, cached
        finally:
            await db.dispose()


def test_a_refresh_decides_only_what_is_no_longer_current():
    counts, cached = asyncio.run(_counts())
    assert counts == [4, 0, 1, 2, 4, 4, 1, 0]
    assert cached == ["p0", "p1", "p2"]


async def _gone_without_a_generation() -> list[str]:
    """A cached patient no longer enrolled whose facts never got a generation row (projected
    before billing_0005): its row looks current in every other way, and must still go."""
    with tempfile.TemporaryDirectory() as folder:
        db = await _fresh_db(folder)
        try:
            await _deliver(db, *_start(), ev.time_logged("alpha", "p0", "e0", 1500,
                                                         "2025-03-03T10:00:00-05:00"))
            await _refresh(db)
            md, g = orm.month_decisions, orm.fact_generations
            async with db.engine.begin() as conn:
                row = (await conn.execute(select(md).where(md.c.patient == "p0"))).one()._asdict()
                await conn.execute(md.insert().values({**row, "patient": "gone", "generation": 0}))
                await conn.execute(g.delete().where(g.c.patient == "gone"))
            await _refresh(db)
            async with db.unit_of_work() as uow:
                return (await uow.session.execute(select(md.c.patient).order_by(md.c.patient))
                        ).scalars().all()
        finally:
            await db.dispose()


def test_a_cached_patient_no_longer_enrolled_goes_even_without_a_generation_row():
    assert asyncio.run(_gone_without_a_generation()) == ["p0", "p1", "p2"]  # "gone" went


async def test_the_decider_keeps_open_months_current_forgets_others_and_never_touches_a_filed_one(
        billing):
    from ccm_billing.entrypoints.jobs import decide_open_months
    from tests.unit.billing.test_billing_flow import api, deliver, march_practice

    await march_practice(billing)  # the clock: 2025-03-20; February and March are open
    first = await decide_open_months(billing)
    cached = await _cached(billing)
    assert {m for m, _ in cached} == {"2025-02", "2025-03"}
    assert {p for m, p in cached if m == "2025-03"} == {"p1", "p2"}
    assert first == {"decided": len(cached), "failed": 0}
    assert await decide_open_months(billing) == {"decided": 0, "failed": 0}
    await deliver(billing, ev.time_logged("alpha", "p2", "e4", 60, "2025-03-19T10:00:00-04:00"))
    # p2's facts changed: its decisions of both open months are decided again, nobody else's
    assert await decide_open_months(billing) == {"decided": 2, "failed": 0}

    billing.state["clock"].now = CLOSE_AT
    closed = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()
    assert closed["summary"]["patientsBillable"] == 2  # p1, and p2 now over 20 minutes
    filed_march = await _rows(billing, "2025-03")
    await decide_open_months(billing)  # now March (closed) and April are the open months
    # February was never closed: forgotten. March was closed in place: its rows are its filings.
    assert {m for m, _ in await _cached(billing)} == {"2025-03", "2025-04"}
    assert await _rows(billing, "2025-03") == filed_march
    # A late entry changes p2's facts: March stays as filed (the entry is late), never re-decided.
    await deliver(billing, ev.time_logged("alpha", "p2", "e5", 600, "2025-03-19T11:00:00-04:00"))
    await decide_open_months(billing)
    assert await _rows(billing, "2025-03") == filed_march


async def _rows(runtime, month: str) -> list[tuple]:  # noqa: ANN001
    async with runtime.db.unit_of_work() as uow:
        return [tuple(r) for table in (orm.month_decisions, orm.month_decision_lines)
                for r in (await uow.session.execute(
                    select(table).where(table.c.month == month).order_by(*table.primary_key)))]


async def _cached(runtime) -> list[tuple[str, str]]:  # noqa: ANN001
    md = orm.month_decisions
    async with runtime.db.unit_of_work() as uow:
        return [tuple(r) for r in (await uow.session.execute(select(md.c.month, md.c.patient))).all()]


async def _report_month() -> tuple:
    with tempfile.TemporaryDirectory() as folder:
        db = await _fresh_db(folder)
        try:
            await _deliver(db, *_start(), *[
                ev.time_logged("alpha", f"p{n}", f"e{n}", 1500, "2025-03-03T10:00:00-05:00")
                for n in range(PATIENTS)])
            assert await _refresh(db) == PATIENTS  # cached: everyone billable (99490)
            # p1 logs 25 more minutes (99439 too), p2's entry is entered in error: both stale.
            await _deliver(db, ev.time_logged("alpha", "p1", "e9", 1500,
                                              "2025-03-09T10:00:00-05:00"),
                           ev.time_reversed("alpha", "p2", "e2", version=2, month="2025-03"))
            async with db.unit_of_work() as uow:
                info = await practice_info(uow.session, "alpha")
                decided = await decide_month(uow.session, info, MARCH)
                live = await decision_cache.current_month(uow.session, info, MARCH)
                return live, ([d.to_dict() for d in decided], priced_lines(info, MARCH, decided))
        finally:
            await db.dispose()


def test_the_open_month_report_prices_stale_patients_now_and_the_others_from_the_cache():
    live, direct = asyncio.run(_report_month())
    assert live == direct
    assert [(x.patient, x.code) for x in live[1]] == [
        ("p0", "99490"), ("p1", "99439"), ("p1", "99490")]


async def test_a_practice_whose_rows_the_database_refuses_does_not_stop_the_decider(
        billing, monkeypatch):
    """The decider decides every practice in turn: one practice-month the database refuses (a
    check, a value out of range) is logged and counted as failed, and the practices after it
    are still decided. (It stopped the whole pass before.)"""
    from sqlalchemy.exc import IntegrityError

    from ccm_billing.entrypoints.jobs import decide_open_months
    from ccm_shared.tenancy import create_practice
    from tests.unit.billing.conftest import PRICING
    from tests.unit.billing.test_billing_flow import deliver, march_practice

    await march_practice(billing)
    # Another practice, sorted before "alpha" by the registry and refused on every refresh.
    await create_practice(billing.db.engine, practice_id="aaa-refused", name="Refused",
                          timezone="America/New_York", pricing=PRICING)
    await deliver(billing, *ev.enrolled_patient("aaa-refused", "q1"))
    refresh = decision_cache.refresh

    async def refusing(uow, info, *args, **kwargs):  # noqa: ANN001, ANN202
        if info.id == "aaa-refused":
            raise IntegrityError("INSERT …", {}, Exception("violates check constraint"))
        return await refresh(uow, info, *args, **kwargs)

    monkeypatch.setattr(decision_cache, "refresh", refusing)
    counts = await decide_open_months(billing)
    assert counts["failed"] == 2  # its two open months
    assert {p for m, p in await _cached(billing) if m == "2025-03"} == {"p1", "p2"}  # alpha's
    assert counts["decided"] == len(await _cached(billing))


def test_the_close_reads_the_context_the_decider_keys_its_cache_with():
    """invoicing._close_context (practice, roles, EHR endpoint in one statement) gives the
    decision cache's context_key, on SQLite too (PostgreSQL: tests/integration/billing)."""
    from ccm_billing.service_layer.invoicing import _close_context

    async def go() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            db = await _fresh_db(tmp)
            try:
                await _deliver(db, *_start(), ev.role("alpha", "doc-2", "clinical-staff",
                                                      practitioner="Practitioner/doc-2"))
                async with db.unit_of_work() as uow:
                    info = await practice_info(uow.session, "alpha")
                    stored = await decision_cache.context_key(uow.session, info, MARCH)
                    read, roles, has_endpoint = await _close_context(uow.session, "alpha")
                assert read == info and len(roles) >= 2 and has_endpoint is False
                assert decision_cache.context_of(read, MARCH, roles) == stored
            finally:
                await db.dispose()

    asyncio.run(go())
