"""Ingest's re-mapped care plans (``source.mappingRevision``) on real PostgreSQL and Kafka: a
practice that changes which CarePlan categories count as CCM sees its tracked plan closed, and
tracked again when it changes them back; and careplan_0004 upgrades a database from before it
(PostgreSQL, and SQLite as in embedded mode). Re-mapped events delivered at once, in any order,
leave the tracker in the state of the newest."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa
from alembic import command

from ccm_careplan.bootstrap import SERVICE as CAREPLAN
from ccm_careplan.service_layer.common import tracker_id
from ccm_careplan.service_layer.tracking import CONSUMED_TOPICS, make_handler
from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.db import create_engine_for
from ccm_shared.migrate import alembic_config, upgrade, upgrade_async, upgrade_platform
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.integration.conftest import eventually
from tests.support.infra import api_on_postgres
from tests.support.kafka_read import start_group_at_end
from tests.unit.careplan import factories as f

ROOT = Path(__file__).resolve().parents[3]
BUNDLE = ROOT / "services/ingest/examples/ccm-transaction-bundle.json"
PACKAGE = "ccm_careplan.migrations"
NOT_THIS_ONE = {"care_plan_categories": ["urn:ehr:care-plan-kind|not-the-bundles"]}


@pytest.mark.asyncio(loop_scope="session")
async def test_an_ingest_config_change_closes_and_reopens_the_tracked_plan(infra):
    ingest_definition = discover_services()["ingest"]
    for d in (ingest_definition, CAREPLAN):
        await upgrade_async(infra.database_url, d.schema, d.migrations_package)
    settings = load_settings(database_url=infra.database_url,
                             kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
                             outbox_poll_interval_seconds=0.05, consumer_max_retries=0)
    ingest = ServiceRuntime.build(ingest_definition, settings)
    careplan = ServiceRuntime.build(CAREPLAN, settings)
    careplan.consumers = [ConsumerRuntime(  # a group of its own: no other process shares it
        name=f"careplan-remap-{uuid.uuid4().hex[:8]}", topics=CONSUMED_TOPICS,
        handler=make_handler(careplan.clock), db=careplan.db, transport=careplan.transport,
        max_retries=0)]
    practice = f"cp-remap-{uuid.uuid4().hex[:8]}"
    await create_practice(ingest.db.engine, practice_id=practice, name="Lakeside",
                          timezone="America/New_York", pricing=Pricing())
    auth = {"Authorization": f"Bearer {await create_token(ingest.db.engine, practice_id=practice)}"}
    await ingest.start(consumers=False, background=False)
    await careplan.transport.ensure_topics(CONSUMED_TOPICS)
    await start_group_at_end(infra.kafka_bootstrap_servers, careplan.consumers[0].name,
                             CONSUMED_TOPICS)
    await careplan.start(background=False)
    try:
        async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=ingest.app()),
                                      base_url="http://ingest", timeout=60) as fhir,
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=careplan.app()),
                                      base_url="http://careplan", timeout=60) as api):
            pushed = await fhir.post("/fhir", json=json.loads(BUNDLE.read_text()), headers=auth)
            assert pushed.status_code == 200, pushed.text
            state: dict = {}

            async def status_is(wanted: str) -> bool:
                r = await api.get(f"/v1/practices/{practice}/care-plans", headers=auth)
                items = r.json()["items"] if r.status_code == 200 else []
                if items:
                    detail = await api.get(f"/v1/care-plans/{items[0]['id']}", headers=auth)
                    state.update(detail.json())
                return bool(items) and items[0]["status"] == wanted

            await eventually(lambda: status_is("active"), timeout=120, what="the tracked plan")
            config = f"/v1/practices/{practice}/ingest-config"
            dropped = await fhir.put(config, json=NOT_THIS_ONE, headers=auth)
            assert dropped.status_code == 200, dropped.text
            await eventually(lambda: status_is("entered-in-error"), timeout=120,
                             what="the plan closed by the config change")
            restored = await fhir.put(config, json={}, headers=auth)
            assert restored.status_code == 200, restored.text
            await eventually(lambda: status_is("active"), timeout=120,
                             what="the plan tracked again")
    finally:
        await careplan.stop()
        await ingest.stop()
    closed, reopened = dropped.json()["revision"], restored.json()["revision"]
    versions = [(v["mapping_revision"], v["event"], v["status"], v["applied"])
                for v in state["versions"]]
    assert versions == [
        (None, "ingest.care-plan.created.v1", "active", True),
        (closed, "ingest.care-plan.closed.v1", "entered-in-error", True),
        (reopened, "ingest.care-plan.created.v1", "active", True)]
    assert len({v["version_id"] for v in state["versions"]}) == 1  # one EHR version
    assert state["signoff"]["status"] == "awaiting" and state["early_review"] is None
    assert state["distribution"]["history"]  # sent once, when first tracked
    assert {d["version_id"] for d in state["distribution"]["history"]} == {
        state["current_version"]}


@pytest_asyncio.fixture(loop_scope="session")
async def api(infra):
    async with api_on_postgres(infra.database_url, CAREPLAN, "remap") as (rt, client, practice,
                                                                         headers):
        yield rt, client, practice, headers


@pytest.mark.asyncio(loop_scope="session")
async def test_revisions_of_one_version_applied_at_once_leave_the_newest(api):
    """Each event in a transaction of its own, all at once: the tracker's row lock orders them,
    the newest (version, revision) wins whichever commits last, and the same version and
    revision twice is one row of the history."""
    rt, client, practice, headers = api
    at = datetime(2026, 1, 5, 15, tzinfo=UTC)
    plan = "CarePlan/cp-1"
    handler = make_handler(lambda: at)

    async def apply(event) -> None:  # noqa: ANN001
        async with rt.db.unit_of_work() as uow:
            await handler(event, uow)
            await uow.commit()

    await apply(f.care_plan(practice, plan, at=at))
    restated = [f.care_plan(practice, plan, at=at, mapping_revision=r, kind=kind, status=status,
                            author=f"Practitioner/dr-{r}")
                for r, kind, status in ((1, "closed", "entered-in-error"),
                                        (2, "created", "active"),
                                        (3, "closed", "entered-in-error"))]
    twice = [e.model_copy(update={"id": f"{e.id}-again"}) for e in restated]
    await asyncio.gather(*(apply(e) for e in [*reversed(restated), *twice]))
    r = await client.get(f"/v1/care-plans/{tracker_id(practice, plan)}", headers=headers)
    assert r.status_code == 200, r.text
    t = r.json()
    assert (t["status"], t["author"]) == ("entered-in-error", "Practitioner/dr-3")
    assert [(v["version_id"], v["mapping_revision"]) for v in t["versions"]] == [
        ("1", None), ("1", 1), ("1", 2), ("1", 3)]


# -- careplan_0004 on a database from before it ------------------------------------------------

def run_sql(url: str, schema: str, statements: list[str]) -> list:
    async def go() -> list:
        engine = create_engine_for(url, schema=schema, pool_size=1)
        try:
            async with engine.begin() as conn:
                out = []
                for sql in statements:
                    result = await conn.execute(sa.text(sql.replace("S.", f'"{schema}".')))
                    out.append(result.all() if result.returns_rows else None)
                return out
        finally:
            await engine.dispose()
    return asyncio.run(go())


def shape(url: str, schema: str) -> tuple[list, dict[str, set]]:
    """(the versions' primary key, the revision columns of each table)."""
    wanted = {"mapping_revision", "current_mapping_revision", "version_id"}

    async def read() -> tuple[list, dict[str, set]]:
        engine = create_engine_for(url, schema=schema, pool_size=1)
        try:
            async with engine.connect() as conn:
                def inspect(c):  # noqa: ANN001, ANN202
                    i = sa.inspect(c)
                    tables = ("care_plan_trackers", "care_plan_versions", "patients",
                              "practitioners", "conditions")
                    columns = {t: {x["name"] for x in i.get_columns(t, schema=schema)} & wanted
                               for t in tables}
                    columns["care_plan_versions"] -= {"version_id"}  # its own, from the start
                    key = i.get_pk_constraint("care_plan_versions", schema=schema)
                    return key["constrained_columns"], columns
                return await conn.run_sync(inspect)
        finally:
            await engine.dispose()
    return asyncio.run(read())


BEFORE = (["tracker_id", "version_id"], {t: set() for t in (
    "care_plan_trackers", "care_plan_versions", "patients", "practitioners", "conditions")})
AFTER = (["tracker_id", "version_id", "mapping_revision"], {
    "care_plan_trackers": {"current_mapping_revision"},
    "care_plan_versions": {"mapping_revision"},
    **{t: {"version_id", "mapping_revision"} for t in ("patients", "practitioners",
                                                       "conditions")}})


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):  # noqa: ANN001, ANN201
    """(url, schema) of a database at careplan_0003 with the shape it had then: the first
    migrations create today's tables, so it is migrated to the head and downgraded."""
    if request.param == "sqlite":
        url, schema = f"sqlite+aiosqlite:///{tmp_path}/ccm.db", "careplan"
        upgrade_platform(url)
    else:
        url = request.getfixturevalue("infra").database_url
        schema = f"t_c04_{uuid.uuid4().hex[:8]}"
    upgrade(url, schema, PACKAGE)
    command.downgrade(alembic_config(url, schema, PACKAGE), "careplan_0003")
    yield url, schema
    if request.param == "postgresql":
        run_sql(url, schema, [f'DROP SCHEMA "{schema}" CASCADE'])


