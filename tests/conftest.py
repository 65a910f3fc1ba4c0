"""Session-wide checks. Every event any test writes to an outbox is validated against
contracts/events, so a contract test covers every event the code can emit in the suite."""

import pytest

from ccm_shared.events import practice_topic
from ccm_shared.outbox import Outbox
from tests.support.contracts import assert_valid_event


@pytest.fixture(autouse=True)
def _events_follow_their_contracts(monkeypatch):
    original = Outbox.add

    async def checked_add(self, topic, event):
        stored = await original(self, topic, event)
        assert_valid_event(stored)
        allowed = (stored.type, practice_topic(stored.tenant, stored.type))
        assert topic in allowed or topic.startswith(("tests.", "bench.")), (
            f"event {stored.type} written to topic {topic}: topics are named after event types"
        )
        return stored

    monkeypatch.setattr(Outbox, "add", checked_add)
