"""A practice's ingest settings as the writes and the expiry notices use them."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import structlog

from ccm_ingest.adapters.repository import SqlResourceRepository
from ccm_ingest.domain.config import DEFAULT_CONFIG, IngestConfig
from ccm_shared.db import UnitOfWork

log = structlog.get_logger(__name__)


async def practice_settings(uow: UnitOfWork,
                            practice: str) -> tuple[ZoneInfo, IngestConfig] | None:
    """(time zone, ingest config) of ``practice``, None when there is no such practice. A
    stored override that cannot be used now is left out (its default applies) with a warning,
    and the practice's other overrides still apply: ingest never fails over them."""
    found = await SqlResourceRepository(uow.session, practice).practice()
    if found is None:
        return None
    zone, overrides = found
    config, problems = DEFAULT_CONFIG.stored(overrides)
    if problems:
        log.warning("stored ingest config: keys left out, their defaults used",
                    practice=practice, error="; ".join(problems)[:200])
    return ZoneInfo(zone), config
