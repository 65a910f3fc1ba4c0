"""billing_0025 on a database from before it (SQLite, as in embedded mode): conditions gain the
dates of the months they count for and consents when they were first received, both filled
from the source versions billing kept; a downgrade drops them."""

from __future__ import annotations

import json

from alembic import command

from ccm_shared.migrate import alembic_config, upgrade, upgrade_platform
from tests.unit.billing.test_migrations import PACKAGE, columns, run_sql

CONDITION_COLUMNS = {"chronic", "onset", "abatement", "first_received_at", "resolved_at",
                     "code_checked"}


def source_version(resource_type: str, rid: str, version: int, event_type: str,
                   received: str, data: dict) -> tuple[str, dict]:
    return ("INSERT INTO source_versions (practice, resource_type, resource_id, version_id, "
            "event_type, patient, last_updated, sha256, received_at, connection, recorded_at, "
            "data) VALUES ('a', :type, :id, :v, :event, 'p1', :received, :sha, :received, NULL, "
            ":received, :data)",
            {"type": resource_type, "id": rid, "v": str(version), "event": event_type,
             "received": received, "sha": "0" * 64, "data": json.dumps(data)})


def condition_data(clinical: str, chronic: bool, onset: str | None) -> dict:
    return {"clinicalStatus": clinical, "verificationStatus": "confirmed", "chronic": chronic,
            "deleted": False, "onset": onset, "abatement": None}


def test_billing_0025_fills_condition_dates_and_consent_receipts_and_its_downgrade_drops_them(
        tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/ccm.db"
    upgrade_platform(url)
    upgrade(url, "billing", PACKAGE)
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0024")
    assert not CONDITION_COLUMNS & columns(url, "conditions")
    assert "received_at" not in columns(url, "consents")
    condition = "ingest.condition.upserted.v1"
    run_sql(url, [
        ("INSERT INTO conditions (practice, condition_id, patient, version, counts) VALUES "
         "('a', 'k1', 'p1', 'v2', 0), ('a', 'k2', 'p1', 'v1', 1), ('a', 'k3', 'p1', 'v1', 1)",
         {}),
        # k1: chronic in 2025, resolved (no abatement) in November 2026
        source_version("Condition", "k1", 1, condition, "2025-01-05 12:00:00",
                       condition_data("active", True, "2019-04-02")),
        source_version("Condition", "k1", 2, condition, "2026-11-12 15:00:00",
                       condition_data("resolved", False, "2019-04-02")),
        # k2: no onset, first received in August 2026; k3: no version kept
        source_version("Condition", "k2", 1, condition, "2026-08-03 12:00:00",
                       condition_data("active", True, None)),
        ("INSERT INTO consents (practice, consent_id, patient, version, status, obtained_at, "
         "provision) VALUES ('a', 'c1', 'p1', 'v2', 'active', '2026-08-01 13:00:00', 'permit')",
         {}),
        source_version("Consent", "c1", 1, "ingest.consent.granted.v1", "2026-11-29 03:57:38",
                       {}),
        source_version("Consent", "c1", 2, "ingest.consent.granted.v1", "2026-12-01 10:00:00",
                       {}),
    ])
    upgrade(url, "billing", PACKAGE)
    (conditions, consents) = run_sql(url, [
        ("SELECT condition_id, chronic, onset, first_received_at, resolved_at, code_checked "
         "FROM conditions ORDER BY condition_id", {}),
        ("SELECT consent_id, received_at FROM consents", {}),
    ])
    k1, k2, k3 = conditions
    assert (k1.chronic, k1.onset, k1.code_checked) == (True, "2019-04-02", None)
    assert str(k1.resolved_at).startswith("2026-11-12 15:00:00")
    assert (k2.chronic, k2.onset, k2.resolved_at) == (True, None, None)
    assert str(k2.first_received_at).startswith("2026-08-03 12:00:00")
    # kept before billing kept versions: as it counts now, for every month
    assert (k3.chronic, k3.onset, k3.first_received_at, k3.resolved_at) == (True, None, None,
                                                                           None)
    assert [(c.consent_id, str(c.received_at)[:19]) for c in consents] == [
        ("c1", "2026-11-29 03:57:38")]
    command.downgrade(alembic_config(url, "billing", PACKAGE), "billing_0024")
    assert not CONDITION_COLUMNS & columns(url, "conditions")
    assert "received_at" not in columns(url, "consents")
