"""The ingest app on the embedded database (SQLite files) with the in-process bus."""

import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest_asyncio
from sqlalchemy import func, select

from ccm_ingest.adapters.orm import outbox, resource_versions, resources
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.support.embedded import embedded_runtime

EXAMPLES = Path("/work/shared/fhir-examples")
if not EXAMPLES.exists():  # the repository's sibling checkout
    EXAMPLES = Path(__file__).resolve().parents[4] / "shared" / "fhir-examples"
NOW = datetime(2026, 3, 15, 14, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def example(relative: str) -> dict:
    return json.loads((EXAMPLES / relative).read_text())


@pytest_asyncio.fixture
async def fhir(tmp_path):
    """An httpx client on the ingest app; ``.tokens`` per practice, ``.runtime``, ``.clock``."""
    clock = Clock()
    runtime = await embedded_runtime(tmp_path, "ingest", clock=clock, max_body_bytes=200_000)
    for pid, tz in (("alpha", "America/New_York"), ("beta", "America/Los_Angeles")):
        await create_practice(runtime.db.engine, practice_id=pid, name=pid.title(),
                              timezone=tz, pricing=Pricing())
    tokens = {pid: await create_token(runtime.db.engine, practice_id=pid, label=f"ehr-{pid}")
              for pid in ("alpha", "beta")}
    tokens["alpha-read"] = await create_token(runtime.db.engine, practice_id="alpha",
                                              scopes=("fhir:read",))
    transport = httpx.ASGITransport(app=runtime.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        client.tokens = tokens
        client.runtime = runtime
        client.clock = clock
        client.headers["Authorization"] = f"Bearer {tokens['alpha']}"
        yield client
    await runtime.db.dispose()


def as_practice(client, practice: str) -> dict:
    return {"Authorization": f"Bearer {client.tokens[practice]}"}


async def counts(client) -> dict[str, int]:
    """Rows written so far: resources, versions, outbox events."""
    async with client.runtime.db.engine.connect() as conn:
        return {
            name: (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            for name, table in (("resources", resources), ("versions", resource_versions),
                                ("events", outbox))
        }


async def events(client, event_type: str | None = None) -> list[dict]:
    async with client.runtime.db.engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.payload).order_by(outbox.c.id))).all()
    found = [json.loads(r.payload) for r in rows]
    return [e for e in found if event_type is None or e["type"] == event_type]
