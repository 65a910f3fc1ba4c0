"""The ingest domain's value objects: issues, stored versions, mapped events."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson

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
        """The same issue under a containing element (a Bundle entry). Under an entry's
        ``resource`` a path's leading type goes (FHIRPath: ``Bundle.entry[3].resource.status``,
        not ``….resource.Encounter.status``)."""
        under_resource = prefix.endswith(".resource")
        return Issue(
            self.severity,
            self.code,
            self.diagnostics,
            tuple(f"{prefix}.{_untyped(e) if under_resource else e}"
                  for e in self.expression) or (prefix,),
        )


def _untyped(path: str) -> str:
    """``path`` without its leading resource type (``Encounter.status`` → ``status``)."""
    head, dot, rest = path.partition(".")
    return rest if dot and head[:1].isupper() and head.isalpha() else path


class FhirRejected(Exception):
    """A request the FHIR endpoint refuses: status plus the issues that say why."""

    def __init__(self, status: int, issues: list[Issue]) -> None:
        super().__init__("; ".join(i.diagnostics for i in issues))
        self.status = status
        self.issues = issues


class Relocating:
    """A context that re-raises a FhirRejected raised inside with its issues placed under a
    containing element (``relocate``; None: raised as it is), e.g. a Bundle entry. A class,
    not a generator context manager: writes enter one two or three times per stored resource."""

    __slots__ = ()

    def relocate(self, issues: list[Issue]) -> list[Issue] | None:
        raise NotImplementedError

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, FhirRejected) and (moved := self.relocate(exc.issues)) is not None:
            raise FhirRejected(exc.status, moved) from None
        return False


def rejected(status: int, code: str, message: str, *expression: str) -> FhirRejected:
    return FhirRejected(status, [Issue("error", code, message, tuple(expression))])


def isoformat(value: datetime) -> str:
    """``value.isoformat()``, remembered: the versions stored together share their received
    time (and mostly their lastUpdated), and isoformat costs ~1.4 µs. Equal aware datetimes
    can differ in zone or fold, so those are part of the key."""
    return _isoformat_of(value, value.tzinfo, value.fold)


@lru_cache(maxsize=64)
def _isoformat_of(value: datetime, _zone: object, _fold: int) -> str:
    return value.isoformat()


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
    # Set when the version's mapping is stated again because the practice's ingest config
    # changed (the config's revision): consumers order the events of one version by it.
    mapping_revision: int | None = None

    def to_event(self) -> dict[str, Any]:
        source = {
            "resourceType": self.resource_type,
            "id": self.id,
            "versionId": str(self.version_id),
            "lastUpdated": isoformat(self.last_updated),
            "sha256": self.sha256,
            "receivedAt": isoformat(self.received_at),
            "connection": self.connection,
        }
        if self.mapping_revision is not None:
            source["mappingRevision"] = self.mapping_revision
        return source


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
    warnings: list[Issue] = field(default_factory=list)  # the write answers with them


# Server-managed meta elements are not content: pushing the same resource again with a newer
# lastUpdated is still the same content.
_VOLATILE_META = ("versionId", "lastUpdated")


def _orjson_may_differ(text: bytes) -> bool:
    """Whether orjson may have written ``text`` otherwise than json.dumps (the canonical form
    since the first release): floats under 1e-4 (``0.00001`` for ``1e-05``, ``1e-9`` for
    ``1e-09``), and NaN or Infinity, which it writes as null. Plain substring searches (a
    regular expression cost more than writing the text); a match inside a string only costs
    the slower writer."""
    if b"null" in text or b"0.0000" in text:
        return True
    at = text.find(b"e-")
    while at != -1:  # ``<digit>e-<digit>`` ending a number: a one-digit negative exponent
        if text[at - 1:at].isdigit() and text[at + 2:at + 3].isdigit() \
                and text[at + 3:at + 4] in (b",", b"]", b"}"):
            return True
        at = text.find(b"e-", at + 2)
    return False


def canonical_json(resource: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8, without id and server-managed meta: the text of
    ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``, byte for byte
    (stored hashes stay valid), written by orjson (~4x faster) wherever its text is the same."""
    body = {k: v for k, v in resource.items() if k != "id"}
    meta = body.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in _VOLATILE_META}
        if meta:
            body["meta"] = meta
        else:
            body.pop("meta")
    try:
        text = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers over 64 bits, lone surrogates: as json.dumps has them
        text = None
    if text is None or _orjson_may_differ(text):
        return json.dumps(body, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    return text


def content_hash(resource: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(resource)).hexdigest()
