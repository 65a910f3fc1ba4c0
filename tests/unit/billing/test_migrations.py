"""billing_0006 drops the unused ``time_entries.locked`` from databases that still have it (and
its downgrade puts it back), billing_0008 the periods' copy of their decisions; on SQLite, as in
embedded mode."""

import asyncio
import json

import sqlalchemy as sa
from alembic import command

from ccm_shared.db import create_engine_for
from ccm_shared.migrate import alembic_config, upgrade, upgrade_platform

PACKAGE = "ccm_billing.migrations"


def columns(url: str, table: str = "time_entries") -> set[str]:
    async def read() -> set[str]:
        engine = create_engine_for(url, schema="billing", pool_size=1)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: {
                    col["name"] for col in sa.inspect(c).get_columns(table, schema="billing")})
        finally:
            await engine.dispose()
    return asyncio.run(read())


def run_sql(url: str, statements: list[tuple[str, dict]]) -> list:
    """Each statement's rows (None for those that return none), in one transaction."""
    async def go() -> list:
        engine = create_engine_for(url, schema="billing", pool_size=1)
        try:
            async with engine.begin() as conn:
                out = []
                for sql, params in statements:
                    result = await conn.execute(sa.text(sql), params)
                    out.append(result.all() if result.returns_rows else None)
                return out
        finally:
            await engine.dispose()
    return asyncio.run(go())


