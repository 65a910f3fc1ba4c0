"""A practice's ingest settings as the writes and the expiry notices use them."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import structlog

from ccm_ingest.adapters.repository import SqlResourceRepository
from ccm_ingest.domain.config import DEFAULT_CONFIG, IngestConfig
from ccm_shared.db import UnitOfWork

log = structlog.get_logger(__name__)


async def practice_settings(uow: UnitOfWork,
                            practice: str) -> tuple[ZoneInfo, IngestConfig, int] | None:
    """(time zone, ingest config, its revision) of ``practice``, None when there is no such
    practice. A stored override that cannot be used now is left out (its default applies) with
    a warning, and the practice's other overrides still apply: ingest never fails over them."""
    found = await SqlResourceRepository(uow.session, practice).practice()
    if found is None:
        return None
    zone, overrides, revision = found
    return ZoneInfo(zone), effective_config(practice, overrides), revision


def effective_config(practice: str, overrides: dict) -> IngestConfig:
    """The config a practice's stored ``overrides`` make (``IngestConfig.stored``), with a
    warning for the keys left out."""
    config, problems = DEFAULT_CONFIG.stored(overrides)
    if problems:
        log.warning("stored ingest config: keys left out, their defaults used",
                    practice=practice, error="; ".join(problems)[:200])
    return config
