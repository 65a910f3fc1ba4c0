"""Session-wide checks. Every event any test writes to an outbox is validated against
contracts/events, so a contract test covers every event the code can emit in the suite."""

import pytest

from ccm_shared.events import practice_topic
from ccm_shared.outbox import Outbox
from tests.support.contracts import assert_valid_event


@pytest.fixture(autouse=True)
def _events_follow_their_contracts(monkeypatch):
    original = Outbox.stage_many  # Outbox.add and add_many go through it, bulk writers too

    async def checked_stage_many(self, items):
        stored, rows = await original(self, items)
        for (topic, _), event in zip(items, stored, strict=True):
            assert_valid_event(event)
            allowed = (event.type, practice_topic(event.tenant, event.type))
            assert topic in allowed or topic.startswith(("tests.", "bench.")), (
                f"event {event.type} written to topic {topic}: topics are named after event types"
            )
        return stored, rows

    monkeypatch.setattr(Outbox, "stage_many", checked_stage_many)