def test_careplan_0004_on_a_database_from_before_it(database):
    url, schema = database
    assert shape(url, schema) == BEFORE
    run_sql(url, schema, [
        "INSERT INTO S.care_plan_trackers (id, practice, care_plan, patient, status, intent, "
        "first_seen, current_version, current_last_updated, care_team, addresses, "
        "signoff_status, reminders_sent, escalation_level, updated_at) VALUES ('t-1', 'alpha', "
        "'CarePlan/cp-1', 'Patient/p1', 'active', 'plan', '2026-01-05', '2', "
        "'2026-01-05 15:00:00', '[]', '[]', 'awaiting', 0, 0, '2026-01-05 15:00:00')",
        *("INSERT INTO S.care_plan_versions (tracker_id, version_id, practice, event_type, "
          f"status, last_updated, applied, received_at) VALUES ('t-1', '{v}', 'alpha', "
          "'ingest.care-plan.created.v1', 'active', '2026-01-05 15:00:00', true, "
          "'2026-01-05 15:00:00')" for v in ("1", "2")),
        "INSERT INTO S.patients (practice, patient, active, deceased, deleted, "
        "general_practitioners, last_updated) VALUES ('alpha', 'Patient/p1', true, false, "
        "false, '[]', '2026-01-05 15:00:00')"])
    upgrade(url, schema, PACKAGE)
    assert shape(url, schema) == AFTER
    trackers, versions, patients = run_sql(url, schema, [
        "SELECT id, current_version, current_mapping_revision FROM S.care_plan_trackers",
        "SELECT version_id, mapping_revision, applied FROM S.care_plan_versions "
        "ORDER BY version_id",
        "SELECT patient, active, version_id, mapping_revision FROM S.patients"])
    assert trackers == [("t-1", "2", 0)]
    assert versions == [("1", 0, True), ("2", 0, True)]  # kept, as first mapped
    assert patients == [("Patient/p1", True, None, 0)]
    # A re-mapped version: a row of its own, which the code before would take for a duplicate.
    run_sql(url, schema, [
        "INSERT INTO S.care_plan_versions (tracker_id, version_id, practice, event_type, "
        "status, last_updated, applied, received_at, mapping_revision) VALUES ('t-1', '2', "
        "'alpha', 'ingest.care-plan.closed.v1', 'entered-in-error', '2026-01-05 15:00:00', "
        "true, '2026-01-06 15:00:00', 3)"])
    with pytest.raises(RuntimeError, match="1 care-plan version"):
        command.downgrade(alembic_config(url, schema, PACKAGE), "careplan_0003")
    assert shape(url, schema) == AFTER  # nothing dropped
    run_sql(url, schema, ["DELETE FROM S.care_plan_versions WHERE mapping_revision = 3"])
    command.downgrade(alembic_config(url, schema, PACKAGE), "careplan_0003")
    assert shape(url, schema) == BEFORE
    assert run_sql(url, schema, ["SELECT version_id FROM S.care_plan_versions "
                                 "ORDER BY version_id"]) == [[("1",), ("2",)]]
