"""Ingest on PostgreSQL with its outbox relay publishing to Kafka (``infra``: the suite's real
PostgreSQL and Apache Kafka)."""

import uuid

import httpx
import pytest_asyncio

from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token


@pytest_asyncio.fixture(loop_scope="session")
async def ingest_pg(infra):
    """Ingest on PostgreSQL with its outbox relay publishing to Kafka, for two fresh practices:
    an HTTP client with ``.practice`` (alpha's id), ``.other`` (beta's), ``.tokens`` (``alpha``,
    ``alpha-read``: fhir:read only, ``beta``) and ``.runtime``; alpha's token by default."""
    definition = discover_services()["ingest"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    settings = load_settings(database_url=infra.database_url,
                             kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
                             outbox_poll_interval_seconds=0.05)
    runtime = ServiceRuntime.build(definition, settings)
    alpha, beta = (f"ingest-{uuid.uuid4().hex[:10]}" for _ in range(2))
    for practice in (alpha, beta):
        await create_practice(runtime.db.engine, practice_id=practice, name="Lakeside",
                              timezone="America/New_York", pricing=Pricing())
    tokens = {"alpha": await create_token(runtime.db.engine, practice_id=alpha,
                                          label="ehr-test"),
              "alpha-read": await create_token(runtime.db.engine, practice_id=alpha,
                                               scopes=("fhir:read",)),
              "beta": await create_token(runtime.db.engine, practice_id=beta)}
    await runtime.start(consumers=False, background=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                 base_url="http://ingest", timeout=60,
                                 headers={"Authorization": f"Bearer {tokens['alpha']}"}
                                 ) as client:
        client.practice, client.other, client.tokens = alpha, beta, tokens
        client.runtime = runtime
        yield client
    await runtime.stop()
