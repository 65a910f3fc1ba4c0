"""Billing's storage on real PostgreSQL: the large documents (Invoices, and the outbox events
that carry them) are compressed with lz4 where the server has it (billing_0010)."""

import asyncio
import random
import uuid

import orjson
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from ccm_shared.db import create_engine_for
from ccm_shared.migrate import alembic_config, upgrade, upgrade_async
from ccm_shared.service import discover_services

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_invoices_and_their_events_are_compressed_with_lz4_where_the_server_has_it(infra):
    definition = discover_services()["billing"]
    await upgrade_async(infra.database_url, definition.schema, definition.migrations_package)
    engine = create_engine_for(infra.database_url, schema=definition.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            has_lz4 = (await conn.execute(text(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                "WHERE name = 'default_toast_compression'"))).scalar()
            columns = dict((await conn.execute(text(
                "SELECT c.relname || '.' || a.attname, a.attcompression::text FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :schema AND (c.relname, a.attname) IN "
                "(('invoices', 'resource'), ('outbox', 'payload'))"),
                {"schema": definition.schema})).all())
    finally:
        await engine.dispose()
    assert has_lz4, "the project's PostgreSQL (Debian's 15) is built with lz4"
    assert columns == {"invoices.resource": "l", "outbox.payload": "l"}



async def test_an_invoices_lines_built_by_the_database_are_those_python_builds(infra, monkeypatch):
    """A close has PostgreSQL order, sum and write its Invoice's lines (invoice_lines): the same
    lineItem text, count and total as reading the rows in Python, whatever the amounts and
    however patient ids sort (code points, not the database's collation); an amount in another
    form than the decider's is refused when written (billing_0015)."""
    from ccm_billing.adapters import fhir, orm
    from ccm_billing.service_layer.decision_cache import invoice_lines
    from ccm_shared.db import Database

    definition = discover_services()["billing"]
    schema = f"t_lines_{uuid.uuid4().hex[:8]}"
    await upgrade_async(infra.database_url, schema, definition.migrations_package)
    db = Database(infra.database_url, schema=schema, pool_size=2)
    async with db.engine.begin() as conn:
        # As in a database created with an en_US locale (the postgres image's default), where
        # "B" sorts before "a" only in code points.
        for column, size in (("patient", 64), ("code", 10)):
            await conn.execute(text(f'ALTER TABLE "{schema}".month_decision_lines ALTER COLUMN '
                                    f'{column} TYPE varchar({size}) COLLATE "en-US-x-icu"'))
        index = (await conn.execute(text(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = :s AND indexname = :i"),
            {"s": schema, "i": "ix_time_entries_enrolled"})).scalar()
    # billing_0014's partial index, as the cache's check of who is enrolled reads it
    assert index.endswith("WHERE ((patient IS NOT NULL) AND (start IS NOT NULL))"), index
    practice = "lines"
    in_python = []  # cases whose lines were read in Python (InvoiceLines.of) on the way
    of = fhir.InvoiceLines.of.__func__

    def counted_of(cls, lines):  # noqa: ANN001, ANN202
        in_python.append(1)
        return of(cls, lines)

    monkeypatch.setattr(fhir.InvoiceLines, "of", classmethod(counted_of))
    rng = random.Random(7)
    # Amounts as _store writes them (f"{amount:.2f}"), and others, which billing_0015's check
    # refuses (the last one PostgreSQL 15's numeric would also refuse).
    edge = ["0.00", "0.01", "0.10", "5.00", "100.00", "12.30", "9999999999999.99", "-5.00",
            "-0.10", "-1234.56"]
    odd = ["10000000000000.00", "12.3", "07.50", "1e3", "1.005", "-00.10", " 1.00", "1_000.00"]

    def amount() -> str:
        cents = rng.randrange(10 ** rng.randint(1, 15))
        return rng.choice(edge) if rng.random() < 0.2 else f"{cents // 100}.{cents % 100:02d}"

    cases = [{}, {("é", "99490"): "10.00", ("Ω", "99490"): "12.50", ("z", "99490"): "1.00"}] + [
        {("".join(rng.choices("aAbBzZ09-.", k=rng.randint(1, 5))), code): amount()
         for code in ("99490", "99439", "G0506") for _ in range(rng.randint(0, 12))}
        for _ in range(40)]
    cases += [{("p", "99490"): a} for a in edge]  # each edge amount alone
    lines_seen = 0
    try:
        for n, case in enumerate(cases):
            month = f"2{n:03d}-01"
            if case:
                async with db.unit_of_work() as uow:
                    await uow.session.execute(orm.month_decision_lines.insert(), [
                        {"practice": practice, "month": month, "patient": patient, "code": code,
                         "charge_item_id": f"ci-{i:032x}", "amount": amount_, "resource": "{}"}
                        for i, ((patient, code), amount_) in enumerate(case.items())])
                    await uow.commit()
            async with db.unit_of_work() as uow:
                in_python.clear()
                fast = await invoice_lines(uow.session, practice, month)
                assert bool(in_python) == (not case), case  # built by the database
                slow = await invoice_lines(uow.session, practice, month, aggregated=False)
            assert (orjson.dumps(fast.items), fast.count, fast.total) == (
                orjson.dumps(slow.items), slow.count, slow.total), case
            assert fast.count == len(case)
            lines_seen += fast.count
        for bad in odd:  # refused: the database could not write its JSON from the text
            with pytest.raises(IntegrityError, match="ck_decision_lines_amount"):
                async with db.unit_of_work() as uow:
                    await uow.session.execute(orm.month_decision_lines.insert(), {
                        "practice": practice, "month": "2999-01", "patient": "p", "code": "x",
                        "charge_item_id": "ci-x", "amount": bad, "resource": "{}"})
    finally:
        async with db.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await db.dispose()
    assert lines_seen > 300


async def test_a_database_from_before_billing_0019_gets_columns_for_whatever_events_carry(infra):
    """billing_0019 widens, where a database has them narrower (created before it), the columns
    events fill: references to 98 ("PractitionerRole/" and a 64-character id is 81), source
    versions to 93 (and billing_0021 to 104, for a mapping revision), ``patients.mbi`` to text
    with a hash index (any value), a review's event id to 200; the values stored stay. Upgraded
    again or downgraded, nothing changes."""
    definition = discover_services()["billing"]
    schema = f"t_widths_{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(upgrade, infra.database_url, schema, definition.migrations_package,
                            "billing_0018")
    engine = create_engine_for(infra.database_url, schema=schema, pool_size=1)
    q = f'"{schema}"'
    before = {("time_entries", "practitioner_role"): 80, ("time_entries", "practitioner"): 80,
              ("time_entries", "version"): 80, ("time_entries", "data_version"): 80,
              ("consents", "practitioner"): 80, ("consents", "version"): 80,
              ("care_plans", "review_version"): 80, ("care_plans", "version"): 80,
              ("conditions", "version"): 80, ("patients", "version"): 80,
              ("patients", "mbi"): 20, ("practitioner_roles", "practitioner"): 80,
              ("practitioner_roles", "version"): 80, ("visits", "version"): 80,
              ("care_plan_reviews", "responsible_provider"): 80,
              ("care_plan_reviews", "supervisor"): 80, ("care_plan_reviews", "event_id"): 64}

    async def widths() -> tuple[dict, str]:
        async with engine.connect() as conn:
            found = {(t, c): length or kind for t, c, length, kind in (await conn.execute(text(
                "SELECT table_name, column_name, character_maximum_length, data_type "
                "FROM information_schema.columns WHERE table_schema = :s"), {"s": schema})).all()
                if (t, c) in before}
            method = (await conn.execute(text(
                "SELECT am.amname FROM pg_class i JOIN pg_am am ON am.oid = i.relam JOIN "
                "pg_namespace n ON n.oid = i.relnamespace WHERE n.nspname = :s AND "
                "i.relname = 'ix_patients_mbi'"), {"s": schema})).scalar()
        return found, method

    try:
        async with engine.begin() as conn:  # as a database created before billing_0019 is
            await conn.execute(text(f"DROP INDEX {q}.ix_patients_mbi"))
            for (table, column), length in before.items():
                await conn.execute(text(f"ALTER TABLE {q}.{table} ALTER COLUMN {column} "
                                        f"TYPE varchar({length})"))
            await conn.execute(text(f"CREATE INDEX ix_patients_mbi ON {q}.patients (mbi)"))
            await conn.execute(text(
                f"INSERT INTO {q}.patients (practice, patient_id, version, mbi, active) "
                "VALUES ('a', 'p1', 'v1', '1EG4TE5MK72', true)"))
        assert await widths() == (before, "btree")
        await asyncio.to_thread(upgrade, infra.database_url, schema,
                                definition.migrations_package)
        wide, method = await widths()
        assert method == "hash"
        assert wide == {key: (98 if key[1] in ("practitioner", "practitioner_role",
                                                "responsible_provider", "supervisor")
                              else "text" if key[1] == "mbi" else 200 if key[1] == "event_id"
                              else 104) for key in before}  # versions: 93, then billing_0021
        async with engine.begin() as conn:
            await conn.execute(text(f"UPDATE {q}.patients SET mbi = :m"), {"m": "M" * 5000})
            kept = (await conn.execute(text(
                f"SELECT patient_id FROM {q}.patients WHERE mbi = :m"), {"m": "M" * 5000})).all()
        assert kept == [("p1",)]
        await asyncio.to_thread(command.downgrade, alembic_config(
            infra.database_url, schema, definition.migrations_package), "billing_0018")
        await asyncio.to_thread(upgrade, infra.database_url, schema,
                                definition.migrations_package)
        assert await widths() == (wide, "hash")
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()
