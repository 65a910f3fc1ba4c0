"""The provider directory's merge rules (pure).

Conflict rule: a manual edit *pins* the field. Later EHR (FHIR) updates of a pinned field are
kept as the source value and recorded in the history as "held", but never applied; the manual
value stays until someone releases the pin, which restores the EHR's latest value. Fields that
were never edited by hand follow the EHR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHANNELS = ("email", "webhook", "fhir")
# Every field a person may edit; the EHR supplies only SOURCE_FIELDS.
EDITABLE_FIELDS = (
    "name",
    "npi",
    "email",
    "phone",
    "organization",
    "active",
    "webhook_url",
    "fhir_endpoint",
    "preferred_channel",
    "supervisor",
    "on_call",
)
SOURCE_FIELDS = ("name", "npi", "email", "phone", "organization", "active")
CHANNEL_ADDRESS = {"email": "email", "webhook": "webhook_url", "fhir": "fhir_endpoint"}


class UnknownField(Exception):
    """A field name that the directory does not have."""


@dataclass(frozen=True)
class Merge:
    """The outcome of applying one update to a provider record."""

    current: dict[str, Any]
    source: dict[str, Any]
    pinned: tuple[str, ...]
    changes: dict[str, list[Any]] = field(default_factory=dict)  # field -> [before, after]
    held: dict[str, Any] = field(default_factory=dict)  # EHR values not applied (pinned)

    @property
    def changed(self) -> bool:
        return bool(self.changes) or bool(self.held)


def empty_record() -> dict[str, Any]:
    return {name: None for name in EDITABLE_FIELDS} | {"active": True}


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: [before.get(k), after.get(k)] for k in after if before.get(k) != after.get(k)}


def apply_source(
    current: dict[str, Any],
    source: dict[str, Any],
    pinned: tuple[str, ...],
    incoming: dict[str, Any],
) -> Merge:
    """Apply the EHR's latest values: unpinned fields follow, pinned ones are held."""
    new_source = source | {k: v for k, v in incoming.items() if k in SOURCE_FIELDS}
    new_current = dict(current)
    held = {}
    for name in SOURCE_FIELDS:
        if name not in incoming:
            continue
        if name in pinned:
            if incoming[name] != current.get(name):
                held[name] = incoming[name]
        else:
            new_current[name] = incoming[name]
    return Merge(new_current, new_source, pinned, _diff(current, new_current), held)


def apply_manual(
    current: dict[str, Any],
    source: dict[str, Any],
    pinned: tuple[str, ...],
    updates: dict[str, Any],
    release: tuple[str, ...] = (),
) -> Merge:
    """Apply a person's edit (pinning each edited EHR field) and release the named pins."""
    unknown = [n for n in (*updates, *release) if n not in EDITABLE_FIELDS]
    if unknown:
        raise UnknownField(", ".join(sorted(unknown)))
    new_current = dict(current) | updates
    new_pinned = set(pinned) | {n for n in updates if n in SOURCE_FIELDS}
    for name in release:
        new_pinned.discard(name)
        if name in SOURCE_FIELDS and name in source:
            new_current[name] = source[name]
    return Merge(new_current, dict(source), tuple(sorted(new_pinned)), _diff(current, new_current))


def choose_channel(record: dict[str, Any]) -> tuple[str, str] | None:
    """The preferred channel when it has an address, else the first channel that has one."""
    preferred = record.get("preferred_channel")
    order = ([preferred] if preferred in CHANNELS else []) + [c for c in CHANNELS if c != preferred]
    for channel in order:
        address = record.get(CHANNEL_ADDRESS[channel])
        if address:
            return channel, address
    return None


def display_name(record: dict[str, Any], provider_id: str) -> str:
    return record.get("name") or f"Practitioner/{provider_id}"


def human_name(name: dict[str, Any] | None) -> str | None:
    """FHIR HumanName → 'Dr. Ada Lovelace'."""
    if not name:
        return None
    if name.get("text"):
        return name["text"]
    parts = [*name.get("prefix", []), *name.get("given", []), name.get("family") or ""]
    joined = " ".join(p for p in parts if p).strip()
    return joined or None


def first_telecom(telecom: list[dict[str, Any]], system: str) -> str | None:
    """The first contact point of a system, work use first."""
    matching = [t for t in telecom if t.get("system") == system and t.get("value")]
    matching.sort(key=lambda t: 0 if t.get("use") == "work" else 1)
    return matching[0]["value"] if matching else None


def reference_id(reference: str | None, resource_type: str) -> str | None:
    """``Practitioner/12`` → ``12`` when the type matches."""
    if reference and reference.startswith(resource_type + "/"):
        return reference.split("/", 1)[1]
    return None
