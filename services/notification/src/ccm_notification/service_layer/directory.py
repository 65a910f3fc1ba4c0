"""Provider directory: EHR (FHIR) events and manual edits, merged with history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from ccm_notification.adapters.orm import organizations, provider_history, provider_roles, providers
from ccm_notification.adapters.sql import insert_for, upsert
from ccm_notification.domain.directory import (
    Merge,
    apply_manual,
    apply_source,
    empty_record,
    first_telecom,
    human_name,
    reference_id,
)
from ccm_shared.db import UnitOfWork
from ccm_shared.errors import NotFound, PreconditionFailed, TryAgain
from ccm_shared.events import CloudEvent


async def load_provider(uow: UnitOfWork, practice: str, provider_id: str, *,  # noqa: ANN201
                        lock: bool = False):
    """The provider's row (None when there is none); ``lock`` reads it FOR UPDATE (PostgreSQL),
    so that a concurrent writer waits for this transaction and then reads what it wrote."""
    stmt = select(providers).where(providers.c.practice == practice, providers.c.id == provider_id)
    return (await uow.session.execute(stmt.with_for_update() if lock else stmt)).first()


class _Raced(TryAgain):
    """The row changed between the read and the write (a concurrent writer created it, or
    moved its version on): nothing was written; read it again (and should that keep
    happening, the request is answered 503, to be sent again)."""

    def __init__(self) -> None:
        super().__init__("the provider changed while this request wrote it; nothing was "
                         "stored: send it again")


# A writer that lost a race reads the row again and retries; one retry suffices with the row
# locked (PostgreSQL); the bound only guards against a loop.
_ATTEMPTS = 3


async def _save(
    uow: UnitOfWork,
    practice: str,
    provider_id: str,
    row,
    merge: Merge,
    *,  # noqa: ANN001
    origin: str,
    actor: str | None,
    now: datetime,
    source_version: str | None = None,
) -> int:
    """Write the merge and its history entry; return the new version (unchanged when no-op).

    The write is conditional on what was read: a new row is inserted only if none is there
    (ON CONFLICT DO NOTHING), an existing one updated only at the version read. When the write
    finds the row changed, nothing is written and ``_Raced`` is raised (read again)."""
    if row is not None and not merge.changed and tuple(row.pinned) == merge.pinned:
        if merge.source != row.source:
            done = await uow.session.execute(
                update(providers)
                .where(providers.c.practice == practice, providers.c.id == provider_id,
                       providers.c.version == row.version)
                .values(source=merge.source, source_version=source_version or row.source_version)
            )
            if done.rowcount != 1:
                raise _Raced
        return row.version
    version = 1 if row is None else row.version + 1
    values = dict(
        current=merge.current,
        source=merge.source,
        pinned=list(merge.pinned),
        version=version,
        updated_at=now,
    )
    if source_version is not None:
        values["source_version"] = source_version
    if row is None:
        done = await uow.session.execute(
            insert_for(uow.session, providers)
            .values(practice=practice, id=provider_id, created_at=now, **values)
            .on_conflict_do_nothing(index_elements=["practice", "id"])
        )
    else:
        done = await uow.session.execute(
            update(providers)
            .where(providers.c.practice == practice, providers.c.id == provider_id,
                   providers.c.version == row.version)
            .values(**values)
        )
    if done.rowcount != 1:
        raise _Raced
    await uow.session.execute(
        provider_history.insert().values(
            practice=practice,
            provider_id=provider_id,
            version=version,
            origin=origin,
            actor=actor,
            changes=merge.changes,
            held=merge.held,
            at=now,
        )
    )
    return version


def _is_older(row, last_updated: str | None) -> bool:  # noqa: ANN001
    """Events can arrive out of order; an older EHR version never replaces a newer one."""
    if row is None or not row.source_version or not last_updated:
        return False
    return datetime.fromisoformat(last_updated) < datetime.fromisoformat(row.source_version)


async def apply_ehr_values(
    uow: UnitOfWork,
    practice: str,
    provider_id: str,
    incoming: dict[str, Any],
    *,
    now: datetime,
    last_updated: str | None = None,
    fallback_email: str | None = None,
) -> None:
    """The EHR's values for a provider, merged under the row's lock. ``fallback_email`` (a
    role's) is taken only when the EHR gives the provider no email of its own, as the locked row
    says: a Practitioner event with one, committed meanwhile, is not overwritten."""
    for attempt in range(_ATTEMPTS):
        row = await load_provider(uow, practice, provider_id, lock=True)
        if _is_older(row, last_updated):
            return
        current = row.current if row else empty_record()
        source = row.source if row else {}
        pinned = tuple(row.pinned) if row else ()
        values = incoming
        if fallback_email and not source.get("email"):
            values = {**incoming, "email": fallback_email}
        merge = apply_source(current, source, pinned, values)
        try:
            await _save(
                uow,
                practice,
                provider_id,
                row,
                merge,
                origin="fhir",
                actor=None,
                now=now,
                source_version=last_updated,
            )
            return
        except _Raced:
            if attempt == _ATTEMPTS - 1:
                raise


async def practitioner_upserted(event: CloudEvent, uow: UnitOfWork, now: datetime) -> None:
    data = event.data
    provider_id = reference_id(data["practitioner"], "Practitioner")
    if provider_id is None:
        return
    incoming = {
        "name": human_name(data.get("name")),
        "npi": data.get("npi"),
        "email": first_telecom(data.get("telecom", []), "email"),
        "phone": first_telecom(data.get("telecom", []), "phone"),
        "active": bool(data["active"]) and not data["deleted"],
    }
    if incoming["email"] is None:
        # keep an email the practitioner's role supplied rather than erasing it
        role_email = await _role_email(uow, event.tenant, provider_id)
        incoming["email"] = role_email
    await apply_ehr_values(
        uow,
        event.tenant,
        provider_id,
        incoming,
        now=now,
        last_updated=data["source"]["lastUpdated"],
    )


async def _role_email(uow: UnitOfWork, practice: str, provider_id: str) -> str | None:
    stmt = (
        select(provider_roles.c.email)
        .where(
            provider_roles.c.practice == practice,
            provider_roles.c.practitioner == provider_id,
            provider_roles.c.active.is_(True),
            provider_roles.c.email.is_not(None),
        )
        .limit(1)
    )
    return (await uow.session.execute(stmt)).scalar()


async def practitioner_role_upserted(event: CloudEvent, uow: UnitOfWork, now: datetime) -> None:
    data = event.data
    role_id = reference_id(data["practitionerRole"], "PractitionerRole")
    practitioner = reference_id(data.get("practitioner"), "Practitioner")
    organization = reference_id(data.get("organization"), "Organization")
    email = first_telecom(data.get("telecom", []), "email")
    active = bool(data["active"]) and not data["deleted"]
    await upsert(uow.session, provider_roles, {"practice": event.tenant, "id": role_id}, {
        "practitioner": practitioner, "organization": organization, "email": email,
        "active": active, "updated_at": now})
    if practitioner is None or not active:
        return
    await apply_ehr_values(uow, event.tenant, practitioner, {"organization": organization},
                           now=now, fallback_email=email)


async def organization_upserted(event: CloudEvent, uow: UnitOfWork, now: datetime) -> None:
    data = event.data
    org_id = reference_id(data["organization"], "Organization")
    values = dict(
        name=data.get("name"),
        email=first_telecom(data.get("telecom", []), "email"),
        active=bool(data["active"]) and not data["deleted"],
        updated_at=now,
    )
    await upsert(uow.session, organizations, {"practice": event.tenant, "id": org_id}, values)


async def edit_provider(
    uow: UnitOfWork,
    practice: str,
    provider_id: str,
    updates: dict[str, Any],
    release: tuple[str, ...],
    *,
    actor: str,
    now: datetime,
    if_match: int | None,
) -> tuple[int, bool]:
    """A person's edit; returns (version, created). ``if_match`` guards against lost updates:
    the row is read FOR UPDATE and written only at the version read, so of concurrent edits
    with the same ``if_match`` one is applied and the others answer 412. Concurrent edits
    creating the same provider: one creates it, the others update the row it created."""
    for attempt in range(_ATTEMPTS):
        row = await load_provider(uow, practice, provider_id, lock=True)
        if if_match is not None and (row is None or row.version != if_match):
            raise PreconditionFailed(
                f"provider {provider_id} is at version {row.version if row else 'none'}, "
                f"not {if_match}; reload and retry"
            )
        if row is None and release:
            raise NotFound(f"provider {provider_id!r} not found")
        current = row.current if row else empty_record()
        merge = apply_manual(
            current, row.source if row else {}, tuple(row.pinned) if row else (), updates, release
        )
        try:
            version = await _save(
                uow, practice, provider_id, row, merge, origin="manual", actor=actor, now=now
            )
        except _Raced:
            if if_match is not None:
                raise _stale(provider_id, if_match) from None
            if attempt == _ATTEMPTS - 1:
                raise
            continue
        return version, row is None
    raise AssertionError("unreachable")  # pragma: no cover


def _stale(provider_id: str, if_match: int) -> PreconditionFailed:
    return PreconditionFailed(
        f"provider {provider_id} is no longer at version {if_match}; reload and retry"
    )


async def provider_history_of(uow: UnitOfWork, practice: str, provider_id: str) -> list[dict]:
    stmt = (
        select(provider_history)
        .where(
            provider_history.c.practice == practice, provider_history.c.provider_id == provider_id
        )
        .order_by(provider_history.c.id)
    )
    return [
        {
            "version": r.version,
            "origin": r.origin,
            "actor": r.actor,
            "changes": r.changes,
            "held": r.held,
            "at": r.at.isoformat(),
        }
        for r in (await uow.session.execute(stmt)).all()
    ]
