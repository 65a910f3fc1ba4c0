"""Properties (hypothesis): delivery order and duplicates never change decisions; closing twice
gives the identical Invoice; invoice totals equal the sum of their lines."""

import asyncio
import json
import tempfile
from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccm_billing.adapters.orm import metadata
from ccm_billing.domain.model import Month
from ccm_billing.entrypoints.consumers import consumers
from ccm_billing.service_layer.common import practice_info
from ccm_billing.service_layer.decisions import decide_month
from ccm_billing.service_layer.invoicing import close_period
from ccm_shared.db import Database
from ccm_shared.tables import platform_metadata
from ccm_shared.tenancy import create_practice
from tests.unit.billing import events as ev
from tests.unit.billing.conftest import PRICING

MARCH = Month(2025, 3)
CLOSE_AT = datetime(2025, 4, 3, 12, tzinfo=UTC)


class _Runtime:
    def __init__(self, db):
        self.db = db

    def clock(self):
        return CLOSE_AT


async def _fresh_db(folder: str) -> Database:
    db = Database(f"sqlite+aiosqlite:///{folder}/platform.db", schema="billing")
    async with db.engine.begin() as conn:
        await conn.run_sync(platform_metadata.create_all)
        await conn.run_sync(metadata.create_all)
    await create_practice(db.engine, practice_id="alpha", name="Alpha", timezone="America/New_York",
                          pricing=PRICING)
    return db


async def _deliver_and_decide(events) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        db = await _fresh_db(folder)
        handler = consumers(_Runtime(db))[0].handler
        try:
            for e in events:
                async with db.unit_of_work() as uow:
                    await handler(e, uow)
                    await uow.commit()
            async with db.unit_of_work() as uow:
                info = await practice_info(uow.session, "alpha")
                # March, and April for the time moved there.
                return [d.to_dict() for month in (MARCH, MARCH.next())
                        for d in await decide_month(uow.session, info, month)]
        finally:
            await db.dispose()


def scenario_events():
    """Two patients; an Encounter revised (v2 shortens it) and another reversed; a role that
    re-classifies a performer; a consent replaced by a later version dated mid-month; a visit
    recorded and reversed; a visit moved to another patient; time moved to another month."""
    return [
        *ev.enrolled_patient("alpha", "p1"), *ev.enrolled_patient("alpha", "p2"),
        ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
        ev.role("alpha", "doc-1", "clinical-staff", practitioner="Practitioner/doc-1"),
        ev.role("alpha", "doc-1", "billing-practitioner", practitioner="Practitioner/doc-1", version=2),
        ev.time_logged("alpha", "p1", "e1", 1500, "2025-03-03T10:00:00-05:00"),
        ev.time_logged("alpha", "p1", "e1", 1300, "2025-03-03T10:00:00-05:00", version=2),
        ev.time_logged("alpha", "p1", "e2", 1200, "2025-03-17T10:00:00-04:00"),
        ev.time_reversed("alpha", "p1", "e2", version=2),
        ev.time_logged("alpha", "p2", "e3", 1900, "2025-03-05T10:00:00-05:00",
                       practitioner="Practitioner/doc-1", role="PractitionerRole/doc-1"),
        ev.time_logged("alpha", "p2", "e4", 600, "2025-03-02T10:00:00-05:00"),
        ev.consent("alpha", "p2", "c-p2", obtained="2025-03-04T09:00:00-05:00", version=2),
        # A later visit the day of p1's consent would initiate it, had it not been reversed.
        ev.visit("alpha", "p1", "v-z"),
        ev.visit("alpha", "p1", "v-z", version=2, reason="entered-in-error"),
        # Time moved to April (its date corrected): one source version, a reversal for March and
        # the entry in April.
        ev.time_logged("alpha", "p2", "e5", 300, "2025-03-20T10:00:00-04:00"),
        ev.time_reversed("alpha", "p2", "e5", version=2, reason="not-ccm", month="2025-03"),
        ev.time_logged("alpha", "p2", "e5", 300, "2025-04-20T10:00:00-04:00", version=2),
        # A visit moved from p1 to p2: one source version, a reversal for p1 and a visit for p2.
        ev.visit("alpha", "p1", "v-y"),
        ev.visit("alpha", "p1", "v-y", version=2, reason="not-a-visit"),
        ev.visit("alpha", "p2", "v-y", version=2),
    ]


BASELINE: list = []


def baseline() -> list[dict]:
    if not BASELINE:
        BASELINE.append(asyncio.run(_deliver_and_decide(scenario_events())))
    return BASELINE[0]


