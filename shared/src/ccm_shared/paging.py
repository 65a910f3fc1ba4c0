"""Links of a FHIR search page (``searchset`` Bundle), for every service that answers searches
with ``_offset`` and ``_count``."""

from __future__ import annotations

from collections.abc import Callable


def page_links(page: Callable[[int, int], str], *, offset: int, count: int, total: int,
               max_offset: int) -> list[dict[str, str]]:
    """``first``, ``previous`` and ``next`` of the page of ``count`` entries from ``offset``, of
    ``total`` (``page(start, length)``: the URL of the page of ``length`` entries from
    ``start``), where there are such pages. ``previous`` names exactly the entries before this
    page (from ``_offset=2&_count=3``: the first two, not 0..2 again), and from past the end
    the last page there is; ``next`` only while entries follow within ``max_offset`` (a link
    beyond it would be refused)."""
    links = []
    if offset > 0 and count:
        links.append({"relation": "first", "url": page(0, count)})
        if offset < total:
            start = max(0, offset - count)
            links.append({"relation": "previous", "url": page(start, offset - start)})
        elif total:
            links.append({"relation": "previous", "url": page(max(0, total - count), count)})
    if count and offset + count < total and offset + count <= max_offset:
        links.append({"relation": "next", "url": page(offset + count, count)})
    return links
