"""billing_0024 on a database from before it (PostgreSQL, and SQLite as in embedded mode):
invoices and ChargeItems gain ``version_id`` and ``last_updated`` (their ``meta``), version 1
(a ChargeItem entered in error 2) last updated at the latest change billing kept a time of; the
downgrade drops them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from alembic import command

from ccm_shared.migrate import alembic_config, upgrade, upgrade_platform
from tests.integration.billing.payments.test_migration_b0020 import PACKAGE, run_sql

INVOICE = ("INSERT INTO S.invoices (id, practice, month, revision, status, payment_status, "
           "total_net, paid, issued_at, due_date, overdue, replaces, replaced_by, resource, "
           "lines_in_place) VALUES (:id, 'alpha', :m, :rev, :status, 'issued', '75.33', '0.00', "
           ":at, '2025-05-02', false, NULL, :by, '{}', true)")
PAYMENT = ("INSERT INTO S.payments (id, practice, invoice_id, amount, date, recorded_at, "
           "voided_at) VALUES (:id, 'alpha', :inv, '10.00', '2025-04-10', :at, :voided)")
ITEM = ("INSERT INTO S.charge_items (id, practice, invoice_id, patient, month, code, status, "
        "amount, resource) VALUES (:id, 'alpha', :inv, 'p1', '2025-03', '99490', :status, "
        "'42.00', '{}')")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):  # noqa: ANN001, ANN201
    """(url, schema) migrated to billing_0023 (to the head and down: the first migrations
    create today's tables)."""
    if request.param == "sqlite":
        url, schema = f"sqlite+aiosqlite:///{tmp_path}/ccm.db", "billing"
        upgrade_platform(url)
    else:
        url, schema = request.getfixturevalue("infra").database_url, f"t_b24_{uuid.uuid4().hex[:8]}"
    upgrade(url, schema, PACKAGE)
    command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0023")
    yield url, schema
    if request.param == "postgresql":
        run_sql(url, schema, [(f'DROP SCHEMA "{schema}" CASCADE', {})])


def _utc(value) -> str:  # noqa: ANN001 - SQLite answers the text it keeps, PostgreSQL a datetime
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return value[:19]


def test_billing_0024_on_a_database_from_before_it(database):
    url, schema = database

    def t(text: str):  # noqa: ANN202 - a time as the driver takes it (asyncpg: a datetime)
        return text if url.startswith("sqlite") else datetime.fromisoformat(text).replace(
            tzinfo=UTC)

    run_sql(url, schema, [
        # March: cancelled (inv-0, paid on 10 April) and replaced on 20 April by inv-1, whose
        # carried payment was voided on 25 April.
        (INVOICE, {"id": "inv-0", "m": "2025-03", "rev": 0, "status": "cancelled",
                   "at": t("2025-04-02 12:00:00"), "by": "inv-1"}),
        (INVOICE, {"id": "inv-1", "m": "2025-03", "rev": 1, "status": "issued",
                   "at": t("2025-04-20 12:00:00"), "by": None}),
        (PAYMENT, {"id": "pay-0", "inv": "inv-0", "at": t("2025-04-10 12:00:00"), "voided": None}),
        (PAYMENT, {"id": "pay-1", "inv": "inv-1", "at": t("2025-04-10 12:00:00"),
                   "voided": t("2025-04-25 12:00:00")}),
        # February: cancelled without replacement by the correction filed on 20 March.
        (INVOICE, {"id": "inv-2", "m": "2025-02", "rev": 0, "status": "cancelled",
                   "at": t("2025-03-02 12:00:00"), "by": None}),
        *[("INSERT INTO S.decision_filings (practice, patient, month, revision, filed_at, "
           "reason, decision, entries) VALUES ('alpha', 'p1', :m, :r, :at, 'x', 'null', '[]')",
           {"m": m, "r": r, "at": at})
          for m, r, at in [("2025-02", 1, t("2025-03-15 12:00:00")),
                           ("2025-02", 2, t("2025-03-20 12:00:00")),
                           ("2025-01", 1, t("2025-03-25 12:00:00"))]],  # another month
        ("INSERT INTO S.refunds (id, practice, invoice_id, amount, date, recorded_at) VALUES "
         "('ref-1', 'alpha', 'inv-2', '5.00', '2025-03-18', '2025-03-18 12:00:00')", {}),
        # January: issued, nothing since.
        (INVOICE, {"id": "inv-3", "m": "2025-01", "rev": 0, "status": "issued",
                   "at": t("2025-02-02 12:00:00"), "by": None}),
        (ITEM, {"id": "ci-0", "inv": "inv-0", "status": "entered-in-error"}),
        (ITEM, {"id": "ci-1", "inv": "inv-1", "status": "billable"}),
    ])
    upgrade(url, schema, PACKAGE)
    invoices, items = run_sql(url, schema, [
        ("SELECT id, version_id, last_updated FROM S.invoices ORDER BY id", {}),
        ("SELECT id, version_id, last_updated FROM S.charge_items ORDER BY id", {})])
    assert [(i, v, _utc(at)) for i, v, at in invoices] == [
        ("inv-0", 1, "2025-04-20 12:00:00"),  # its replacement's issue
        ("inv-1", 1, "2025-04-25 12:00:00"),  # the void
        ("inv-2", 1, "2025-03-20 12:00:00"),  # its month's last correction
        ("inv-3", 1, "2025-02-02 12:00:00")]  # its issue
    assert [(i, v, _utc(at)) for i, v, at in items] == [
        ("ci-0", 2, "2025-04-20 12:00:00"),  # entered in error when inv-0 was cancelled
        ("ci-1", 1, "2025-04-20 12:00:00")]  # issued with inv-1
    if not url.startswith("sqlite"):
        # Written by code before it (a replica not yet replaced): version 1, now. (Embedded
        # mode is one process: no code before it writes after the upgrade.)
        (written,) = run_sql(url, schema, [
            (INVOICE, {"id": "inv-4", "m": "2024-12", "rev": 0, "status": "issued",
                       "at": t("2025-01-02 12:00:00"), "by": None}),
            ("SELECT version_id, last_updated FROM S.invoices WHERE id = 'inv-4'", {})])[1]
        assert written[0] == 1 and written[1] > datetime(2026, 1, 1, tzinfo=UTC)
    command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0023")
    for table in ("invoices", "charge_items"):
        (row,) = run_sql(url, schema, [(f"SELECT * FROM S.{table} LIMIT 1", {})])[0]
        assert not {"version_id", "last_updated"} & set(row._fields)
