"""Across services on real PostgreSQL and Kafka: a CCM transaction Bundle pushed to ingest's FHIR
endpoint becomes a tracked care plan in careplan."""

import json
import uuid
from pathlib import Path

import httpx
import pytest

from ccm_careplan.bootstrap import SERVICE as CAREPLAN
from ccm_careplan.service_layer.tracking import CONSUMED_TOPICS, make_handler
from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.migrate import upgrade_async
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.integration.conftest import eventually
from tests.support.kafka_read import start_group_at_end

pytestmark = pytest.mark.asyncio(loop_scope="session")
ROOT = Path(__file__).resolve().parents[3]
BUNDLE = ROOT / "services/ingest/examples/ccm-transaction-bundle.json"


async def test_a_care_plan_pushed_to_ingest_appears_in_the_tracker(infra):
    ingest_definition = discover_services()["ingest"]
    for d in (ingest_definition, CAREPLAN):
        await upgrade_async(infra.database_url, d.schema, d.migrations_package)
    settings = load_settings(database_url=infra.database_url,
                             kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
                             outbox_poll_interval_seconds=0.05, consumer_max_retries=0)
    ingest = ServiceRuntime.build(ingest_definition, settings)
    careplan = ServiceRuntime.build(CAREPLAN, settings)
    careplan.consumers = [ConsumerRuntime(  # a group of its own: no other process shares it
        name=f"careplan-it-{uuid.uuid4().hex[:8]}", topics=CONSUMED_TOPICS,
        handler=make_handler(careplan.clock), db=careplan.db, transport=careplan.transport,
        max_retries=0)]
    practice = f"cp-e2e-{uuid.uuid4().hex[:8]}"
    await create_practice(ingest.db.engine, practice_id=practice, name="Lakeside",
                          timezone="America/New_York", pricing=Pricing())
    token = await create_token(ingest.db.engine, practice_id=practice, label="ehr-test")
    auth = {"Authorization": f"Bearer {token}"}
    await ingest.start(consumers=False, background=False)
    await careplan.transport.ensure_topics(CONSUMED_TOPICS)
    await start_group_at_end(infra.kafka_bootstrap_servers, careplan.consumers[0].name,
                             CONSUMED_TOPICS)
    await careplan.start(background=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ingest.app()),
                                     base_url="http://ingest", timeout=60) as fhir:
            pushed = await fhir.post("/fhir", json=json.loads(BUNDLE.read_text()), headers=auth)
            assert pushed.status_code == 200, pushed.text
        locations = [e["response"]["location"] for e in pushed.json()["entry"]]
        plan_ref = next(loc for loc in locations if loc.startswith("CarePlan/"))
        plan_ref = "/".join(plan_ref.split("/")[:2])
        author = next(loc for loc in locations if loc.startswith("Practitioner/"))
        author = "/".join(author.split("/")[:2])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=careplan.app()),
                                     base_url="http://careplan", timeout=60) as api:
            async def tracked() -> bool:
                r = await api.get(f"/v1/practices/{practice}/care-plans", headers=auth)
                return r.status_code == 200 and r.json()["total"] == 1

            await eventually(tracked, timeout=120, what="ingest's CarePlan in the tracker")
            item, = (await api.get(f"/v1/practices/{practice}/care-plans",
                                   headers=auth)).json()["items"]
    finally:
        await careplan.stop()
        await ingest.stop()
    assert item["care_plan"] == plan_ref
    assert item["created"] == "2026-02-27" and item["next_review_due"] == "2027-02-27"
    assert item["responsible_provider"] == author
    assert item["signoff"]["status"] == "awaiting"
    assert item["early_review"] is None  # its chronic conditions are the ones it addresses
