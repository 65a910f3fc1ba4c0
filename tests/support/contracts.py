"""Validate events against contracts/events (envelope + the type's own data schema)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

from ccm_shared.events import CloudEvent

EVENTS = Path(__file__).resolve().parents[2] / "contracts" / "events"
BASE = "https://ccm-platform.org/contracts/events/"
TEST_TYPES = ("tests.", "bench.")


@lru_cache(maxsize=1)
def registry() -> Registry:
    resources = []
    for path in EVENTS.glob("*.schema.json"):
        doc = json.loads(path.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


def schema_for(event_type: str) -> dict | None:
    path = EVENTS / f"{event_type}.schema.json"
    return json.loads(path.read_text()) if path.exists() else None


def validate_envelope(doc: dict) -> None:
    envelope = json.loads((EVENTS / "envelope.schema.json").read_text())
    jsonschema.Draft202012Validator(
        envelope, registry=registry(), format_checker=jsonschema.FormatChecker()
    ).validate(doc)


def assert_valid_event(event: CloudEvent | dict) -> None:
    """Raise jsonschema.ValidationError (or AssertionError) when the event breaks its contract."""
    doc = json.loads(event.to_json()) if isinstance(event, CloudEvent) else event
    validate_envelope(doc)
    if doc["type"].startswith(TEST_TYPES):
        return
    schema = schema_for(doc["type"])
    assert schema is not None, f"no schema contracts/events/{doc['type']}.schema.json"
    jsonschema.Draft202012Validator(
        schema, registry=registry(), format_checker=jsonschema.FormatChecker()
    ).validate(doc["data"])
