"""Compact JSON text of documents on the write and response paths, with orjson (several times
faster than the standard library, which was a fifth of a Bundle's storing time in ingest and a
quarter of billing's decider).

Only for text that is parsed again (stored versions, decisions, FHIR resources, response bodies),
never for content hashes: orjson's output is not byte-identical to ``json.dumps`` (exponent
format of large floats, key order of some non-BMP keys), and a stored hash must stay the same
across releases. Values orjson
cannot write (integers beyond 64 bits, which ``json.loads`` accepts) fall back to the standard
library, so any parsed JSON can be written.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def compact(value: Any) -> str:
    """``value`` as JSON without whitespace, non-ASCII characters kept as they are."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
