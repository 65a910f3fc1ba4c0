import json
from pathlib import Path

import jsonschema
import pytest

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
