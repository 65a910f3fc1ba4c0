"""Steps with nobody to receive them, on real PostgreSQL: a plan without a responsible provider
has its reminders wait (and sent once one is known), and a supervisor set after an escalation is
named in that escalation again; every event is contract-valid."""

import json
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_careplan.bootstrap import SERVICE
from ccm_careplan.service_layer.common import tracker_id
from ccm_careplan.service_layer.scheduler import run_scheduler_pass
from ccm_careplan.service_layer.tracking import make_handler
from ccm_shared.tables import outbox_table
from tests.support.contracts import assert_valid_event
from tests.support.infra import api_on_postgres
from tests.unit.careplan import factories as f

pytestmark = pytest.mark.asyncio(loop_scope="session")
T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)
LATE = datetime(2027, 2, 20, 15, 0, tzinfo=UTC)


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    async with api_on_postgres(infra.database_url, SERVICE, "rcpt") as (rt, client, practice,
                                                                       headers):
        yield rt, client, practice, headers


async def apply(rt, *events) -> None:  # noqa: ANN001
    handler = make_handler(lambda: T0)
    for event in events:
        async with rt.db.unit_of_work() as uow:
            await handler(event, uow)
            await uow.commit()


async def emitted(rt, practice: str) -> list[dict]:  # noqa: ANN001
    async with rt.db.engine.connect() as conn:
        rows = (await conn.execute(select(outbox_table.c.payload).where(
            outbox_table.c.tenant == practice).order_by(outbox_table.c.id))).scalars().all()
    return [json.loads(p) for p in rows]


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == f"careplan.review.{kind}.v1"]


async def test_held_reminders_and_a_late_supervisor_on_postgres(api):
    rt, client, practice, headers = api
    await apply(rt, f.patient(practice, at=T0),
                f.care_plan(practice, "CarePlan/cp-1", at=T0, author=None, care_team=()))
    first = await run_scheduler_pass(rt.db, LATE, practices=[practice])
    assert first.held > 0 and first.sent == 1
    events = await emitted(rt, practice)
    assert [e["type"] for e in events] == ["careplan.review.escalated.v1"]
    tracker = tracker_id(practice, "CarePlan/cp-1")

    put = await client.put(f"/v1/practices/{practice}/care-plan-rules", headers=headers,
                           json={"clinical_supervisor": "Practitioner/sup-1"})
    assert put.status_code == 200, put.text
    announced = of_type(await emitted(rt, practice), "escalated")
    assert len(announced) == 2 and announced[1]["data"]["supervisor"] == "Practitioner/sup-1"
    assert announced[1]["data"]["idempotencyKey"] == announced[0]["data"]["idempotencyKey"]
    assert announced[1]["id"] != announced[0]["id"]

    await apply(rt, f.patient(practice, at=LATE, gps=("Practitioner/dr-kim",), version="2"))
    later = LATE.replace(hour=16)
    again = await run_scheduler_pass(rt.db, later, practices=[practice])
    assert (again.held, again.sent) == (0, 1)  # the latest reminder (due, overdue superseded)
    events = await emitted(rt, practice)
    assert of_type(events, "due") == of_type(events, "overdue") == []
    [event] = of_type(events, "reminder")
    assert event["data"]["responsibleProvider"] == "Practitioner/dr-kim"
    for event in events:
        assert_valid_event(event)
    assert (await run_scheduler_pass(rt.db, later, practices=[practice])).sent == 0
    plan = (await client.get(f"/v1/care-plans/{tracker}", headers=headers)).json()
    assert plan["notices_held"] is None
