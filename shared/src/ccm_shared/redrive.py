"""Dead letters sent back: ``ccm redrive``.

A consumer sets aside an event it cannot apply in ``<topic>.dlq`` (``consumer.py``), with why in
its ``dlq-*`` headers, and its partition moves on. Once the cause is fixed (a bug, a missing
practice, a contract a producer moved ahead of), the event has to be applied after all. A redrive
republishes each chosen dead letter, unchanged (key, value, its other headers), to the topic it
came from, where the consumers take it as any other event:

- **Nothing twice.** Every consumer keeps the ids of the events it applied (its inbox), so the
  consumers that had applied the event take the copy as a duplicate; the one that had set it
  aside applies it now, or sets it aside again (a new dead letter, with new headers). An inbox
  keeps an id for ``CCM_INBOX_RETENTION_DAYS``: a dead letter whose event (its CloudEvent
  ``time``) is older than that, less a day, is not sent back (listed as ``"sent": false,
  "tooOld": true``) unless the operator says so (``older_than``), knowing the other consumers
  may apply it a second time; its partition's reading stops there, uncommitted, so a run that
  says so still finds it.
- **Nothing lost, each dead letter once per choice.** The dead-letter topics are read with a
  consumer group of the redrive's own (one per choice of ``--consumer`` and ``--practice``, so
  another choice finds what this one passed over, and sends again what it sent: duplicates the
  inboxes absorb), and its offsets are committed only after the copies are durably on Kafka.
  A redrive stopped between the two sends those copies again: duplicates, which the inboxes
  absorb. Each run reads to the end the partitions had when it began, so what it sets aside
  again is left for the next run, never looped over.
- **Order.** A copy comes after the events that followed the original. The consumers apply events
  out of order as they do any redelivery (ingest's per-patient sequence numbers, the state each
  consumer keeps per resource version).

Kafka only: the embedded mode's event log is one process's (``ccm up``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from ccm_shared.consumer import DLQ_SUFFIX, message_tenant
from ccm_shared.events import Message
from ccm_shared.transport import KafkaTransport, _message


@dataclass
class DeadLetter:
    """What a dead letter says of itself, without the event's data (PHI)."""

    message: Message
    to: str  # the topic it came from
    chosen: bool
    too_old: bool = False  # chosen, but older than the inboxes remember: not sent

    def view(self) -> dict:
        h = {k: v.decode("utf-8", "replace") for k, v in self.message.headers}
        try:
            event = json.loads(self.message.value)
        except (TypeError, ValueError):
            event = None
        event = event if isinstance(event, dict) else {}
        return {
            "topic": self.message.topic, "partition": self.message.partition,
            "offset": self.message.offset, "to": self.to,
            "eventId": event.get("id"), "type": event.get("type"),
            "tenant": message_tenant(self.message), "consumer": h.get("dlq-consumer"),
            "error": h.get("dlq-error"), "reason": h.get("dlq-reason"),
            "attempts": h.get("dlq-attempts"), "source": h.get("dlq-source"),
            **({"tooOld": True} if self.too_old else {}),
        }


@dataclass
class RedriveResult:
    read: int = 0
    chosen: int = 0
    sent: int = 0
    too_old: int = 0  # chosen, older than the inboxes remember, not sent
    # partitions whose reading stopped at such a letter (not committed past it)
    held: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)


# How much sooner than the inboxes forget an id a dead letter counts as too old to send back:
# retention deletes inbox rows in passes, and clocks differ.
_MARGIN_SECONDS = 24 * 3600


def _event_ms(message: Message, written_ms: int) -> float:
    """When the dead letter's event was made (its CloudEvent ``time``), in ms: no consumer
    applied it earlier, so no inbox row of it is older. The dead letter's own Kafka time is when
    it was set aside (a lagging consumer's, or a redrive's again), later than the others applied
    it; it serves only for a value that is no event."""
    try:
        text = json.loads(message.value).get("time")
        made = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return made.timestamp() * 1000 if made.tzinfo else written_ms
    except (AttributeError, TypeError, ValueError):
        return written_ms


def source_topic(message: Message) -> str:
    """The topic a dead letter came from: its ``dlq-source`` (``topic/partition/offset``), else
    its own name without ``.dlq``."""
    source = message.header("dlq-source")
    if source:
        topic = source.decode("utf-8", "replace").rsplit("/", 2)[0]
        if topic:
            return topic
    return message.topic.removesuffix(DLQ_SUFFIX)


