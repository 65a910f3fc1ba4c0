"""Each consumed event's ``data`` checked against its contract (``contracts/events``) before a
handler applies it: an event that breaks its contract (negative seconds, a status no contract
knows, a field none has) is a poison message, dead-lettered and never applied. Producers are
held to the same contracts by the tests; this is the consumers' own guard, for a producer's
bug or a message published by hand.

The schemas are read from the library's own copy (``ccm_shared/contracts/events``, put into
the wheel at build time) or, in a checkout, from the repository's ``contracts/events``. A type
without a schema (tests' own events) is not checked.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

_PACKAGED = Path(__file__).resolve().parent / "contracts" / "events"
_CHECKOUT = Path(__file__).resolve().parents[3] / "contracts" / "events"
# A validation error's places and rules are reported, at most this many.
MAX_REPORTED = 5


def schemas_dir() -> Path:
    return _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT


@lru_cache(maxsize=1)
def _registry() -> Registry:
    found = []
    for path in schemas_dir().glob("*.schema.json"):
        doc = json.loads(path.read_text())
        found.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(found)


@lru_cache(maxsize=256)
def _validator(event_type: str) -> jsonschema.Draft202012Validator | None:
    path = schemas_dir() / f"{event_type}.schema.json"
    if not path.is_file():
        return None
    return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=_registry(),
                                           format_checker=jsonschema.FormatChecker())


def contract_violations(event_type: str, data: Any) -> str | None:
    """None when ``data`` keeps the contract of ``event_type`` (or it has none); else where and
    which rule it breaks, without the values (they may be PHI: this becomes a dead-letter
    header)."""
    validator = _validator(event_type)
    if validator is None:
        return None
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    return "; ".join(f"data.{'.'.join(map(str, e.absolute_path)) or '(root)'}: breaks "
                     f"'{e.validator}'" for e in errors[:MAX_REPORTED])
