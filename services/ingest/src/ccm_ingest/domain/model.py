"""The ingest domain's value objects: issues, stored versions, mapped events."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SUPPORTED_TYPES = (
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Condition",
    "CarePlan",
    "Consent",
    "Encounter",
)
RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome issue: severity, FHIR issue type, message and the element concerned."""

    severity: str  # fatal | error | warning | information
    code: str  # FHIR IssueType: invalid, structure, required, value, invariant, not-supported…
    diagnostics: str
    expression: tuple[str, ...] = ()

    def located(self, prefix: str) -> Issue:
        """The same issue under a containing element (a Bundle entry)."""
        return Issue(
            self.severity,
            self.code,
            self.diagnostics,
            tuple(f"{prefix}.{e}" for e in self.expression) or (prefix,),
        )


class FhirRejected(Exception):
    """A request the FHIR endpoint refuses: status plus the issues that say why."""

    def __init__(self, status: int, issues: list[Issue]) -> None:
        super().__init__("; ".join(i.diagnostics for i in issues))
        self.status = status
        self.issues = issues


def rejected(status: int, code: str, message: str, *expression: str) -> FhirRejected:
    return FhirRejected(status, [Issue("error", code, message, tuple(expression))])


@dataclass(frozen=True)
class SourceVersion:
    """The stored version an event was mapped from (contracts: SourceVersion)."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    sha256: str
    received_at: datetime
    connection: str | None

    def to_event(self) -> dict[str, Any]:
        return {
            "resourceType": self.resource_type,
            "id": self.id,
            "versionId": str(self.version_id),
            "lastUpdated": self.last_updated.isoformat(),
            "sha256": self.sha256,
            "receivedAt": self.received_at.isoformat(),
            "connection": self.connection,
        }


@dataclass(frozen=True)
class MappedEvent:
    """An event the mapping decided on: its type, subject (``Patient/{id}`` or the resource)."""

    type: str
    subject: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Mapping:
    """What one accepted version means for CCM: events, the resource's new CCM state, warnings."""

    events: list[MappedEvent] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# Server-managed meta elements are not content: pushing the same resource again with a newer
# lastUpdated is still the same content.
_VOLATILE_META = ("versionId", "lastUpdated")


def canonical_json(resource: dict[str, Any]) -> str:
    """Sorted keys, no whitespace, without id and server-managed meta."""
    body = {k: v for k, v in resource.items() if k != "id"}
    meta = body.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in _VOLATILE_META}
        if meta:
            body["meta"] = meta
        else:
            body.pop("meta")
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(resource: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(resource).encode()).hexdigest()
