"""The event envelope: CloudEvents 1.0 (structured JSON mode) plus ccm extension attributes.

Extensions (CloudEvents attribute names are lowercase alphanumerics):
- ``tenant``: the practice id; every event carries it.
- ``sequence``: per (tenant, subject) counter assigned in the producing transaction, so consumers
  can tell order and gaps for one patient.
- ``correlationid``: carried from the HTTP request that caused the event to every consumer's logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json, to_jsonable_python

from ccm_shared.ids import random_uuid

CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"


class _Envelope:
    """What both envelope classes share: the Kafka key and the structured-mode JSON."""

    __slots__ = ()

    @property
    def patient(self) -> str | None:
        """The patient id when the subject is ``Patient/{id}``."""
        subject = self.subject  # type: ignore[attr-defined]
        if subject and subject.startswith("Patient/"):
            return subject.removeprefix("Patient/")
        return None

    def kafka_key(self) -> str:
        """tenant + patient keeps each patient's events on one partition, in order."""
        return partition_key(self.tenant, self.subject)  # type: ignore[attr-defined]

    def to_json(self, changes: dict[str, Any] | None = None) -> bytes:
        """The structured-mode JSON: the envelope without its unset attributes, then ``data``;
        with ``changes``, that of ``model_copy(update=changes)`` without making the copy.

        Written by orjson, the same text as ``model_dump_json(exclude_none=True)``: the envelope's
        attributes in field order (a UTC time ends in ``Z``, as pydantic writes it), then
        ``data`` (a billing Invoice event carries ~320 KB of it, which pydantic's serializer
        took ~3 ms to write); values JSON has no type for (datetimes, decimals) are written as
        pydantic writes them, so the text is the same but for the exponent format of very large
        or small floats."""
        if changes:
            envelope = {name: value for name in _ENVELOPE_ATTRIBUTES if (value := changes[name]
                        if name in changes else getattr(self, name)) is not None}
            data = changes.get("data", self.data)  # type: ignore[attr-defined]
        else:
            envelope = {name: value for name in _ENVELOPE_ATTRIBUTES
                        if (value := getattr(self, name)) is not None}
            data = self.data  # type: ignore[attr-defined]
        if not _orjson_writes_time_as_pydantic(envelope["time"]):
            envelope["time"] = to_jsonable_python(envelope["time"])
        envelope["data"] = orjson.Fragment(_data_json(data))
        # A copy: orjson's own bytes keep the ~4 KB buffer it wrote into, which a message held
        # in memory (a producer's batch) would carry along: 80 MB more for 20,000 events.
        return bytes(memoryview(orjson.dumps(envelope, option=orjson.OPT_UTC_Z)))