def test_the_baseline_decides_what_the_events_say():
    rows = {d["patient"]: d for d in baseline() if d["month"] == "2025-03"}
    april = {d["patient"]: d for d in baseline() if d["month"] == "2025-04"}
    assert april["Patient/p2"]["counted"] == ["e5"]
    assert rows["Patient/p1"]["seconds"] == {"staff": 1300, "practitioner": 0}
    assert rows["Patient/p1"]["codes"] == {"99490": 1}
    assert rows["Patient/p2"]["codes"] == {"99491": 1}
    assert rows["Patient/p2"]["warnings"] == ["consent-after-service"]
    assert "Encounter/e5" not in {n["entry"] for n in rows["Patient/p2"]["notCounted"]}
    assert "e5" not in rows["Patient/p2"]["counted"]  # it is April's now
    assert rows["Patient/p1"]["initiatingVisit"] == {"encounter": "Encounter/v-p1",
                                                     "date": "2024-12-01"}
    assert rows["Patient/p2"]["initiatingVisit"] == {"encounter": "Encounter/v-y",
                                                     "date": "2024-12-01"}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.permutations(range(len(scenario_events()))), st.lists(st.integers(0, 20), max_size=6))
def test_shuffled_and_duplicated_delivery_gives_the_same_decisions(order, duplicates):
    events = scenario_events()
    delivered = [events[i] for i in order] + [events[i % len(events)] for i in duplicates]
    assert asyncio.run(_deliver_and_decide(delivered)) == baseline()


async def _close_twice(patients: list[tuple[int, int]]):
    with tempfile.TemporaryDirectory() as folder:
        db = await _fresh_db(folder)
        handler = consumers(_Runtime(db))[0].handler
        events = [ev.role("alpha", "nurse-1", "clinical-staff"),
                  ev.role("alpha", "doc-1", "billing-practitioner")]
        for n, (staff, prac) in enumerate(patients):
            events += ev.enrolled_patient("alpha", f"p{n}")
            events.append(ev.time_logged("alpha", f"p{n}", f"s{n}", staff, "2025-03-10T10:00:00-04:00"))
            events.append(ev.time_logged("alpha", f"p{n}", f"d{n}", prac, "2025-03-11T10:00:00-04:00",
                                         practitioner="Practitioner/doc-1", role="PractitionerRole/doc-1"))
        try:
            for e in events:
                async with db.unit_of_work() as uow:
                    await handler(e, uow)
                    await uow.commit()
            results = []
            for _ in range(2):
                async with db.unit_of_work() as uow:
                    results.append(await close_period(uow, "alpha", MARCH, CLOSE_AT))
                    await uow.commit()
            invoice = None
            if results[0]["invoice"]:
                from ccm_billing.adapters.filed import invoice_resource
                from ccm_billing.service_layer.invoicing import get_invoice_row

                async with db.unit_of_work() as uow:  # as a FHIR read serves it
                    invoice = await invoice_resource(uow.session, await get_invoice_row(
                        uow.session, results[0]["invoice"]["id"]))
            return results, invoice
        finally:
            await db.dispose()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 7200), st.integers(0, 7200)), min_size=1, max_size=6))
def test_closing_twice_is_identical_and_totals_are_sums_of_lines(patients):
    (first, second), invoice = asyncio.run(_close_twice(patients))
    assert first == second
    if invoice is None:
        assert first["summary"]["patientsBillable"] == 0
        return
    lines = [Decimal(str(li["priceComponent"][0]["amount"]["value"])) for li in invoice["lineItem"]]
    assert sum(lines, Decimal("0")) == Decimal(first["invoice"]["totalNet"])
    assert Decimal(str(invoice["totalNet"]["value"])) == Decimal(first["invoice"]["totalNet"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6).map(lambda n: f"ci-{n:032x}"),
                          st.decimals(min_value=0, max_value=10**9, places=2)), max_size=30))
def test_invoice_lines_are_the_json_orjson_writes_for_them(lines):
    """fhir.line_items writes Invoice.lineItem directly: the same text orjson writes for the
    line dicts (the Invoice's stored and published form)."""
    import orjson

    from ccm_billing.adapters import fhir

    dicts = [{"sequence": n, "chargeItemReference": {"reference": f"ChargeItem/{ci}"},
              "priceComponent": [{"type": "base", "amount": fhir.money(amount)}]}
             for n, (ci, amount) in enumerate(lines, start=1)]
    assert orjson.dumps({"lineItem": fhir.line_items(lines)}) == orjson.dumps({"lineItem": dicts})
