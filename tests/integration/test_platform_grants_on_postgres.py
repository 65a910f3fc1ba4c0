"""The service roles of a Kubernetes install (``ccm_<svc>``: USAGE and SELECT on schema
``platform`` only, as the Cluster's postInitApplicationSQL grants) may write the audit trail
once the platform migration p0004 has run: record an entry (the API's and the consumers'
statement) and seal it (the sealer's UPDATE and its upsert of the chain's head); not rewrite
an entry's content, and nothing is granted to PUBLIC."""

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from ccm_shared.audit import GENESIS, AuditRecord, _link, audit_heads, insert_rows
from ccm_shared.db import dialect_insert
from ccm_shared.platform_migrations.p0004_audit_trail_grants import grant_audit_writes

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _entry(practice: str) -> dict:
    return AuditRecord(practice=practice, service="tests", actor_type="client", actor="t1",
                       action="R", what="GET /fhir/Patient/{id}", patient="p1").values()


async def _write_and_seal(conn, role: str, practice: str) -> int:  # noqa: ANN001
    """As ``role``: record an entry and seal it as audit.seal does; the sealed count."""
    await conn.execute(text(f"SET LOCAL ROLE {role}"))
    await insert_rows(conn, [_entry(practice)])
    entry_id = (await conn.execute(
        text("SELECT id FROM platform.audit_log WHERE practice = :p"), {"p": practice}
    )).scalar_one()
    sealed = await _link(conn, [(entry_id, 1, GENESIS, "a" * 64)])
    await conn.execute(
        dialect_insert("postgresql")(audit_heads)
        .values(practice=practice, seq=1, hash="a" * 64)
        .on_conflict_do_update(index_elements=["practice"], set_={"seq": 1, "hash": "a" * 64})
    )
    return sealed


async def test_service_roles_may_record_and_seal_audit_entries_after_the_migration(infra):
    role = f"ccm_t_{uuid.uuid4().hex[:12]}"
    reader = f"report_t_{uuid.uuid4().hex[:12]}"  # an operator's reader of platform: no ccm_
    practice = f"grants-{uuid.uuid4().hex[:8]}"
    engine = create_async_engine(infra.database_url)
    try:
        async with engine.begin() as conn:
            for name in (role, reader):
                await conn.execute(text(f"CREATE ROLE {name} NOLOGIN"))
                await conn.execute(text(f"GRANT USAGE ON SCHEMA platform TO {name}"))
                # What ALTER DEFAULT PRIVILEGES … GRANT SELECT gives the tables ccm_migrator
                # creates.
                await conn.execute(text(
                    f"GRANT SELECT ON ALL TABLES IN SCHEMA platform TO {name}"))
        # Without p0004's grants: refused (the consumers dead-lettered every audited event).
        with pytest.raises(DBAPIError, match="permission denied"):
            async with engine.begin() as conn:
                await _write_and_seal(conn, role, practice)

        async with engine.begin() as conn:
            granted = await conn.run_sync(grant_audit_writes)
        assert role in granted and reader not in granted
        # a reader of platform may not write the tamper-evident trail
        with pytest.raises(DBAPIError, match="permission denied"):
            async with engine.begin() as conn:
                await _write_and_seal(conn, reader, practice)

        async with engine.connect() as conn:
            async with conn.begin() as tx:
                assert await _write_and_seal(conn, role, practice) == 1
                await tx.rollback()  # leaves nothing behind in the shared trail
            # An entry's content stays as recorded: only the sealer's columns are granted.
            for column in ("actor", "what", "patient"):
                with pytest.raises(DBAPIError, match="permission denied"):
                    async with conn.begin():
                        await conn.execute(text(f"SET LOCAL ROLE {role}"))
                        await conn.execute(text(
                            f"UPDATE platform.audit_log SET {column} = 'x' WHERE false"))
            # Nothing for PUBLIC.
            public = (await conn.execute(text(
                "SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a "
                "WHERE c.relnamespace = 'platform'::regnamespace "
                "AND c.relname IN ('audit_log', 'audit_heads', 'audit_log_id_seq') "
                "AND a.grantee = 0"))).scalar_one()
            assert public == 0
    finally:
        async with engine.begin() as conn:
            for name in (role, reader):
                await conn.execute(text(f"DROP OWNED BY {name}"))
                await conn.execute(text(f"DROP ROLE IF EXISTS {name}"))
        await engine.dispose()


async def test_without_service_roles_the_migration_grants_nothing(infra):
    """Development and Docker Compose: one database user owns everything; nothing to grant,
    and never to PUBLIC."""
    engine = create_async_engine(infra.database_url)
    try:
        async with engine.begin() as conn:
            granted = await conn.run_sync(grant_audit_writes)
            owner = (await conn.execute(text(
                "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'platform'"
            ))).scalar_one()
        assert owner not in granted and "public" not in [g.lower() for g in granted]
    finally:
        await engine.dispose()