def test_locked_is_dropped_and_a_downgrade_restores_it(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    upgrade(url, "billing", PACKAGE)
    assert "locked" not in columns(url) and "late" in columns(url)
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0005")
    assert "locked" in columns(url)  # as a database migrated before billing_0006 has it
    upgrade(url, "billing", PACKAGE)
    assert "locked" not in columns(url) and "late" in columns(url)


def test_period_decisions_go_and_a_downgrade_rebuilds_them_from_the_filings(tmp_path):
    """billing_0008 drops ``billing_periods.decisions`` (the filings hold a closed month's
    decisions); its downgrade puts the column back with each period's latest filings."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    upgrade(url, "billing", PACKAGE)

    filing = ("INSERT INTO billing.decision_filings (practice, patient, month, revision, filed_at,"
              " reason, decision, entries) VALUES ('a', :p, '2025-03', :r, '2025-04-02', 'x', :d,"
              " '[]')")
    run_sql(url, [
        ("INSERT INTO billing.billing_periods (practice, month, status, closed_at, invoice_id, "
         "summary) VALUES ('a', '2025-03', 'closed', '2025-04-02', NULL, '{}')", {}),
        (filing, {"p": "p2", "r": 0, "d": '{"patient":"Patient/p2","v":0}'}),
        (filing, {"p": "p1", "r": 0, "d": '{"patient":"Patient/p1","v":0}'}),
        (filing, {"p": "p1", "r": 1, "d": '{"patient":"Patient/p1","v":1}'}),
        (filing, {"p": "p3", "r": 0, "d": '{"patient":"Patient/p3","v":0}'}),
        (filing, {"p": "p3", "r": 1, "d": "null"})])  # corrected out of the month
    assert "decisions" not in columns(url, "billing_periods")
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0007")
    (rows,) = run_sql(url, [("SELECT decisions FROM billing.billing_periods", {})])
    assert json.loads(rows[0][0]) == [{"patient": "Patient/p1", "v": 1},
                                      {"patient": "Patient/p2", "v": 0}]
    upgrade(url, "billing", PACKAGE)
    assert "decisions" not in columns(url, "billing_periods")


def test_a_downgrade_copies_what_was_filed_in_place_into_the_tables_the_older_code_reads(tmp_path):
    """billing_0009: a month closed in place keeps its cached decisions and lines as its filings
    and ChargeItems; the downgrade copies them where the code before it reads them."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    upgrade(url, "billing", PACKAGE)
    assert {"filed_in_place", "line_invoice", "line_entered"} <= columns(url, "billing_periods")

    def run(statements: list[str]) -> list:
        return run_sql(url, [(sql, {}) for sql in statements])

    decision = ("INSERT INTO billing.month_decisions VALUES ('a', '{m}', '{p}', 1, 'ctx', 0, 1, "
                "'{{}}', '[]', 60, 0, '{{\"patient\":\"Patient/{p}\"}}', '[\"{p}\"]', '2025-04-01')")
    line = ("INSERT INTO billing.month_decision_lines VALUES ('a', '{m}', '{p}', '99490', 'ci-{p}', "
            "'20.00', '{{\"id\":\"ci-{p}\"}}')")
    run([
        "INSERT INTO billing.billing_periods (practice, month, status, closed_at, invoice_id, "
        "summary, filed_in_place, line_invoice, line_entered) VALUES ('a', '2025-03', 'closed', "
        "'2025-04-02 12:00:00', 'inv-1', '{}', 1, 'inv-0', ',\"enteredDate\":\"2025-04-02\"}')",
        *(decision.format(m="2025-03", p=p) for p in ("p1", "p2")),
        *(line.format(m="2025-03", p=p) for p in ("p1", "p2")),
        decision.format(m="2025-04", p="p1"), line.format(m="2025-04", p="p1"),  # open: cached
    ])
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0008")
    assert not {"filed_in_place", "line_invoice", "line_entered"} & columns(url, "billing_periods")
    filings, items, cached = run([
        "SELECT patient, month, revision, reason, decision, entries FROM billing.decision_filings "
        "ORDER BY patient",
        "SELECT id, invoice_id, patient, status, amount, resource FROM billing.charge_items "
        "ORDER BY id",
        "SELECT month, patient FROM billing.month_decisions UNION ALL "
        "SELECT month, patient FROM billing.month_decision_lines",
    ])
    assert filings == [("p1", "2025-03", 0, "closed", '{"patient":"Patient/p1"}', '["p1"]'),
                       ("p2", "2025-03", 0, "closed", '{"patient":"Patient/p2"}', '["p2"]')]
    assert items == [
        ("ci-p1", "inv-0", "p1", "billable", "20.00", '{"id":"ci-p1","enteredDate":"2025-04-02"}'),
        ("ci-p2", "inv-0", "p2", "billable", "20.00", '{"id":"ci-p2","enteredDate":"2025-04-02"}')]
    assert cached == [("2025-04", "p1"), ("2025-04", "p1")]  # the open month's cache only
    upgrade(url, "billing", PACKAGE)
    assert {"filed_in_place", "line_invoice", "line_entered"} <= columns(url, "billing_periods")


def test_time_entry_versions_get_the_suffix_of_their_state_and_lose_it_on_downgrade(tmp_path):
    """billing_0012: a logged entry's versions end in |1, a reversed one's in |0 (what the
    projection writes since), so a reversal and a new entry of one source version order."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    command.upgrade(alembic_config(url, "billing", PACKAGE), "billing_0011")
    entry = ("INSERT INTO billing.time_entries (practice, entry_id, patient, version, data_version,"
             " status, seconds, month, complex, role_codes, warnings, late) VALUES ('a', :e, 'p1',"
             " :v, :dv, :s, 60, '2025-03', 0, '[]', '[]', 0)")
    v = "2025-01-01T00:00:01.000000|00000000000000000002"
    read = ("SELECT entry_id, version, data_version FROM billing.time_entries ORDER BY entry_id", {})
    run_sql(url, [(entry, {"e": "e1", "v": v, "dv": v, "s": "finished"}),
                  (entry, {"e": "e2", "v": v, "dv": None, "s": "entered-in-error"})])
    upgrade(url, "billing", PACKAGE)
    assert run_sql(url, [read])[0] == [("e1", v + "|1", v + "|1"), ("e2", v + "|0", None)]
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0011")
    assert run_sql(url, [read])[0] == [("e1", v, v), ("e2", v, None)]


def test_period_terms_are_added_and_a_downgrade_drops_them(tmp_path):
    """billing_0013: ``billing_periods.terms`` (the terms a month closed under); months closed
    before keep NULL."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    upgrade(url, "billing", PACKAGE)
    assert "terms" in columns(url, "billing_periods")
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0012")
    assert "terms" not in columns(url, "billing_periods")
    upgrade(url, "billing", PACKAGE)
    assert "terms" in columns(url, "billing_periods")


def indexes(url: str, table: str = "time_entries") -> dict[str, str]:
    """The table's indexes: name → their SQL (SQLite's sqlite_master)."""
    return dict(run_sql(url, [("SELECT name, sql FROM billing.sqlite_master "
                               "WHERE type = 'index' AND tbl_name = :t AND sql IS NOT NULL",
                               {"t": table})])[0])


def test_the_enrolled_entries_index_is_created_and_a_downgrade_drops_it(tmp_path):
    """billing_0014: ``ix_time_entries_enrolled``, the partial index the decision cache's check
    reads who is enrolled from; a database at billing_0013 gets it on upgrade."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    partial = "WHERE patient IS NOT NULL AND start IS NOT NULL"
    upgrade(url, "billing", PACKAGE)
    assert partial in indexes(url)["ix_time_entries_enrolled"]
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0013")
    assert "ix_time_entries_enrolled" not in indexes(url)
    upgrade(url, "billing", PACKAGE)
    assert partial in indexes(url)["ix_time_entries_enrolled"]


def test_invoices_keep_their_lines_in_place_and_a_downgrade_writes_them_back(tmp_path):
    """billing_0016: ``invoices.lines_in_place`` (the resource is stored without its lineItem,
    which its ChargeItems give); Invoices issued before keep their whole resource (false). The
    downgrade writes every Invoice's lines back into its resource, in (patient, code) order,
    from wherever its ChargeItems are: a closed month's decision lines or ``charge_items``."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    upgrade(url, "billing", PACKAGE)
    assert "lines_in_place" in columns(url, "invoices")
    stored = {"resourceType": "Invoice", "id": "inv-0", "status": "issued",
              "totalNet": {"value": 30.5, "currency": "USD"}, "note": [{"text": "n"}]}
    invoice = ("INSERT INTO billing.invoices (id, practice, month, revision, status, "
               "payment_status, total_net, paid, issued_at, due_date, overdue, resource, "
               "lines_in_place) VALUES (:id, 'alpha', '2025-03', :rev, 'issued', 'issued', "
               "'30.50', '0.00', '2025-04-02 12:00:00', '2025-05-02', 0, :r, :in_place)")
    run_sql(url, [
        ("INSERT INTO billing.billing_periods (practice, month, status, closed_at, summary, "
         "filed_in_place, line_invoice, line_entered) VALUES ('alpha', '2025-03', 'closed', "
         "'2025-04-02 12:00:00', '{}', 1, 'inv-0', '}')", {}),
        *[("INSERT INTO billing.month_decision_lines (practice, month, patient, code, "
           "charge_item_id, amount, resource) VALUES ('alpha', '2025-03', :p, :c, :i, :a, '{}')",
           {"p": p, "c": c, "i": i, "a": a})
          for p, c, i, a in [("p2", "99490", "ci-c", "10.00"), ("p1", "99490", "ci-a", "20.50")]],
        ("INSERT INTO billing.charge_items (id, practice, invoice_id, patient, month, code, "
         "status, amount, resource) VALUES ('ci-r', 'alpha', 'inv-1', 'p1', '2025-03', "
         "'99439', 'billable', '7.25', '{}')", {}),
        (invoice, {"id": "inv-0", "rev": 0, "r": json.dumps(stored), "in_place": 1}),
        (invoice, {"id": "inv-1", "rev": 1, "r": json.dumps({**stored, "id": "inv-1"}),
                   "in_place": 1}),
        (invoice, {"id": "inv-2", "rev": 2, "r": json.dumps({**stored, "id": "inv-2", "lineItem": []}),
                   "in_place": 0}),
    ])
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0015")
    assert "lines_in_place" not in columns(url, "invoices")
    docs = {i: json.loads(r) for i, r in run_sql(url, [
        ("SELECT id, resource FROM billing.invoices", {})])[0]}

    def item(n: int, ci: str, value: float) -> dict:
        return {"sequence": n, "chargeItemReference": {"reference": f"ChargeItem/{ci}"},
                "priceComponent": [{"type": "base", "amount": {"value": value, "currency": "USD"}}]}

    assert docs["inv-0"]["lineItem"] == [item(1, "ci-a", 20.5), item(2, "ci-c", 10.0)]
    assert list(docs["inv-0"]) == ["resourceType", "id", "status", "lineItem", "totalNet", "note"]
    assert docs["inv-1"]["lineItem"] == [item(1, "ci-r", 7.25)]
    assert docs["inv-2"]["lineItem"] == []  # stored whole: untouched
    upgrade(url, "billing", PACKAGE)
    assert run_sql(url, [("SELECT id, lines_in_place FROM billing.invoices ORDER BY id", {})])[0] == [
        ("inv-0", 0), ("inv-1", 0), ("inv-2", 0)]


def test_consents_gain_their_period_and_lose_it_on_downgrade(tmp_path):
    """billing_0017: ``consents.valid_from`` / ``valid_until`` (provision.period) and
    ``care_plans.completed_on``."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    for step in ("up", "down", "up"):
        if step == "down":
            command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0016")
        else:
            upgrade(url, "billing", PACKAGE)
        present = (set(columns(url, "consents")) & {"valid_from", "valid_until"},
                   set(columns(url, "care_plans")) & {"completed_on", "review_version"},
                   set(columns(url, "time_entries")) & {"performer_class"})
        assert present == (({"valid_from", "valid_until"}, {"completed_on", "review_version"},
                            {"performer_class"}) if step == "up" else (set(), set(), set()))


def test_payments_gain_the_payment_they_carry_and_lose_it_on_downgrade(tmp_path):
    """billing_0018: ``payments.carried_from``."""
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    for step in ("up", "down", "up"):
        if step == "down":
            command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0017")
        else:
            upgrade(url, "billing", PACKAGE)
        assert ("carried_from" in columns(url, "payments")) == (step == "up")
