"""The audit trail: recorded for API calls and applied events, chained, and tamper-evident."""

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
from sqlalchemy import delete, func, select, update

from ccm_shared.audit import AuditRecord, audit_log, record_now, seal_all, verify
from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.db import create_engine_for
from ccm_shared.migrate import upgrade_async, upgrade_platform
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token, list_tokens, revoke_token
from ccm_shared.transport import InProcessTransport
from tests.support.messaging import make_event, record_effect


@pytest.fixture
async def platform_url(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/platform.db"
    await asyncio.to_thread(upgrade_platform, url)
    return url


@pytest.fixture
async def engine(platform_url):
    engine = create_engine_for(platform_url, schema=None)
    yield engine
    await engine.dispose()


def entry(practice="acme", n=0, patient="p1"):
    return AuditRecord(practice=practice, service="tests", actor_type="client", actor="t1",
                       action="R", what=f"GET /thing/{n}", patient=patient)


async def fill(engine, count=6):
    for i in range(count):
        await record_now(engine, entry(n=i))
        await record_now(engine, entry(practice="other", n=i))
    assert await seal_all(engine) == 2 * count


async def test_sealed_chain_verifies(engine):
    await fill(engine)
    results = {r.practice: r for r in await verify(engine)}
    assert results["acme"].ok and results["acme"].entries == 6
    assert results["other"].ok and results["other"].unsealed == 0


@pytest.mark.parametrize(
    ("tamper", "broken_at", "reason"),
    [
        (lambda: update(audit_log).where(audit_log.c.seq == 3).values(what="GET /nothing"),
         3, "altered"),
        (lambda: delete(audit_log).where(audit_log.c.seq == 4), 4, "missing"),
        (lambda: delete(audit_log).where(audit_log.c.seq == 6), 6, "ends at 5"),
        (lambda: update(audit_log).where(audit_log.c.seq == 2).values(patient="p2"), 2, "altered"),
    ],
    ids=["altered-entry", "deleted-middle-entry", "deleted-newest-entry", "changed-patient"],
)
async def test_tampering_is_detected_at_the_first_broken_link(engine, tamper, broken_at, reason):
    await fill(engine)
    async with engine.begin() as conn:
        await conn.execute(tamper().where(audit_log.c.practice == "acme"))
    results = {r.practice: r for r in await verify(engine)}
    assert results["acme"].broken_at == broken_at
    assert reason in results["acme"].reason
    assert results["other"].ok  # the other practice's chain is untouched


async def test_ccm_audit_verify_reports_the_broken_link_and_fails(engine, platform_url, tmp_path):
    await fill(engine, 3)
    env = {"CCM_DATABASE_URL": platform_url, "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "ccm_shared.cli", "audit", "verify"],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "acme: 3 entries, ok" in ok.stdout
    async with engine.begin() as conn:
        await conn.execute(delete(audit_log).where(audit_log.c.practice == "acme",
                                                   audit_log.c.seq == 2))
    bad = subprocess.run([sys.executable, "-m", "ccm_shared.cli", "audit", "verify"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "acme: 2 entries, BROKEN at entry 2: entry 2 is missing" in bad.stdout


async def test_api_calls_are_audited_with_who_what_patient_and_outcome(platform_url, engine):
    ingest = discover_services()["ingest"]
    await upgrade_async(platform_url, ingest.schema, ingest.migrations_package)
    settings = load_settings(database_url=platform_url)
    runtime = ServiceRuntime.build(ingest, settings, transport=InProcessTransport())
    for pid in ("alpha", "beta"):
        await create_practice(runtime.db.engine, practice_id=pid, name=pid, timezone="UTC",
                              pricing=Pricing())
    token = await create_token(runtime.db.engine, practice_id="alpha", label="epic-prod")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                 base_url="http://t") as client:
        h = {"Authorization": f"Bearer {token}"}
        await client.get("/v1/practices/alpha/audit-events?patient=Patient/p7", headers=h)
        await client.get("/v1/practices/beta", headers=h)
        await client.get("/v1/practices/alpha")  # no token: nobody to attribute, not audited
        await seal_all(engine)
        trail = (await client.get("/v1/practices/alpha/audit-events", headers=h)).json()
        other = await client.get("/v1/practices/beta/audit-events", headers=h)
    await runtime.db.dispose()
    events = [e["resource"] for e in trail["entry"]]
    assert len(events) == 3  # newest first; the listing itself is recorded after it answers
    denied, read, created = events
    # Who may read and write the practice's data is part of its record: the token's creation
    # (its id, never the token), as the revocation below.
    assert created["action"] == "C" and created["entity"][0]["what"]["reference"].startswith(
        "api-token/") and token not in json.dumps(created)
    assert created["agent"][0]["who"]["identifier"]["value"].startswith("ccm-cli:")
    assert read["action"] == "R" and read["outcome"] == "0"
    assert read["agent"][0]["who"]["display"] == "epic-prod"
    assert {"reference": "Patient/p7"} in [e["what"] for e in read["entity"]]
    assert denied["outcome"] == "4"  # another practice's data: 404, recorded as a failure
    assert other.status_code == 404


@pytest.mark.parametrize(("method", "path", "form"), [
    ("GET", "/fhir/Patient/p9", None), ("GET", "/fhir/Patient/p9/_history", None),
    ("GET", "/fhir/Patient/p9/_history/1", None), ("GET", "/fhir/Patient?_id=p9", None),
    ("DELETE", "/fhir/Patient/p9", None), ("GET", "/fhir/Encounter?patient=Patient/p9", None),
    ("GET", "/fhir/Encounter?subject=http://t/fhir/Patient/p9", None),
    # A search by POST names its patient in the form body (it was missing from the trail).
    ("POST", "/fhir/Encounter/_search", "patient=Patient%2Fp9"),
    ("POST", "/fhir/Patient/_search", "_id=p9"),
])
async def test_fhir_calls_naming_a_patient_are_in_its_trail(alpha, engine, method, path, form):
    """Ingest's routes name the resource {rtype}/{rid}: its reads of a Patient were recorded
    without the patient, so the patient's trail (``audit-events?patient=``) missed them."""
    runtime, client = alpha
    token = await create_token(runtime.db.engine, practice_id="alpha", label="epic-prod")
    h = {"Authorization": f"Bearer {token}"}
    if form is not None:
        h["Content-Type"] = "application/x-www-form-urlencoded"
    r = await client.request(method, path, headers=h, content=form)
    assert r.status_code < 500, r.text
    await seal_all(engine)
    trail = (await client.get("/v1/practices/alpha/audit-events?patient=p9", headers=h)).json()
    (entry,) = [e["resource"] for e in trail["entry"]]
    assert {"reference": "Patient/p9"} in [e["what"] for e in entry["entity"]], entry


async def test_a_bundles_reads_are_in_the_trail_of_each_patient_they_name(alpha, engine):
    """A Bundle's GET entries (Patient/p9, a vread, a search by patient) read patients' records
    without a trace in their trails: the call named none of them in its URL."""
    runtime, client = alpha
    token = await create_token(runtime.db.engine, practice_id="alpha", label="epic-prod")
    h = {"Authorization": f"Bearer {token}"}
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": url}} for url in (
            "Patient/p9", "Patient/p8/_history/1", "Encounter?patient=Patient/p7",
            "Patient?_id=p6", "Encounter?_count=1")]}
    assert (await client.post("/fhir", json=bundle, headers=h)).status_code == 200
    await seal_all(engine)
    # A read the token may not do is refused, not run: no read of p5 happened.
    writer = await create_token(runtime.db.engine, practice_id="alpha", scopes=("fhir:write",))
    refused = {**bundle, "entry": [{"request": {"method": "GET", "url": "Patient/p5"}}]}
    answer = await client.post("/fhir", json=refused,
                               headers={"Authorization": f"Bearer {writer}"})
    assert answer.json()["entry"][0]["response"]["status"] == "403 Forbidden"
    await seal_all(engine)
    for patient in ("p9", "p8", "p7", "p6"):
        trail = (await client.get(f"/v1/practices/alpha/audit-events?patient={patient}",
                                  headers=h)).json()
        (entry,) = [e["resource"] for e in trail["entry"]]
        assert {"reference": f"Patient/{patient}"} in [e["what"] for e in entry["entity"]]
        # a read, with its own outcome: nothing is stored, so the reads by id are 404s (4),
        # the searches find nothing (0)
        assert (entry["action"], entry["outcome"]) == ("R", "4" if patient in ("p9", "p8")
                                                       else "0")
    nothing = (await client.get("/v1/practices/alpha/audit-events?patient=p5", headers=h)).json()
    assert "entry" not in nothing or nothing["entry"] == []


