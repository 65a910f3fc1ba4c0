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

_PACKAGED = Path(__file__).resolve().parent / "contracts" / "events"
_CHECKOUT = Path(__file__).resolve().parents[3] / "contracts" / "events"
# A validation error's places and rules are reported, at most this many.
MAX_REPORTED = 5


def schemas_dir() -> Path:
    return _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT


# Keywords that only describe: a $ref beside nothing else but these is replaced by its target.
_ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "$id",
                          "$schema"})


@lru_cache(maxsize=1)
def _documents() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text())
            for path in schemas_dir().glob("*.schema.json")}


def _inline(node: Any, doc: dict[str, Any], depth: int = 0) -> Any:
    """``node`` with every ``$ref`` (``common.schema.json#/$defs/X``, ``#/$defs/Y``) replaced by
    what it points at: validating then resolves nothing (through ``referencing``, each event's
    check took ~300 µs; inlined ~130 µs). A $ref beside other keywords keeps both (allOf), as
    2020-12 applies both."""
    if depth > 64:
        raise RecursionError("a recursive $ref")
    if isinstance(node, list):
        return [_inline(item, doc, depth + 1) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if not isinstance(ref, str):
        return {k: _inline(v, doc, depth + 1) for k, v in node.items() if k != "$defs"}
    name, _, pointer = ref.partition("#")
    target_doc = _documents()[name] if name else doc
    target: Any = target_doc
    for part in filter(None, pointer.split("/")):
        target = target[part]
    resolved = _inline(target, target_doc, depth + 1)
    rest = {k: _inline(v, doc, depth + 1) for k, v in node.items()
            if k != "$ref" and k not in _ANNOTATIONS}
    return {"allOf": [resolved, rest]} if rest else resolved


@lru_cache(maxsize=256)
def _validator(event_type: str) -> jsonschema.Draft202012Validator | None:
    doc = _documents().get(f"{event_type}.schema.json")
    if doc is None:
        return None
    return jsonschema.Draft202012Validator(_inline(doc, doc),
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
