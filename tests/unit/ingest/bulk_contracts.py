"""The session-wide contract check (tests/conftest.py) wraps ``Outbox.add``; ingest writes its
events with ``outbox_bulk.add_events`` (many rows per statement), so the same check is applied
there. Imported as an autouse fixture by the ingest conftests (unit and integration)."""

import pytest

from ccm_ingest.adapters import outbox_bulk
from tests.support.contracts import assert_valid_event


@pytest.fixture(autouse=True)
def _bulk_events_follow_their_contracts(monkeypatch):
    original = outbox_bulk.add_events
    checked: list[int] = []

    async def checked_add_events(session, tenant, events):
        stored = await original(session, tenant, events)
        for event in stored:
            assert_valid_event(event)
            assert event.tenant == tenant, "every event of a batch belongs to its practice"
        checked.append(len(stored))
        return stored

    monkeypatch.setattr(outbox_bulk, "add_events", checked_add_events)
    return checked
