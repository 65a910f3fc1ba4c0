"""A care-plan escalation held for a recipient, on real PostgreSQL: released by whichever of
several concurrent triggers comes first (contacts saved, the periodic sweep, the escalation
announced again with a supervisor), and by exactly one of them."""

import asyncio
import json
import uuid

import pytest
import pytest_asyncio
from sqlalchemy import select

from ccm_notification.adapters.orm import messages, outbox
from ccm_notification.bootstrap import SERVICE
from ccm_notification.entrypoints.workers import notifier_of, sweep_and_release
from ccm_notification.service_layer.directory import edit_provider
from ccm_shared.events import CloudEvent, to_message
from tests.support.infra import api_on_postgres

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    async with api_on_postgres(infra.database_url, SERVICE, "held") as (rt, client, practice,
                                                                       headers):
        yield rt, client, practice, headers


def escalated(practice: str, key: str, supervisor: str | None = None) -> CloudEvent:
    return CloudEvent(
        source="/ccm/careplan", type="careplan.review.escalated.v1", tenant=practice,
        subject="Patient/p1",
        data={"tracker": "tr-1", "carePlan": "CarePlan/cp1", "patient": "Patient/p1",
              "dueDate": "2026-06-01", "daysOverdue": 180,
              "responsibleProvider": "Practitioner/doc-1", "supervisor": supervisor, "step": 5,
              "idempotencyKey": key})


async def test_concurrent_releases_address_the_held_escalation_once(api):
    rt, client, practice, headers = api
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    now = rt.clock()
    async with rt.db.unit_of_work() as uow:
        for pid in ("doc-1", "lead"):
            await edit_provider(uow, practice, pid, {"name": pid, "email": f"{pid}@x.test"}, (),
                                actor="test", now=now, if_match=None)
        await uow.commit()
    key = f"{practice}:tr-1:escalated:2026-06-01:5"
    await alerts.process(to_message("careplan.review.escalated.v1", escalated(practice, key)))
    async with rt.db.unit_of_work() as uow:
        [held] = (await uow.session.execute(select(messages).where(
            messages.c.practice == practice))).all()
    assert held.status == "pending" and held.next_attempt_at is None

    again = escalated(practice, key, "Practitioner/lead").model_copy(
        update={"id": str(uuid.uuid4())})
    answers = await asyncio.gather(
        client.put(f"/v1/practices/{practice}/contacts", headers=headers,
                   json={"supervisor": "lead", "summary_recipients": []}),
        sweep_and_release(rt, notifier_of(rt)),
        alerts.process(to_message(again.type, again)),
        sweep_and_release(rt, notifier_of(rt)),
    )
    assert answers[0].status_code == 200, answers[0].text
    async with rt.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(messages).where(
            messages.c.practice == practice))).all()
        failed = (await uow.session.execute(select(outbox.c.payload).where(
            outbox.c.tenant == practice,
            outbox.c.event_type == "notification.message.failed.v1"))).scalars().all()
    assert [(r.id, r.provider_id, r.recipient, r.status) for r in rows] == [
        (held.id, "lead", "lead@x.test", "pending")]
    assert rows[0].next_attempt_at is not None and rows[0].ack_due_at is not None
    assert [json.loads(p) for p in failed] == []
    assert alerts.stats.dead_lettered == 0
