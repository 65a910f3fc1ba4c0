"""Session-wide checks. Every event any test writes to an outbox is validated against
contracts/events, so a contract test covers every event the code can emit in the suite."""

import pytest
from hypothesis import HealthCheck, settings

from ccm_shared.events import CloudEvent, practice_topic
from ccm_shared.outbox import Outbox
from tests.support.contracts import assert_valid_event

# No property test is timed (speed is measured in benchmarks/): Hypothesis' per-example deadline
# and its "input generation is slow" check depend on how busy the machine is, and failed a
# canonical-text test on a loaded host. A test's own @settings still override the rest.
settings.register_profile("ccm", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ccm")


@pytest.fixture(autouse=True)
def _events_follow_their_contracts(monkeypatch):
    original = Outbox.stage_many  # Outbox.add and add_many go through it, bulk writers too

    async def checked_stage_many(self, items, **options):
        stored, rows = await original(self, items, **options)
        assert len(rows) == len(items)
        if options.get("events", True):
            assert [e.to_json().decode() for e in stored] == [row["payload"] for row in rows]
        for (topic, _), row in zip(items, rows, strict=True):
            event = CloudEvent.from_json(row["payload"])  # what is written is what is checked
            assert_valid_event(event)
            assert (row["event_id"], row["correlation_id"]) == (event.id, event.correlationid)
            allowed = (event.type, practice_topic(event.tenant, event.type))
            assert topic in allowed or topic.startswith(("tests.", "bench.")), (
                f"event {event.type} written to topic {topic}: topics are named after event types"
            )
        return stored, rows

    monkeypatch.setattr(Outbox, "stage_many", checked_stage_many)
