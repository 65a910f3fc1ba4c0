import json
import os
import uuid
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ccm_shared.events import CloudEvent, EventDraft, envelope_headers, to_message
from ccm_shared.ids import random_uuid
from tests.support.messaging import make_event

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
ENVELOPE = json.loads((CONTRACTS / "events" / "envelope.schema.json").read_text())


def test_envelope_round_trips_through_json():
    ev = make_event(sequence=3, correlationid="abc")
    assert CloudEvent.from_json(ev.to_json()) == ev


@pytest.mark.parametrize(
    ("subject", "key"), [("Patient/p9", "acme:p9"), ("Organization/o1", "acme"), (None, "acme")]
)
def test_kafka_key_is_tenant_plus_patient(subject, key):
    ev = CloudEvent(source="/t", type="tests.x.y.v1", tenant="acme", subject=subject)
    assert ev.kafka_key() == key


def test_headers_carry_no_payload_data():
    ev = make_event(data={"name": "Jane Doe", "birthDate": "1950-01-01"}, correlationid="c1")
    headers = dict(envelope_headers(ev))
    assert set(headers) == {"content-type", "ce_type", "ce_tenant", "correlation-id"}
    assert not any(b"Jane" in v or b"1950" in v for v in headers.values())


def test_emitted_envelope_validates_against_the_contract():
    msg = to_message("tests.thing.happened.v1", make_event(sequence=1, correlationid="c"))
    jsonschema.validate(json.loads(msg.value), ENVELOPE, format_checker=jsonschema.FormatChecker())


def test_contract_rejects_an_envelope_without_tenant():
    doc = json.loads(make_event().to_json())
    del doc["tenant"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, ENVELOPE)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text() | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
EXTRA = st.datetimes(timezones=st.just(UTC)) | st.dates() | st.decimals(allow_nan=False,
                                                                         allow_infinity=False,
                                                                         places=2)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), JSON_VALUES | EXTRA, max_size=6))
def test_the_envelope_is_written_as_pydantic_writes_it(data):
    """to_json writes ``data`` with orjson: the same text as pydantic's model_dump_json (floats
    kept to where both print the same digits; beyond, only the exponent format may differ)."""
    ev = make_event(data=data, sequence=2, correlationid="c")
    assert ev.to_json() == ev.model_dump_json(exclude_none=True).encode()


@given(st.dictionaries(st.text(max_size=8), JSON_VALUES | st.integers() | st.floats(allow_nan=False),
                       max_size=6))
@example({"big": -(2**63) - 1, "inf": float("inf")})  # pydantic's fallback: inf as null too
def test_any_json_data_is_written_and_reads_back_the_same(data):
    ev = make_event(data=data)
    assert json.loads(ev.to_json()) == json.loads(ev.model_dump_json(exclude_none=True))


def test_a_nested_model_in_data_is_written_as_the_envelope_wrote_it():
    from pydantic import BaseModel

    class Part(BaseModel):
        a: int | None = None
        b: str = "x"

    for data in ({"m": Part()}, {"m": Part(), "big": 2**70}):
        ev = make_event(data=data)
        assert ev.to_json() == ev.model_dump_json(exclude_none=True).encode()


class NoOffset(tzinfo):
    """A zone that knows no offset: naive to pydantic."""

    def utcoffset(self, dt):
        return None


class Clock(datetime):
    """A datetime subclass, as time-freezing libraries make."""


OFFSETS = (st.sampled_from([UTC, timezone(timedelta(hours=-5)), ZoneInfo("America/New_York"),
                            ZoneInfo("UTC"), ZoneInfo("Africa/Monrovia"), NoOffset()])
           | st.integers(min_value=-86399, max_value=86399).map(
               lambda s: timezone(timedelta(seconds=s))))


@settings(max_examples=300, deadline=None)
@example(time=datetime(1960, 1, 1, tzinfo=ZoneInfo("Africa/Monrovia")), subject=None, sequence=None,
         correlationid=None, dataschema=None, source="", tenant="")  # offset -0:44:30
@example(time=Clock(2026, 1, 1, tzinfo=UTC), subject=None, sequence=None, correlationid=None,
         dataschema=None, source="", tenant="")
