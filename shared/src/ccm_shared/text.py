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


def http_url_problem(url: str, schemes: tuple[str, ...] = ("https", "http")) -> str | None:
    """Why ``url`` is no URL this platform may call (a webhook, an EHR's FHIR base), or None:
    an absolute URL of one of ``schemes`` with a host and a port of 1 to 65535, without
    credentials, spaces or control characters (``urlsplit`` drops tabs and newlines silently,
    keeps a NUL, and raises on an unclosed IPv6 bracket or a port that is no port)."""
    from urllib.parse import urlsplit

    if any(c.isspace() or not c.isprintable() for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        hostname, port = parts.hostname, parts.port  # .port: ValueError outside 0..65535
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme not in schemes or not hostname:
        return f"must be an absolute {' or '.join(schemes)} URL"
    if port == 0:
        return "port must be between 1 and 65535"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    return None
