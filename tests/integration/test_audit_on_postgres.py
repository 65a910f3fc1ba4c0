"""The audit trail on PostgreSQL: API-call entries group-committed, chained by the sealer in one
statement per batch, and tampering still detected."""

import asyncio
import uuid

import pytest
from sqlalchemy import event, select, update

from ccm_shared.audit import AuditRecord, AuditWriter, audit_log, seal_all, verify
from tests.integration.notification.test_races_on_postgres import api  # noqa: F401 - fixture
from ccm_shared.db import create_engine_for
from tests.integration.conftest import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_group_committed_entries_are_sealed_per_practice_and_tampering_is_found(infra):
    engine = create_engine_for(infra.database_url, schema=None, pool_size=2)
    a, b = f"audit-a-{uuid.uuid4().hex[:8]}", f"audit-b-{uuid.uuid4().hex[:8]}"
    commits: list[int] = []
    event.listen(engine.sync_engine, "commit", lambda conn: commits.append(1))
    writer = AuditWriter(engine)
    try:
        await asyncio.gather(*(
            writer.record(AuditRecord(practice=p, service="tests", actor_type="client",
                                      actor="t1", action="R", what=f"GET /thing/{n}",
                                      patient="p1"))
            for n in range(60) for p in (a, b)))
        assert len(commits) < 60  # 120 entries, far fewer transactions
        bad = AuditRecord(practice=b, service="tests", actor_type="client", actor="t1",
                          action=None, what="GET /bad")  # action is NOT NULL
        good = AuditRecord(practice=b, service="tests", actor_type="client", actor="t1",
                           action="R", what="GET /thing/60", entity="/x" * 400)
        failed, written = await asyncio.gather(writer.record(bad), writer.record(good),
                                               return_exceptions=True)
        assert isinstance(failed, Exception) and written is None  # the bad one fails alone

        async def sealed() -> bool:
            await seal_all(engine)  # another sealer may hold the lock: then it seals them
            results = await verify(engine, a) + await verify(engine, b)
            return len(results) == 2 and all(r.unsealed == 0 for r in results)

        await eventually(sealed, timeout=30, what="both practices' entries sealed")
        results = {r.practice: r for r in await verify(engine, a) + await verify(engine, b)}
        assert results[a].ok and results[a].entries == 60
        assert results[b].ok and results[b].entries == 61
        async with engine.begin() as conn:
            await conn.execute(update(audit_log).where(audit_log.c.practice == a,
                                                       audit_log.c.seq == 17)
                               .values(what="GET /nothing"))
        broken = (await verify(engine, a))[0]
        assert broken.broken_at == 17 and "altered" in broken.reason
        assert (await verify(engine, b))[0].ok
        async with engine.connect() as conn:
            seqs = (await conn.execute(select(audit_log.c.seq).where(audit_log.c.practice == b)
                                       .order_by(audit_log.c.id))).scalars().all()
        assert seqs == list(range(1, 62))  # chained in the order they were recorded
    finally:
        await engine.dispose()


async def test_a_call_with_a_nul_or_a_long_path_is_still_audited(api):  # noqa: F811
    """A NUL (%00) or an over-long path parameter made the call's audit entry fail to store:
    the call went unaudited. It is kept as %00, cut to its column."""
    rt, client, path, headers = api
    for sent, kept in (("abc%00x", "abc%00x"), ("y" * 5000, "y" * 200)):
        r = await client.get(f"{path}/providers/{sent}", headers=headers)
        assert r.status_code in (404, 422), r.text

        async def audited(kept=kept) -> bool:
            async with rt.db.engine.connect() as conn:
                entities = (await conn.execute(select(audit_log.c.entity).where(
                    audit_log.c.practice == path.rsplit("/", 1)[-1]))).scalars().all()
            return any(kept in (e or "") for e in entities)

        await eventually(audited, timeout=10, what=f"the audit entry of {sent[:20]}")
