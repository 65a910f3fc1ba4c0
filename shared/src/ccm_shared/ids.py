"""Random identifiers on hot paths."""

from __future__ import annotations

import os


def random_uuid() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` writes it, without building
    a UUID object: a third of the time. Every stored resource version takes one or two (its
    server id, its events' ids); elsewhere ``uuid.uuid4()`` is as good."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