async def test_a_token_revoked_is_in_the_trail_once(engine):
    await create_practice(engine, practice_id="alpha", name="alpha", timezone="UTC",
                          pricing=Pricing())
    await create_token(engine, practice_id="alpha", label="epic-prod")
    token_id = (await list_tokens(engine, "alpha"))[0]["id"]
    for _ in range(2):  # revoking a revoked token changes nothing, and records nothing
        await revoke_token(engine, practice_id="alpha", token_id=token_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(audit_log.c.action, audit_log.c.what,
                                          audit_log.c.entity, audit_log.c.practice)
                                   .order_by(audit_log.c.id))).all()
    assert [(r.action, r.what.split(" (")[0], r.entity, r.practice) for r in rows] == [
        ("C", "token created", f"api-token/{token_id}", "alpha"),
        ("U", "token revoked", f"api-token/{token_id}", "alpha")]


@pytest.fixture
async def alpha(platform_url):
    """The ingest app on the platform database, with practice alpha: (runtime, client)."""
    ingest = discover_services()["ingest"]
    await upgrade_async(platform_url, ingest.schema, ingest.migrations_package)
    runtime = ServiceRuntime.build(ingest, load_settings(database_url=platform_url),
                                   transport=InProcessTransport())
    await create_practice(runtime.db.engine, practice_id="alpha", name="alpha", timezone="UTC",
                          pricing=Pricing())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.app()),
                                 base_url="http://t") as client:
        yield runtime, client
    await runtime.db.dispose()


