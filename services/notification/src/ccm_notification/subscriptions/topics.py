"""Per-practice Kafka topics: created by this service before anything is written for them.

Production brokers do not auto-create topics, and one missing topic would hold up the whole
outbox relay, so the fan-out makes sure a practice's topics exist before it writes the first
event for that practice (cached per process), and a background job creates them for every
registered practice so a practice system can subscribe before its first event.
"""

from __future__ import annotations

from collections.abc import Iterable

from ccm_notification.subscriptions.domain import FEED_TYPES
from ccm_shared.events import practice_topic
from ccm_shared.transport import Transport


def topics_of(practice: str) -> list[str]:
    return [practice_topic(practice, t) for t in FEED_TYPES]


class PracticeTopics:
    """Ensures ``ccm.practice.<id>.<type>`` topics (one partition by default: one order)."""

    def __init__(self, transport: Transport, *, partitions: int, replication: int) -> None:
        self.transport, self.partitions, self.replication = transport, partitions, replication
        self.known: set[str] = set()

    async def ensure(self, practices: Iterable[str]) -> None:
        wanted = [p for p in dict.fromkeys(practices) if p not in self.known]
        if not wanted:
            return
        await self.transport.ensure_topics([t for p in wanted for t in topics_of(p)],
                                           partitions=self.partitions,
                                           replication_factor=self.replication)
        self.known.update(wanted)
