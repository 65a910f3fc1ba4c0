"""Consent expiry notices (fhir-mapping.md, Consent: "valid period → an 'expiring' event ahead
of time, configurable lead"): ``ingest.consent.expiring.v1`` once per granted CCM consent,
``provision.period`` end day and patient, when the practice's day is within
``consent_expiring_lead_days`` of that end day. The mapping keeps the end day in the consent's
CCM state (``expiresOn``); a pass finds the consents due, records each notice and stages its
event in one transaction per batch, so a notice goes out once whatever the number of passes or
replicas."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog

from ccm_ingest.adapters.repository import (
    ExpiringConsent,
    SqlResourceRepository,
    practices_with_consents_ending,
)
from ccm_ingest.domain.model import SourceVersion
from ccm_ingest.service_layer.practice import practice_settings
from ccm_shared.db import Database
from ccm_shared.events import CloudEvent

log = structlog.get_logger(__name__)

EXPIRING = "ingest.consent.expiring.v1"
SOURCE = "/ccm/ingest/consent-expiry"


@dataclass
class ExpiryPass:
    """What one pass did: practices looked at, notices sent, practices whose pass failed."""

    practices: int = 0
    sent: int = 0
    failed: list[str] = field(default_factory=list)


def expiring_event(practice: str, consent: ExpiringConsent, today: date, lead_days: int,
                   now: datetime) -> CloudEvent:
    source = SourceVersion("Consent", consent.id, consent.version_id, consent.last_updated,
                           consent.sha256, consent.received_at, consent.connection)
    patient = f"Patient/{consent.patient}"
    data: dict[str, Any] = {
        "source": source.to_event(), "consent": f"Consent/{consent.id}", "patient": patient,
        "expiresOn": consent.expires_on,
        "daysLeft": (date.fromisoformat(consent.expires_on) - today).days,
        "leadDays": lead_days}
    return CloudEvent(source=SOURCE, type=EXPIRING, tenant=practice, time=now, subject=patient,
                      data=data)


async def expiry_pass(db: Database, now: datetime, *, batch_size: int = 500,
                      practices: list[str] | None = None) -> ExpiryPass:
    """Send every notice due at ``now`` (injectable: tests travel in time), for every practice
    that holds a CCM consent not yet ended (a practice's day is at most a day behind UTC's), or
    only the given ones. One practice's failure is logged and does not stop the others."""
    result = ExpiryPass()
    if practices is None:
        since = (now.astimezone(UTC).date() - timedelta(days=1)).isoformat()
        async with db.unit_of_work() as uow:
            practices = await practices_with_consents_ending(uow.session, since)
    for practice in practices:
        result.practices += 1
        try:
            result.sent += await _practice_pass(db, practice, now, batch_size)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the other practices go on
            result.failed.append(practice)
            log.warning("consent expiry pass failed for a practice; the others go on",
                        practice=practice, error=type(exc).__name__)
    if result.sent or result.failed:
        log.info("consent expiry pass", practices=result.practices, sent=result.sent,
                 failed_practices=len(result.failed))
    return result


async def _practice_pass(db: Database, practice: str, now: datetime, batch_size: int) -> int:
    sent = 0
    while True:
        async with db.unit_of_work() as uow:
            # As a write: a change of the practice's config (which may void consents, and so
            # their expiry) waits for this pass, or this pass for it.
            await SqlResourceRepository(uow.session, practice).hold_config()
            settings = await practice_settings(uow, practice)
            if settings is None:
                return sent
            tz, config, _ = settings
            lead = config.consent_expiring_lead_days
            if lead <= 0:
                return sent
            today = now.astimezone(tz).date()
            repo = SqlResourceRepository(uow.session, practice)
            due = await repo.expiring_consents(today.isoformat(),
                                               (today + timedelta(days=lead)).isoformat(),
                                               batch_size)
            if not due:
                return sent
            events = [expiring_event(practice, c, today, lead, now)
                      for c in await repo.record_expiry_notices(due, now)]
            await uow.outbox.add_many([(EXPIRING, e) for e in events])
            await uow.commit()
        sent += len(events)
        if len(due) < batch_size:
            return sent