async def bearer(runtime, *scopes: str) -> dict:  # noqa: ANN001
    token = await create_token(runtime.db.engine, practice_id="alpha", scopes=scopes)
    return {"Authorization": f"Bearer {token}"}


async def test_the_audit_trail_needs_the_admin_scope(alpha):
    runtime, client = alpha
    refused = await client.get("/v1/practices/alpha/audit-events",
                               headers=await bearer(runtime, "fhir:read", "fhir:write"))
    allowed = await client.get("/v1/practices/alpha/audit-events",
                               headers=await bearer(runtime, "admin"))
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]
    assert allowed.status_code == 200 and allowed.json()["type"] == "searchset"


async def test_the_practice_shows_its_pricing_only_to_admin_and_billing_tokens(alpha):
    runtime, client = alpha
    seen = {}
    for scopes in (("fhir:read", "fhir:write"), ("billing",), ("admin",)):
        r = await client.get("/v1/practices/alpha", headers=await bearer(runtime, *scopes))
        assert r.status_code == 200 and r.json()["id"] == "alpha"
        seen[scopes[0]] = "pricing" in r.json()
    assert seen == {"fhir:read": False, "billing": True, "admin": True}


async def test_applied_patient_events_are_audited_in_the_same_transaction(sqlite_db):
    runtime = ConsumerRuntime(name="billing-projections", topics=["t"], handler=record_effect,
                              db=sqlite_db, transport=InProcessTransport())
    from ccm_shared.events import Message

    event = make_event(patient="p9")
    await runtime.process(Message("t", event.to_json()))
    await runtime.process(Message("t", event.to_json()))  # a duplicate is not audited again
    async with sqlite_db.engine.connect() as conn:
        rows = (await conn.execute(select(audit_log))).all()
        assert (await conn.execute(select(func.count()).select_from(audit_log))).scalar() == 1
    assert rows[0].patient == "p9" and rows[0].actor == "billing-projections"
    assert rows[0].actor_type == "system" and rows[0].what == event.type


# ---- API calls are written by group commit (AuditWriter) --------------------------------------


async def test_concurrent_entries_share_transactions_and_each_returns_once_committed(engine):
    from sqlalchemy import event

    from ccm_shared.audit import AuditWriter

    commits = []
    event.listen(engine.sync_engine, "commit", lambda conn: commits.append(1))
    writer = AuditWriter(engine)

    async def record_then_count(n):
        await writer.record(entry(n=n))
        async with engine.connect() as conn:  # another connection sees it at once
            return (await conn.execute(select(func.count()).select_from(audit_log).where(
                audit_log.c.what == f"GET /thing/{n}"))).scalar_one()

    seen = await asyncio.gather(*(record_then_count(n) for n in range(40)))
    assert seen == [1] * 40
    assert 1 <= len(commits) < 10  # the first alone, the others batched behind it
    assert await seal_all(engine) == 40
    assert [r.ok for r in await verify(engine)] == [True]


async def test_an_entry_that_cannot_be_written_fails_alone_not_its_batch(engine):
    from ccm_shared.audit import AuditWriter

    writer = AuditWriter(engine)
    bad = AuditRecord(practice="acme", service="tests", actor_type="client", actor="t1",
                      action=None, what="GET /bad")  # action is NOT NULL
    long_path = "/fhir/Patient/" + "x" * 1000
    results = await asyncio.gather(
        writer.record(entry(n=1)), writer.record(bad),
        writer.record(AuditRecord(practice="acme", service="tests", actor_type="client",
                                  actor="t1", action="R", what="GET /x", entity=long_path)),
        return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Exception)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(audit_log.c.what, audit_log.c.entity)
                                   .order_by(audit_log.c.id))).all()
    assert [r.what for r in rows] == ["GET /thing/1", "GET /x"]
    assert rows[1].entity == long_path[:300]  # cut to the column, not lost


async def test_a_cancelled_caller_still_gets_its_entry_written(engine):
    from ccm_shared.audit import AuditWriter

    writer = AuditWriter(engine)
    task = asyncio.create_task(writer.record(entry(n=7)))
    await asyncio.sleep(0)
    task.cancel()
    await writer.flush()
    async with engine.connect() as conn:
        assert (await conn.execute(select(audit_log.c.what))).scalars().all() == ["GET /thing/7"]
