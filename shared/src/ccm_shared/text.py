"""Checks of text a request sent, shared by the services' edges and domain rules."""

from __future__ import annotations


def ascii_digits(text: str, most: int | None = None) -> bool:
    """``text`` is 1 to ``most`` ASCII digits (``str.isdigit`` alone also takes "²" or "٣",
    which ``int()`` then refuses or reads as another number)."""
    return text.isascii() and text.isdigit() and (most is None or len(text) <= most)


def is_text(value: str) -> bool:
    """Storable and answerable text: no NUL (PostgreSQL text cannot hold one) and no lone
    surrogate (no encoder writes one). A JSON body may escape either (``\\u0000``,
    ``\\ud800``)."""
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