@given(time=st.datetimes(timezones=st.none() | OFFSETS), subject=st.none() | st.text(max_size=12),
       sequence=st.none() | st.integers(min_value=0, max_value=2**62),
       correlationid=st.none() | st.text(max_size=8), dataschema=st.none() | st.text(max_size=8),
       source=st.text(max_size=12), tenant=st.text(max_size=8))
def test_every_envelope_attribute_is_written_as_pydantic_writes_it(time, subject, sequence,
                                                                   correlationid, dataschema,
                                                                   source, tenant):
    """to_json writes the envelope itself: attribute order, unset attributes left out, and the
    time (``Z`` for UTC, offsets to the second, microseconds, naive, subclasses) exactly as
    model_dump_json."""
    ev = CloudEvent(source=source, type="tests.x.y.v1", tenant=tenant, time=time,
                    subject=subject, sequence=sequence, correlationid=correlationid,
                    dataschema=dataschema, data={"a": 1})
    assert ev.to_json() == ev.model_dump_json(exclude_none=True).encode()


def test_event_ids_are_random_version_4_uuids():
    ids = [random_uuid() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
    assert CloudEvent(source="/t", type="tests.x.y.v1", tenant="t").id != \
        CloudEvent(source="/t", type="tests.x.y.v1", tenant="t").id


def test_a_forked_child_never_hands_out_its_parents_event_ids():
    """The random bytes are fetched in bulk: a forked child fetches its own instead of handing
    out the ones its parent goes on using."""
    random_uuid()  # bytes fetched: the child inherits them unused
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, then out without running the parent's clean-ups
        os.close(read)
        os.write(write, json.dumps([random_uuid() for _ in range(300)]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    parent = [random_uuid() for _ in range(300)]
    assert len(set(child + parent)) == 600


@given(sequence=st.none() | st.integers(min_value=0, max_value=2**40),
       correlationid=st.none() | st.text(max_size=8),
       changes=st.fixed_dictionaries({}, optional={
           "sequence": st.integers(min_value=0, max_value=2**40),
           "correlationid": st.text(max_size=8),
           "data": st.dictionaries(st.text(max_size=4), st.integers(), max_size=3)}))
def test_to_json_with_changes_is_the_json_of_the_changed_copy(sequence, correlationid, changes):
    ev = make_event(sequence=sequence, correlationid=correlationid)
    assert ev.to_json(changes) == ev.model_copy(update=changes).to_json()


def test_an_event_draft_has_the_cloud_event_attributes_and_defaults():
    assert {f.name for f in fields(EventDraft)} == set(CloudEvent.model_fields)
    draft = EventDraft("/t", "tests.x.y.v1", "t", datetime(2026, 3, 1, tzinfo=UTC))
    model = CloudEvent(source="/t", type="tests.x.y.v1", tenant="t", time=draft.time, id=draft.id)
    assert {name: getattr(draft, name) for name in CloudEvent.model_fields} == dict(model)


@settings(max_examples=200, deadline=None)
@given(time=st.datetimes(timezones=st.none() | OFFSETS), subject=st.none() | st.text(max_size=12),
       sequence=st.none() | st.integers(min_value=0, max_value=2**62),
       correlationid=st.none() | st.text(max_size=8),
       data=st.dictionaries(st.text(max_size=8), JSON_VALUES | EXTRA, max_size=4),
       changes=st.fixed_dictionaries({}, optional={
           "sequence": st.integers(min_value=0, max_value=2**40),
           "correlationid": st.text(max_size=8)}))
def test_an_event_draft_is_written_as_its_cloud_event(time, subject, sequence, correlationid, data,
                                                      changes):
    """Ingest stages drafts, not models: the outbox rows must carry the very JSON the model
    writes, with or without the sequence and correlation id the outbox adds."""
    draft = EventDraft("/ccm/ingest/connection/t", "tests.x.y.v1", "practice", time, subject, data,
                       correlationid, sequence)
    model = CloudEvent(**{name: getattr(draft, name) for name in CloudEvent.model_fields})
    assert draft.to_json(changes) == model.to_json(changes)
    assert (draft.kafka_key(), draft.patient) == (model.kafka_key(), model.patient)
