import json
from datetime import UTC
from pathlib import Path

import jsonschema
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ccm_shared.events import CloudEvent, envelope_headers, to_message
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
