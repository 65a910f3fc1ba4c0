"""billing_0025 on a database from before it (PostgreSQL, and SQLite as in embedded mode):
conditions gain the dates of the months they count for and consents when they were first
received, both filled from the source versions billing kept; the downgrade drops them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from alembic import command

from ccm_shared.migrate import alembic_config, upgrade, upgrade_platform
from tests.integration.billing.payments.test_migration_b0020 import PACKAGE, run_sql

VERSION = ("INSERT INTO S.source_versions (practice, resource_type, resource_id, version_id, "
           "event_type, patient, last_updated, sha256, received_at, connection, recorded_at, "
           "data) VALUES ('alpha', :type, :id, :v, :event, 'p1', :at, :sha, :at, NULL, :at, "
           ":data)")
CONDITION = "ingest.condition.upserted.v1"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):  # noqa: ANN001, ANN201
    """(url, schema) migrated to billing_0024 (to the head and down: the first migrations
    create today's tables)."""
    if request.param == "sqlite":
        url, schema = f"sqlite+aiosqlite:///{tmp_path}/ccm.db", "billing"
        upgrade_platform(url)
    else:
        url, schema = request.getfixturevalue("infra").database_url, f"t_b25_{uuid.uuid4().hex[:8]}"
    upgrade(url, schema, PACKAGE)
    command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0024")
    yield url, schema
    if request.param == "postgresql":
        run_sql(url, schema, [(f'DROP SCHEMA "{schema}" CASCADE', {})])


def _utc(value) -> str | None:  # noqa: ANN001 - SQLite answers the text it keeps, PostgreSQL a datetime
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return value[:19] if value else None


def test_billing_0025_on_a_database_from_before_it(database):
    url, schema = database

    def t(text: str):  # noqa: ANN202 - a time as the driver takes it (asyncpg: a datetime)
        return text if url.startswith("sqlite") else datetime.fromisoformat(text).replace(
            tzinfo=UTC)

    def version(rtype: str, rid: str, v: int, event: str, at: str, data: dict) -> tuple:
        return VERSION, {"type": rtype, "id": rid, "v": str(v), "event": event, "at": t(at),
                         "sha": "0" * 64, "data": json.dumps(data)}

    def condition(clinical: str, chronic: bool, onset: str | None) -> dict:
        return {"clinicalStatus": clinical, "verificationStatus": "confirmed",
                "chronic": chronic, "deleted": False, "onset": onset, "abatement": None}

    run_sql(url, schema, [
        ("INSERT INTO S.conditions (practice, condition_id, patient, version, counts) VALUES "
         "('alpha', 'k1', 'p1', 'v2', false), ('alpha', 'k2', 'p1', 'v1', true)", {}),
        version("Condition", "k1", 1, CONDITION, "2025-01-05 12:00:00",
                condition("active", True, "2019-04-02")),
        version("Condition", "k1", 2, CONDITION, "2026-11-12 15:00:00",
                condition("resolved", False, "2019-04-02")),
        ("INSERT INTO S.consents (practice, consent_id, patient, version, status, obtained_at, "
         "provision) VALUES ('alpha', 'c1', 'p1', 'v1', 'active', :at, 'permit'), "
         "('alpha', 'c2', 'p1', 'v1', 'active', :at, 'permit')",
         {"at": t("2026-08-01 13:00:00")}),
        version("Consent", "c1", 1, "ingest.consent.granted.v1", "2026-11-29 03:57:38", {}),
    ])
    upgrade(url, schema, PACKAGE)
    conditions, consents = run_sql(url, schema, [
        ("SELECT condition_id, chronic, onset, first_received_at, resolved_at FROM S.conditions "
         "ORDER BY condition_id", {}),
        ("SELECT consent_id, received_at FROM S.consents ORDER BY consent_id", {}),
    ])
    assert [(c.condition_id, c.chronic, c.onset, _utc(c.first_received_at), _utc(c.resolved_at))
            for c in conditions] == [
        ("k1", True, "2019-04-02", "2025-01-05 12:00:00", "2026-11-12 15:00:00"),
        ("k2", True, None, None, None)]  # no version kept: as it counts now, every month
    assert [(c.consent_id, _utc(c.received_at)) for c in consents] == [
        ("c1", "2026-11-29 03:57:38"), ("c2", None)]
    command.downgrade(alembic_config(url, schema, PACKAGE), "billing_0024")
    (remaining,) = run_sql(url, schema, [("SELECT * FROM S.conditions", {})])
    assert "chronic" not in remaining[0]._fields