def group_id(consumer: str | None, practice: str | None) -> str:
    """The redrive's consumer group for a choice: its place in the dead-letter topics."""
    return f"ccm-redrive:{consumer or '*'}:{practice or '*'}"


def republished(message: Message, to: str) -> Message:
    """The copy for ``to``, the topic it came from: the same key and value, without the
    ``dlq-*`` headers (a consumer that sets it aside again writes its own)."""
    return Message(topic=to, key=message.key, value=message.value,
                   headers=tuple((k, v) for k, v in message.headers if not k.startswith("dlq-")))


async def redrive(transport: KafkaTransport, topics: Sequence[str] | None, *,
                  consumer: str | None = None, practice: str | None = None,
                  dry_run: bool = False, timeout: float = 30.0,
                  remembered_seconds: float | None = None, older_than: bool = False,
                  seen: Callable[[DeadLetter], None] | None = None) -> RedriveResult:
    """Send back the dead letters of ``topics`` (``<topic>.dlq``; None: every one on the broker)
    that ``consumer`` set aside (None: any) for ``practice`` (None: any), from the redrive's
    place up to each partition's end when it began. ``dry_run``: read, send and commit nothing.
    ``remembered_seconds``: how long the inboxes keep an event id; a chosen dead letter older
    than that less a day is passed over unless ``older_than``. ``seen`` is told of each dead
    letter read, chosen or not."""
    from aiokafka import AIOKafkaConsumer

    result = RedriveResult()
    if topics is not None:
        bad = [t for t in topics if not t.endswith(DLQ_SUFFIX)]
        if bad:
            raise ValueError(f"not dead-letter topics (they end in {DLQ_SUFFIX!r}): "
                             + ", ".join(bad))
    partitions = [tp for tp in await transport.partitions_of(topics, result.unknown)
                  if tp.topic.endswith(DLQ_SUFFIX)]
    if not partitions:
        return result
    reader = AIOKafkaConsumer(**transport.connection_options(),
                              group_id=group_id(consumer, practice), enable_auto_commit=False,
                              auto_offset_reset="earliest", isolation_level="read_committed",
                              client_id=f"{transport.client_id}-redrive",
                              request_timeout_ms=transport.request_timeout_ms)
    await reader.start()
    oldest_ms = (None if remembered_seconds is None or older_than else
                 (time.time() - max(0.0, remembered_seconds - _MARGIN_SECONDS)) * 1000)
    try:
        reader.assign(partitions)
        ends = await reader.end_offsets(partitions)
        wanted = {tp: end for tp, end in ends.items() if await reader.position(tp) < end}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while wanted and loop.time() < deadline:
            batches = await reader.getmany(*wanted, timeout_ms=500)
            copies: list[Message] = []
            handled = {}
            held = set()
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= wanted.get(tp, -1):
                        break
                    message = _message(record)
                    to = source_topic(message)
                    chosen = ((consumer is None
                               or message.header("dlq-consumer") == consumer.encode())
                              and (practice is None or message_tenant(message) == practice))
                    too_old = (chosen and oldest_ms is not None
                               and _event_ms(message, record.timestamp) < oldest_ms)
                    result.read += 1
                    result.chosen += chosen
                    result.too_old += too_old
                    if seen is not None:
                        seen(DeadLetter(message, to, chosen, too_old))
                    if too_old:
                        # The place stays before it (never committed past): a run with
                        # older_than, or after the cause is judged, still finds it. The rest
                        # of this partition waits behind it, as its order requires.
                        held.add(tp)
                        break
                    if chosen:
                        copies.append(republished(message, to))
                    handled[tp] = record.offset + 1
            if not dry_run and handled:
                if copies:  # durably on Kafka before the redrive's place moves past them
                    await transport.send_batch(copies)
                    result.sent += len(copies)
                await reader.commit(handled)
            for tp in list(wanted):
                if tp in held or handled.get(tp, -1) >= wanted[tp] \
                        or await reader.position(tp) >= wanted[tp]:
                    del wanted[tp]
            result.held += [f"{tp.topic}[{tp.partition}]" for tp in sorted(held)]
        result.incomplete = [f"{tp.topic}[{tp.partition}]" for tp in wanted]
        return result
    finally:
        await reader.stop()
