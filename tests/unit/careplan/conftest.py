"""An embedded careplan service (SQLite + in-process bus) whose clock the test controls."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest_asyncio
from sqlalchemy import select

from ccm_careplan.bootstrap import SERVICE
from ccm_careplan.service_layer.scheduler import run_scheduler_pass
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.service import ServiceRuntime
from ccm_shared.tables import outbox_table
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime
from tests.unit.careplan.factories import Clock


class Careplan:
    """The service under test plus helpers to feed it events and read what it emitted."""

    def __init__(self, runtime: ServiceRuntime, clock: Clock, client: httpx.AsyncClient,
                 tokens: dict[str, str]) -> None:
        self.runtime, self.clock, self.client, self.tokens = runtime, clock, client, tokens

    def auth(self, practice: str = "alpha") -> dict:
        return {"Authorization": f"Bearer {self.tokens[practice]}"}

    async def deliver(self, event: CloudEvent) -> None:
        """Through the consumer runtime, inbox included, as Kafka would deliver it."""
        await self.runtime.consumers[0].process(to_message(event.type, event))

    async def scheduler(self, now: datetime | None = None):  # noqa: ANN201
        return await run_scheduler_pass(self.runtime.db, now or self.clock.now)

    async def emitted(self, kind: str | None = None) -> list[dict]:
        async with self.runtime.db.engine.connect() as conn:
            rows = (await conn.execute(select(outbox_table.c.payload).order_by(
                outbox_table.c.id))).scalars().all()
        events = [json.loads(p) for p in rows]
        return [e for e in events if kind is None or e["type"] == kind]


@pytest_asyncio.fixture
async def careplan(tmp_path, monkeypatch):
    for var in ("CCM_CAREPLAN_SCHEDULER_ENABLED", "CCM_CAREPLAN_SCHEDULER_INTERVAL_SECONDS"):
        monkeypatch.delenv(var, raising=False)
    clock = Clock(datetime(2026, 1, 5, 15, 0, tzinfo=UTC))
    runtime = await embedded_runtime(tmp_path, SERVICE, clock=clock)
    for pid in ("alpha", "beta"):
        await create_practice(runtime.db.engine, practice_id=pid, name=pid.title(),
                              timezone="America/Chicago", pricing=Pricing())
    tokens = {pid: await create_token(runtime.db.engine, practice_id=pid)
              for pid in ("alpha", "beta")}
    transport = httpx.ASGITransport(app=runtime.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield Careplan(runtime, clock, client, tokens)
    await runtime.db.dispose()
