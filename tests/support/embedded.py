"""A service's runtime on the embedded database, as the unit tests' fixtures need it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ccm_shared.migrate import upgrade_async, upgrade_platform
from ccm_shared.service import ServiceDefinition, ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.transport import InProcessTransport


async def embedded_runtime(tmp_path: Path, service: str | ServiceDefinition, *,
                           clock: Callable[[], datetime] | None = None,
                           **settings: Any) -> ServiceRuntime:  # noqa: ANN401
    """``service`` (its name or definition) on a SQLite file in ``tmp_path`` migrated with the
    platform's tables and its own, its settings from the environment with ``settings`` over
    them, on the in-process bus."""
    url = f"sqlite+aiosqlite:///{tmp_path}/platform.db"
    await asyncio.to_thread(upgrade_platform, url)
    definition = discover_services()[service] if isinstance(service, str) else service
    await upgrade_async(url, definition.schema, definition.migrations_package)
    return ServiceRuntime.build(definition, load_settings(database_url=url, **settings),
                                transport=InProcessTransport(), clock=clock)
