"""Per-practice Kafka topics: created by this service before anything is written for them.

Production brokers do not auto-create topics, and one missing topic would hold up the whole
outbox relay, so the fan-out makes sure a practice's topics exist before it writes the first
event for that practice (cached per process), and a background job creates them for every
registered practice so a practice system can subscribe before its first event.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from ccm_notification.subscriptions.domain import FEED_TYPES
from ccm_shared.events import practice_topic
from ccm_shared.transport import TOPIC_CONFIG, KafkaTransport, Transport

log = structlog.get_logger(__name__)

_OK, _ALREADY_EXISTS = 0, 36  # Kafka CreateTopics error codes


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
        topics = [t for p in wanted for t in topics_of(p)]
        if isinstance(self.transport, KafkaTransport):
            await self._create_on_kafka(self.transport, topics)
        else:
            await self.transport.ensure_topics(topics)
        self.known.update(wanted)

    async def _create_on_kafka(self, kafka: KafkaTransport, topics: list[str]) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(
            **kafka.connection_options(), client_id=f"{kafka.client_id}-admin"
        )
        await admin.start()
        try:
            missing = [t for t in topics if t not in set(await admin.list_topics())]
            if not missing:
                return
            response = await admin.create_topics(
                [NewTopic(t, self.partitions, self.replication, topic_configs=TOPIC_CONFIG)
                 for t in missing]
            )
            for topic, code, *_ in response.topic_errors:
                if code not in (_OK, _ALREADY_EXISTS):
                    raise RuntimeError(f"could not create topic {topic}: error code {code}")
            log.info("practice topics created", count=len(missing))
        finally:
            await admin.close()
