"""A practice's ingest settings as the writes and the expiry notices use them."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import structlog

from ccm_ingest.adapters.repository import SqlResourceRepository
from ccm_ingest.domain.config import DEFAULT_CONFIG, ConfigInvalid, IngestConfig
from ccm_shared.db import UnitOfWork

log = structlog.get_logger(__name__)


async def practice_settings(uow: UnitOfWork,
                            practice: str) -> tuple[ZoneInfo, IngestConfig] | None:
    """(time zone, ingest config) of ``practice``, None when there is no such practice. Stored
    overrides that cannot be used now fall back to the defaults, with a warning: ingest never
    fails over them."""
    found = await SqlResourceRepository(uow.session, practice).practice()
    if found is None:
        return None
    zone, overrides = found
    try:
        config = DEFAULT_CONFIG.merged(overrides, strict=False)
    except ConfigInvalid as exc:
        log.warning("stored ingest config refused; using the defaults", practice=practice,
                    error=str(exc)[:200])
        config = DEFAULT_CONFIG
    return ZoneInfo(zone), config
