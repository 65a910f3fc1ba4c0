"""Tenant isolation through a service's HTTP API on PostgreSQL."""

import uuid

import httpx
import pytest

from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from ccm_shared.transport import KafkaTransport

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize("service", ["ingest", "billing", "careplan", "notification"])
async def test_cross_tenant_reads_answer_not_found_and_bad_tokens_401(infra, service):
    definition = discover_services()[service]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    settings = load_settings(database_url=infra.database_url,
                             kafka_bootstrap_servers=infra.kafka_bootstrap_servers)
    # A transport of its own: stopping the runtime stops it.
    runtime = ServiceRuntime.build(definition, settings, transport=KafkaTransport(
        infra.kafka_bootstrap_servers, client_id=f"tenancy-{service}"))
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    for pid in (a, b):
        await create_practice(runtime.db.engine, practice_id=pid, name=pid,
                              timezone="America/Chicago", pricing=Pricing())
    token_a = await create_token(runtime.db.engine, practice_id=a)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                     base_url="http://t") as client:
            own = await client.get(f"/v1/practices/{a}", headers={"Authorization": f"Bearer {token_a}"})
            other = await client.get(f"/v1/practices/{b}", headers={"Authorization": f"Bearer {token_a}"})
            none = await client.get(f"/v1/practices/{a}")
            wrong = await client.get(f"/v1/practices/{a}", headers={"Authorization": "Bearer ccm_x"})
            ready = await client.get("/readyz")
            # An API-only process uses no Kafka (events go to the outbox): its readiness does
            # not depend on it; one running the relay checks it.
            await runtime.start(consumers=False, relay=True, background=False)
            relaying = await client.get("/readyz")
            await runtime.stop()
    finally:
        await runtime.db.dispose()
    assert own.status_code == 200 and own.json()["id"] == a
    assert other.status_code == 404
    assert none.status_code == 401 and wrong.status_code == 401
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok"}, ready.text
    assert relaying.status_code == 200, relaying.text
    checks = relaying.json()["checks"]
    assert checks["database"] == "ok" and checks["kafka"] == "ok"
    assert set(checks.values()) == {"ok"}


async def test_pooled_connections_survive_their_backend_being_terminated(infra):
    """No ping on every checkout: an idle connection is pinged and replaced; a busy one fails
    its next statement once (a disconnect, which invalidates the pool) and the next works."""
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from ccm_shared.db import create_engine_for

    async def backend(engine) -> int:
        async with engine.connect() as conn:
            return (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()

    killer = create_engine_for(infra.database_url, schema=None, pool_size=1)
    idle = create_engine_for(infra.database_url, schema=None, pool_size=1, idle_ping_seconds=0.2)
    busy = create_engine_for(infra.database_url, schema=None, pool_size=1,
                             idle_ping_seconds=3600)

    async def terminate(pid: int) -> None:  # only the backend this test opened
        async with killer.connect() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        await asyncio.sleep(0.3)

    try:
        first = await backend(idle)
        assert await backend(idle) == first  # pooled: the same connection again
        await terminate(first)
        assert await backend(idle) != first  # idle 0.3 s > 0.2 s: pinged, found dead, replaced

        first = await backend(busy)
        await terminate(first)
        with pytest.raises(DBAPIError) as failed:
            await backend(busy)
        assert failed.value.connection_invalidated
        assert await backend(busy) != first
    finally:
        for engine in (killer, idle, busy):
            await engine.dispose()
