"""The session-wide contract check (tests/conftest.py) wraps ``Outbox.add``; ingest makes its
outbox rows in bulk (``outbox_bulk.stage_events``), so the same check is applied there.
Imported as an autouse fixture by the ingest conftests (unit and integration)."""

import pytest

from ccm_ingest.adapters import outbox_bulk
from tests.support.contracts import assert_valid_event


@pytest.fixture(autouse=True)
def _bulk_events_follow_their_contracts(monkeypatch):
    original = outbox_bulk.stage_events
    checked: list[int] = []

    async def checked_stage_events(session, tenant, events):
        stored, rows = await original(session, tenant, events)
        for event, row in zip(stored, rows, strict=True):
            assert_valid_event(event)
            assert event.tenant == tenant, "every event of a batch belongs to its practice"
            assert row["topic"] == event.type, "topics are named after event types"
        checked.append(len(stored))
        return stored, rows

    monkeypatch.setattr(outbox_bulk, "stage_events", checked_stage_events)
    return checked
