"""Fixtures of the payment tests (voids, refunds, carry-over): billing on PostgreSQL with a
practice of each test's own, its tokens and an HTTP client, and billing embedded."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest_asyncio
from sqlalchemy import select

from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tables import api_tokens
from ccm_shared.tenancy import create_practice, create_token, hash_token
from ccm_shared.transport import InProcessTransport
from tests.unit.billing.conftest import PRICING, Clock, billing  # noqa: F401 - embedded


@dataclass
class Billing:
    """Billing on PostgreSQL (the billing schema of the test database, migrated), a practice of
    the test's own and another one, a token of each (labelled ``finance``), an HTTP client."""

    runtime: ServiceRuntime
    practice: str
    other: str
    tokens: dict[str, str]
    token_ids: dict[str, str]
    clock: Clock
    client: httpx.AsyncClient

    def headers(self, practice: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[practice or self.practice]}"}

    async def get(self, path: str, **kw):  # noqa: ANN003, ANN201
        return await self.client.get(path, headers=self.headers(), **kw)

    async def post(self, path: str, practice: str | None = None, **kw):  # noqa: ANN003, ANN201
        return await self.client.post(path, headers=self.headers(practice), **kw)


async def billing_on_postgres(infra, clock: Clock) -> ServiceRuntime:  # noqa: ANN001
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    return ServiceRuntime.build(definition, load_settings(database_url=infra.database_url),
                                transport=InProcessTransport(), clock=clock)


async def new_practice(runtime: ServiceRuntime, prefix: str) -> str:
    practice = f"{prefix}-{uuid.uuid4().hex[:10]}"
    await create_practice(runtime.db.engine, practice_id=practice, name=prefix,
                          timezone="America/New_York", pricing=PRICING)
    return practice


@pytest_asyncio.fixture(loop_scope="session")
async def postgres(infra):  # noqa: ANN001, ANN201
    clock = Clock(datetime(2025, 3, 20, 15, tzinfo=UTC))
    runtime = await billing_on_postgres(infra, clock)
    practice, other = await new_practice(runtime, "pay"), await new_practice(runtime, "oth")
    tokens, ids = {}, {}
    for p in (practice, other):
        tokens[p] = await create_token(runtime.db.engine, practice_id=p, label="finance")
    async with runtime.db.engine.connect() as conn:
        for p, token in tokens.items():
            ids[p] = (await conn.execute(select(api_tokens.c.id).where(
                api_tokens.c.token_hash == hash_token(token)))).scalar_one()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                               base_url="http://billing")
    try:
        yield Billing(runtime, practice, other, tokens, ids, clock, client)
    finally:
        await client.aclose()
        await runtime.db.dispose()
