"""billing_0020 on a database from before it (PostgreSQL, and SQLite as in embedded mode):
payments gain their void columns, invoices ``refunded`` ("0.00" for those issued before),
``refunds`` is created; the downgrade drops them, and is refused while a void or refund is
recorded (the code before it would count a voided payment as paid)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa
from alembic import command

from ccm_shared.db import create_engine_for
from ccm_shared.migrate import alembic_config, upgrade, upgrade_platform

PACKAGE = "ccm_billing.migrations"
VOID = {"voided_at", "void_reason", "voided_by", "voided_by_label"}


def run_sql(url: str, schema: str, statements: list[tuple[str, dict]]) -> list:
    async def go() -> list:
        engine = create_engine_for(url, schema=schema, pool_size=1)
        try:
            async with engine.begin() as conn:
                out = []
                for sql, params in statements:
                    result = await conn.execute(sa.text(sql.replace("S.", f'"{schema}".')),
                                                params)
                    out.append(result.all() if result.returns_rows else None)
                return out
        finally:
            await engine.dispose()
    return asyncio.run(go())


def shape(url: str, schema: str) -> tuple[set, set, bool]:
    """(payments' void columns, invoices' refunded column, whether refunds exists)."""
    async def read() -> tuple[set, set, bool]:
        engine = create_engine_for(url, schema=schema, pool_size=1)
        try:
            async with engine.connect() as conn:
                def inspect(c):  # noqa: ANN001, ANN202
                    i = sa.inspect(c)
                    return ({x["name"] for x in i.get_columns("payments", schema=schema)} & VOID,
                            {x["name"] for x in i.get_columns("invoices", schema=schema)}
                            & {"refunded"}, i.has_table("refunds", schema=schema))
                return await conn.run_sync(inspect)
        finally:
            await engine.dispose()
    return asyncio.run(read())


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):  # noqa: ANN001, ANN201
    """(url, schema) of a database migrated to billing_0019 with the shape it had then: the
    first migrations create today's tables, so it is migrated to the head and downgraded."""
    if request.param == "sqlite":
        url, schema = f"sqlite+aiosqlite:///{tmp_path}/ccm.db", "billing"
        upgrade_platform(url)
    else:
        url, schema = request.getfixturevalue("infra").database_url, f"t_b20_{uuid.uuid4().hex[:8]}"
    upgrade(url, schema, PACKAGE)
    command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0019")
    yield url, schema
    if request.param == "postgresql":
        run_sql(url, schema, [(f'DROP SCHEMA "{schema}" CASCADE', {})])


def test_billing_0020_on_a_database_from_before_it(database):
    url, schema = database
    assert shape(url, schema) == (set(), set(), False)  # as billing_0019 left it
    run_sql(url, schema, [
        ("INSERT INTO S.invoices (id, practice, month, revision, status, payment_status, "
         "total_net, paid, issued_at, due_date, overdue, resource, lines_in_place) VALUES "
         "('inv-0', 'alpha', '2025-03', 0, 'balanced', 'balanced', '75.33', '75.33', "
         "'2025-04-02 12:00:00', '2025-05-02', false, '{}', true)", {}),
        ("INSERT INTO S.payments (id, practice, invoice_id, amount, date, reference, "
         "recorded_at) VALUES ('pay-1', 'alpha', 'inv-0', '75.33', '2025-04-10', 'chk-1', "
         "'2025-04-10 12:00:00')", {})])
    upgrade(url, schema, PACKAGE)
    assert shape(url, schema) == (VOID, {"refunded"}, True)
    invoices, payments = run_sql(url, schema, [
        ("SELECT id, paid, refunded FROM S.invoices", {}),
        ("SELECT id, voided_at, void_reason, voided_by FROM S.payments", {})])
    assert invoices == [("inv-0", "75.33", "0.00")]  # refunded nothing before
    assert payments == [("pay-1", None, None, None)]  # not voided
    # A void recorded: the code before billing_0020 would count it as paid.
    run_sql(url, schema, [("UPDATE S.payments SET voided_at = '2025-04-15 12:00:00', "
                           "void_reason = 'bounced'", {})])
    with pytest.raises(RuntimeError, match="1 payment"):
        command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0019")
    assert shape(url, schema) == (VOID, {"refunded"}, True)  # nothing dropped
    run_sql(url, schema, [("UPDATE S.payments SET voided_at = NULL, void_reason = NULL", {})])
    command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0019")
    assert shape(url, schema) == (set(), set(), False)
    assert run_sql(url, schema, [("SELECT id, paid FROM S.invoices", {})]) == [
        [("inv-0", "75.33")]]