class CloudEvent(_Envelope, BaseModel):
    """A CloudEvents 1.0 envelope; ``data`` is the event's own JSON document."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: str = "1.0"
    id: str = Field(default_factory=random_uuid)
    source: str
    type: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    subject: str | None = None
    datacontenttype: str = "application/json"
    dataschema: str | None = None
    tenant: str
    sequence: int | None = None
    correlationid: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes | str) -> CloudEvent:
        return cls.model_validate_json(raw)


_ENVELOPE_ATTRIBUTES = tuple(name for name in CloudEvent.model_fields if name != "data")


@dataclass(slots=True)
class EventDraft(_Envelope):
    """A CloudEvent on its way to the outbox, not checked as a model: for a producer that makes
    one or more per stored resource from values it built itself (ingest: a 1,000-entry Bundle
    makes 1,000 events, and the model took ~6 µs each to build, more than writing its JSON).
    The same attributes, defaults and JSON as ``CloudEvent`` (a test compares them);
    ``Outbox.stage_many`` takes either."""

    source: str
    type: str
    tenant: str
    time: datetime
    subject: str | None = None
    data: dict[str, Any] = dataclass_field(default_factory=dict)
    correlationid: str | None = None
    sequence: int | None = None
    id: str = dataclass_field(default_factory=random_uuid)
    specversion: str = "1.0"
    datacontenttype: str = "application/json"
    dataschema: str | None = None

    def to_json(self, changes: dict[str, Any] | None = None) -> bytes:
        """``_Envelope.to_json``, the same text, written in one pass: the time as pydantic
        writes it (the drafts of one write share theirs, so it is worked out once), the data
        beside it rather than written first and copied in (an ingest event: 2.9 → 1.6 µs)."""
        sequence, correlationid = self.sequence, self.correlationid
        if changes:
            if not changes.keys() <= _DRAFT_CHANGES:
                return _Envelope.to_json(self, changes)
            sequence = changes.get("sequence", sequence)
            correlationid = changes.get("correlationid", correlationid)
        time = self.time
        envelope: dict[str, Any] = {
            "specversion": self.specversion, "id": self.id, "source": self.source,
            "type": self.type, "time": _time_text(time, time.tzinfo, time.fold)}
        if self.subject is not None:
            envelope["subject"] = self.subject
        envelope["datacontenttype"] = self.datacontenttype
        if self.dataschema is not None:
            envelope["dataschema"] = self.dataschema
        envelope["tenant"] = self.tenant
        if sequence is not None:
            envelope["sequence"] = sequence
        if correlationid is not None:
            envelope["correlationid"] = correlationid
        envelope["data"] = self.data
        try:
            # A copy, as _Envelope.to_json makes (orjson's bytes keep the buffer it wrote into).
            return bytes(memoryview(orjson.dumps(envelope, default=_jsonable,
                                                 option=orjson.OPT_PASSTHROUGH_DATETIME)))
        except TypeError:  # beyond orjson (integers over 64 bits): as the model writes them
            return _Envelope.to_json(self, changes)


# What the outbox changes in a draft it stages (its one-pass JSON covers those).
_DRAFT_CHANGES = frozenset({"sequence", "correlationid"})


@lru_cache(maxsize=64)
def _time_text(value: datetime, _zone: object, _fold: int) -> Any:
    """An envelope time as pydantic writes it. Equal aware datetimes can differ in zone or fold
    (and so in text): both are part of the key."""
    return to_jsonable_python(value)


def _orjson_writes_time_as_pydantic(value: Any) -> bool:
    """A datetime orjson writes as pydantic does: naive, or an offset of whole minutes (orjson
    rounds seconds of an offset, pydantic drops them; a zone without an offset is naive to
    pydantic). Anything else (a subclass, such offsets) is written by pydantic."""
    if type(value) is not datetime:
        return False
    if value.tzinfo is None:
        return True
    offset = value.utcoffset()
    return offset is not None and offset.seconds % 60 == 0 and not offset.microseconds


def _jsonable(value: Any) -> Any:
    """What JSON has no type for, as model_dump_json(exclude_none=True) writes it (a nested
    model without its None fields)."""
    return to_jsonable_python(value, exclude_none=True)


def _data_json(data: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(data, default=_jsonable, option=orjson.OPT_PASSTHROUGH_DATETIME)
    except TypeError:  # beyond orjson (integers over 64 bits): pydantic writes all of JSON
        return to_json(data, inf_nan_mode="null", exclude_none=True)  # as the model writes them


def partition_key(tenant: str, subject: str | None) -> str:
    if subject and subject.startswith("Patient/"):
        return f"{tenant}:{subject.removeprefix('Patient/')}"
    return tenant


@dataclass(frozen=True)
class Message:
    """A record as it travels on a transport (Kafka or the in-process bus)."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int = 0
    offset: int = -1

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


_CONTENT_TYPE_HEADER = ("content-type", CLOUDEVENTS_CONTENT_TYPE.encode())


def routing_headers(
    event_type: str, tenant: str, correlation_id: str | None
) -> tuple[tuple[str, bytes], ...]:
    """Kafka headers carry routing facts only — never PHI."""
    headers = (
        _CONTENT_TYPE_HEADER,
        ("ce_type", event_type.encode()),
        ("ce_tenant", tenant.encode()),
    )
    if correlation_id:
        return (*headers, ("correlation-id", correlation_id.encode()))
    return headers


def envelope_headers(event: CloudEvent) -> tuple[tuple[str, bytes], ...]:
    return routing_headers(event.type, event.tenant, event.correlationid)


def to_message(topic: str, event: CloudEvent) -> Message:
    return Message(
        topic=topic,
        key=event.kafka_key().encode(),
        value=event.to_json(),
        headers=envelope_headers(event),
    )


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)


PRACTICE_TOPIC_PREFIX = "ccm.practice."


def practice_topic(practice: str, event_type: str) -> str:
    """The per-practice topic of a practice-facing event type.

    ``ccm.practice.<practice>.`` is a literal prefix, so one prefixed Kafka ACL (or Strimzi
    KafkaUser) grants a practice its own topics and nothing else: practice ids cannot contain
    dots, so ``ccm.practice.acme.`` never matches another practice's topics.
    """
    return f"{PRACTICE_TOPIC_PREFIX}{practice}.{event_type}"
