"""What the scope tests of every service ask of an app: which dependencies a route resolves,
which operations answer without a token, and every row of a service's tables."""

from __future__ import annotations

import re

from sqlalchemy import MetaData, select


def calls(dependant) -> set:  # noqa: ANN001
    """Every dependency a route resolves, however deep."""
    found = set()
    for sub in dependant.dependencies:
        found.add(sub.call)
        found |= calls(sub)
    return found


async def open_routes(client) -> set[tuple[str, str]]:  # noqa: ANN001
    """Every operation of the app's OpenAPI document that answers without a token (not 401)."""
    doc = (await client.get("/openapi.json")).json()
    found = set()
    for path, item in doc["paths"].items():
        for method in item:
            r = await client.request(method.upper(), re.sub(r"\{[^}]+\}", "x", path))
            if r.status_code != 401:
                found.add((method.upper(), path))
    return found


async def snapshot(runtime, metadata: MetaData) -> dict[str, list]:  # noqa: ANN001
    """Every row of every table of ``metadata`` (the service's, outbox included)."""
    async with runtime.db.unit_of_work() as uow:
        return {name: sorted(map(repr, (await uow.session.execute(select(table))).all()))
                for name, table in metadata.tables.items()}
