"""SQL access to the resource mirror, always scoped to one practice (tenant)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    cast,
    delete,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_ingest.adapters.bulk import insert_all
from ccm_ingest.adapters.orm import (
    conditional_creates,
    consent_expiry_notices,
    ingest_configs,
    outbox,
    resource_identifiers,
    resource_versions,
    resources,
)
from ccm_shared.db import dialect_insert, xact_lock
from ccm_shared.jsontext import compact
from ccm_shared.tables import practices


@dataclass(frozen=True)
class CurrentRow:
    """The ``resources`` row of one resource: its current version and CCM state."""

    type: str
    id: str
    version_id: int
    last_version: int
    last_updated: datetime
    sha256: str
    deleted: bool
    ccm_state: dict[str, Any]
    patient: str | None = None  # the Patient id the current version is about


@dataclass(frozen=True)
class VersionRow:
    type: str
    id: str
    version_id: int
    resource: dict[str, Any] | None
    sha256: str
    last_updated: datetime
    received_at: datetime
    deleted: bool
    applied: bool
    method: str | None = None  # POST, PUT or DELETE (None: stored before ingest_0004)
    # The Patient id the resource is about, where the version was read with its resource's
    # row (a search: the current versions); None otherwise, or when it is about none.
    patient: str | None = None


@dataclass(frozen=True)
class LiveResource:
    """A live resource's current row and the current version's content, when received and
    from which connection (what a mapping of it again needs)."""

    current: CurrentRow
    resource: dict[str, Any]
    received_at: datetime
    connection: str | None


@dataclass(frozen=True)
class ExpiringConsent:
    """A granted CCM consent whose provision.period ends on ``expires_on``, with its current
    version's source (for the event's ``source``)."""

    id: str
    patient: str  # the Patient id
    expires_on: str
    version_id: int
    last_updated: datetime
    sha256: str
    received_at: datetime
    connection: str | None


# A version row joined to its resource row only when it is the current version.
_IS_CURRENT = and_(resources.c.tenant == resource_versions.c.tenant,
                   resources.c.type == resource_versions.c.type,
                   resources.c.id == resource_versions.c.id,
                   resources.c.version_id == resource_versions.c.version_id)


_IDS_PER_STATEMENT = 5_000


def _insert(session: AsyncSession):  # noqa: ANN202
    return dialect_insert(session.bind.dialect.name)


class SqlResourceRepository:
    """The mirror of one practice: current rows, versions, identifiers, conditional keys."""

    def __init__(self, session: AsyncSession, tenant: str) -> None:
        self.session = session
        self.tenant = tenant

    def _key(self, table, rtype: str, rid: str):  # noqa: ANN001, ANN202
        return and_(table.c.tenant == self.tenant, table.c.type == rtype, table.c.id == rid)

    async def lock_current(self, rtype: str, rid: str) -> CurrentRow | None:
        """The current row, locked for this transaction (writers of one resource serialise)."""
        stmt = select(resources).where(self._key(resources, rtype, rid))
        if self.session.bind.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        row = (await self.session.execute(stmt)).first()
        return None if row is None else _current(row)

    # ---- many resources at once (a Bundle's writes; one statement per table) ---------------

    async def claim_rows(self, keys: list[tuple[str, str]], placeholder: datetime) -> None:
        """Reserve the rows of ``keys`` (type, id) that do not exist yet, in key order."""
        if not keys:
            return
        await self.session.execute(
            _insert(self.session)(resources).on_conflict_do_nothing(
                index_elements=["tenant", "type", "id"]),
            [{"tenant": self.tenant, "type": t, "id": i, "version_id": 0, "last_version": 0,
              "last_updated": placeholder, "sha256": "", "deleted": True, "ccm_state": "{}"}
             for t, i in sorted(keys)])

    async def lock_rows(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], CurrentRow]:
        """The current rows of ``keys``, locked in key order (writers of one resource
        serialise; concurrent Bundles lock in the same order)."""
        if not keys:
            return {}
        stmt = (select(resources)
                .where(resources.c.tenant == self.tenant,
                       tuple_(resources.c.type, resources.c.id).in_(sorted(set(keys))))
                .order_by(resources.c.type, resources.c.id))
        if self.session.bind.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return {(r.type, r.id): _current(r) for r in (await self.session.execute(stmt)).all()}

    async def versions_of(self, keys: list[tuple[str, str, int]],
                          ) -> dict[tuple[str, str, int], VersionRow]:
        """Stored versions by (type, id, versionId)."""
        if not keys:
            return {}
        rows = (await self.session.execute(select(resource_versions).where(
            resource_versions.c.tenant == self.tenant,
            tuple_(resource_versions.c.type, resource_versions.c.id,
                   resource_versions.c.version_id).in_(keys)))).all()
        return {(r.type, r.id, r.version_id): _version(r) for r in rows}

    async def same_content_versions(self, keys: list[tuple[str, str, str]],
                                    ) -> dict[tuple[str, str, str], int]:
        """(type, id, sha256) → the newest stored version of that resource with that content."""
        if not keys:
            return {}
        rv = resource_versions
        rows = (await self.session.execute(
            select(rv.c.type, rv.c.id, rv.c.sha256, func.max(rv.c.version_id))
            .where(rv.c.tenant == self.tenant, tuple_(rv.c.type, rv.c.id, rv.c.sha256).in_(keys))
            .group_by(rv.c.type, rv.c.id, rv.c.sha256))).all()
        return {(t, i, sha): version for t, i, sha, version in rows}

    async def insert_batch(self, versions: list[VersionRow], connection: str | None,
                           new_rows: list[dict[str, Any]],
                           identifiers: list[tuple[str, str, str, str]],
                           outbox_rows: list[dict[str, Any]]) -> None:
        """Versions, new ``resources`` rows (server-assigned UUIDs nobody can hold yet),
        identifiers (type, id, system, value) and outbox rows: one statement on PostgreSQL
        (``insert_all``: the versions' JSON and the CCM states are written as their text)."""
        await insert_all(self.session, [
            (resource_versions, [{
                "tenant": self.tenant, "type": v.type, "id": v.id, "version_id": v.version_id,
                "resource": v.resource,
                "sha256": v.sha256, "last_updated": v.last_updated,
                "received_at": v.received_at, "connection": connection,
                "deleted": v.resource is None, "applied": v.applied, "method": v.method,
            } for v in versions]),
            (resources, [{**r, "tenant": self.tenant} for r in new_rows]),
            (resource_identifiers, [
                {"tenant": self.tenant, "type": t, "id": i, "system": s, "value": v}
                for t, i, s, v in identifiers]),
            (outbox, outbox_rows),
        ])

    async def update_rows(self, rows: list[dict[str, Any]]) -> None:
        """Set the current version of existing rows; every dict has the same keys."""
        if not rows:
            return
        columns = [k for k in rows[0] if k not in ("type", "id")]
        stmt = update(resources).where(
            resources.c.tenant == bindparam("k_tenant"), resources.c.type == bindparam("k_type"),
            resources.c.id == bindparam("k_id"),
        ).values({c: bindparam(c) for c in columns})
        await self.session.execute(stmt, [{
            **{c: compact(r[c]) if c == "ccm_state" else r[c] for c in columns},
            "k_tenant": self.tenant, "k_type": r["type"], "k_id": r["id"]} for r in rows])

    async def drop_identifiers(self, keys: list[tuple[str, str]]) -> None:
        """Forget the identifiers of resources (type, id) whose current version changes."""
        if keys:
            await self.session.execute(delete(resource_identifiers).where(
                resource_identifiers.c.tenant == self.tenant,
                tuple_(resource_identifiers.c.type, resource_identifiers.c.id).in_(keys)))

    async def set_current(self, rtype: str, rid: str, **values: Any) -> None:
        if "ccm_state" in values:
            values["ccm_state"] = json.dumps(values["ccm_state"])
        await self.session.execute(
            update(resources).where(self._key(resources, rtype, rid)).values(**values)
        )

    async def version(self, rtype: str, rid: str, version_id: int) -> VersionRow | None:
        row = (await self.session.execute(
            select(resource_versions).where(self._key(resource_versions, rtype, rid),
                                            resource_versions.c.version_id == version_id)
        )).first()
        return None if row is None else _version(row)

    async def current_version(self, rtype: str, rid: str) -> tuple[CurrentRow, VersionRow] | None:
        row = (await self.session.execute(
            select(resources).where(self._key(resources, rtype, rid))
        )).first()
        if row is None or row.version_id == 0:
            return None
        current = _current(row)
        stored = await self.version(rtype, rid, row.version_id)
        assert stored is not None  # the current version is always stored
        return current, stored

    async def current_resources(self, rtype: str, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Current JSON of the given (not deleted) resources, by id; in statements of at most
        ``_IDS_PER_STATEMENT`` ids (an Encounter may name tens of thousands of performers, and
        a statement takes at most 32,767 parameters)."""
        found: dict[str, dict[str, Any]] = {}
        for at in range(0, len(ids), _IDS_PER_STATEMENT):
            rows = (await self.session.execute(
                select(resource_versions.c.id, resource_versions.c.resource)
                .join(resources, _IS_CURRENT)
                .where(resources.c.tenant == self.tenant, resources.c.type == rtype,
                       resources.c.id.in_(ids[at:at + _IDS_PER_STATEMENT]),
                       resources.c.deleted.is_(False))
            )).all()
            found.update((r.id, json.loads(r.resource)) for r in rows if r.resource)
        return found

    async def history(self, rtype: str, rid: str, *, since: datetime | None = None,
                      limit: int | None = None, offset: int = 0,
                      ) -> tuple[int, int, list[VersionRow], bool | None]:
        """(versions stored, versions at or after ``since``, their page newest first from
        ``offset``, and whether the applied version before the page's last one is a deletion:
        None when there is none)."""
        key = self._key(resource_versions, rtype, rid)
        at = resource_versions.c.last_updated
        stored, matching = (await self.session.execute(
            select(func.count(),
                   func.count().filter(at >= since) if since is not None else func.count())
            .where(key)
        )).one()
        if not matching or limit == 0:
            return stored, matching, [], None
        rows = [_version(r) for r in (await self.session.execute(
            select(resource_versions).where(key, *([at >= since] if since is not None else []))
            .order_by(resource_versions.c.version_id.desc()).offset(offset).limit(limit)
        )).all()]
        before = None
        if rows:
            before = (await self.session.execute(
                select(resource_versions.c.deleted)
                .where(key, resource_versions.c.version_id < rows[-1].version_id,
                       resource_versions.c.applied.is_(True))
                .order_by(resource_versions.c.version_id.desc()).limit(1)
            )).scalar_one_or_none()
        return stored, matching, rows, before

    async def search(self, rtype: str, *, ids: list[str] | None = None,
                     patient: str | None = None,
                     identifier: tuple[str | None, str] | None = None,
                     updated: list[tuple[str, Any]] = (), limit: int = 50, offset: int = 0,
                     ) -> tuple[int, list[VersionRow]]:
        """(total, first ``limit`` current versions) of live resources matching every criterion;
        ``updated``: (``ge``/``lt``, instant) or (``outside``, (low, high)) on lastUpdated."""
        where = [resources.c.tenant == self.tenant, resources.c.type == rtype,
                 resources.c.deleted.is_(False), resources.c.version_id > 0]
        if ids is not None:
            where.append(resources.c.id.in_(ids))
        if patient is not None:
            where.append(resources.c.patient == patient)
        if identifier is not None:
            system, value = identifier
            match = [resource_identifiers.c.tenant == self.tenant,
                     resource_identifiers.c.type == rtype, resource_identifiers.c.value == value]
            if system is not None:
                match.append(resource_identifiers.c.system == system)
            where.append(resources.c.id.in_(select(resource_identifiers.c.id).where(*match)))
        at = resources.c.last_updated
        for op, when in updated:
            where.append(or_(at < when[0], at >= when[1]) if op == "outside"
                         else at >= when if op == "ge" else at < when)
        total = (await self.session.execute(
            select(func.count()).select_from(resources).where(*where)
        )).scalar_one()
        rows = (await self.session.execute(
            select(resource_versions, resources.c.patient)
            .join(resources, _IS_CURRENT)
            .where(*where).order_by(resources.c.last_updated.desc(), resources.c.id)
            .offset(offset).limit(limit)
        )).all()
        return total, [_version(r) for r in rows]

    async def claim_criteria(self, rtype: str, criteria: str, rid: str) -> str:
        """The id owning these conditional-create criteria: ``rid`` if we claimed them now.

        The primary key makes a concurrent claim wait for ours and then see it.
        """
        stmt = (
            _insert(self.session)(conditional_creates)
            .values(tenant=self.tenant, type=rtype, criteria=criteria, id=rid)
            .on_conflict_do_nothing(index_elements=["tenant", "type", "criteria"])
            .returning(conditional_creates.c.id)
        )
        if (await self.session.execute(stmt)).first() is not None:
            return rid
        return (await self.session.execute(
            select(conditional_creates.c.id).where(
                conditional_creates.c.tenant == self.tenant, conditional_creates.c.type == rtype,
                conditional_creates.c.criteria == criteria)
        )).scalar_one()

    async def release_criteria(self, rtype: str, rid: str) -> None:
        """A deleted resource no longer answers the criteria it was created under."""
        await self.session.execute(delete(conditional_creates).where(
            self._key(conditional_creates, rtype, rid)))

    async def reassign_criteria(self, rtype: str, criteria: str, rid: str, owner: str) -> bool:
        """Take the criteria over from ``owner`` (whose resource no longer matches them);
        False when someone else took them first (a concurrent create, committed now: the
        update waited for it and then found another owner)."""
        return (await self.session.execute(update(conditional_creates).where(
            conditional_creates.c.tenant == self.tenant, conditional_creates.c.type == rtype,
            conditional_creates.c.criteria == criteria, conditional_creates.c.id == owner,
        ).values(id=rid).returning(conditional_creates.c.id))).first() is not None

    # ---- practice settings ------------------------------------------------------------------

    async def practice(self) -> tuple[str, dict[str, Any], int] | None:
        """(IANA time zone, stored ingest-config overrides, their revision: 0 when never
        changed) of this practice."""
        row = (await self.session.execute(
            select(practices.c.timezone).where(practices.c.id == self.tenant)
        )).first()
        if row is None:
            return None
        stored = (await self.session.execute(
            select(ingest_configs.c.config, ingest_configs.c.revision)
            .where(ingest_configs.c.tenant == self.tenant)
        )).first()
        if stored is None:
            return row.timezone, {}, 0
        return row.timezone, json.loads(stored.config) if stored.config else {}, stored.revision

    async def expiring_consents(self, first: str, last: str,
                                limit: int) -> list[ExpiringConsent]:
        """Current granted CCM consents whose ``expiresOn`` (ISO day) is from ``first`` to
        ``last`` and whose notice for that day and patient has not been sent, soonest first;
        locked (rows another transaction holds, a write or another replica's pass, are left
        for later)."""
        expires = _state_text(self.session, "expiresOn")
        n = consent_expiry_notices
        noticed = select(n.c.consent_id).where(
            n.c.tenant == self.tenant, n.c.consent_id == resources.c.id,
            n.c.expires_on == expires, n.c.patient == resources.c.patient).exists()
        rows = (await self.session.execute(
            select(resources.c.id, resources.c.patient, expires.label("expires_on"),
                   resources.c.version_id, resources.c.last_updated, resources.c.sha256,
                   resource_versions.c.received_at, resource_versions.c.connection)
            .select_from(resources.join(resource_versions, _IS_CURRENT))
            .where(resources.c.tenant == self.tenant, resources.c.type == "Consent",
                   resources.c.deleted.is_(False), resources.c.patient.is_not(None),
                   expires >= first, expires <= last, ~noticed)
            .order_by(expires, resources.c.id).limit(limit)
            .with_for_update(of=resources, skip_locked=True)
        )).all()
        return [ExpiringConsent(r.id, r.patient, r.expires_on, r.version_id,
                                utc(r.last_updated), r.sha256, utc(r.received_at), r.connection)
                for r in rows]

    async def record_expiry_notices(self, due: list[ExpiringConsent],
                                    now: datetime) -> list[ExpiringConsent]:
        """Record the notices of ``due`` as sent in this transaction; those another transaction
        recorded first (a concurrent pass that read them before either committed) are left
        out of the answer, not refused: only the answer's notices are to be sent."""
        if not due:
            return []
        n = consent_expiry_notices
        recorded = (await self.session.execute(
            _insert(self.session)(n).values([
                {"tenant": self.tenant, "consent_id": c.id, "expires_on": c.expires_on,
                 "patient": c.patient, "sent_at": now} for c in due])
            .on_conflict_do_nothing().returning(n.c.consent_id, n.c.expires_on, n.c.patient)
        )).all()
        kept = set(map(tuple, recorded))
        answer = []
        for c in due:  # each recorded notice once, even were it in ``due`` twice
            if (key := (c.id, c.expires_on, c.patient)) in kept:
                kept.discard(key)
                answer.append(c)
        return answer

    async def hold_config(self, *, change: bool = False) -> int:
        """The revision of this practice's ingest config (0: never changed), held as it is
        until this transaction ends: on PostgreSQL an advisory lock on the practice's config,
        shared by the writes (``change``: exclusive, a change of it). A change waits for the
        writes under way, and writes that begin during a change wait for it: each write maps
        with the config in force when it commits, and a change maps again everything written
        before it. (SQLite: one writer at a time.)

        The revision is read in a statement after the one that takes the lock, never in it: a
        statement reads what was committed when it began, so a write that waited in it for a
        change read the revision from before the change, and mapped with the config the change
        had just replaced (found by a test racing 40 writes with a change)."""
        await xact_lock(self.session, _config_lock_name(self.tenant), shared=not change)
        return (await self.session.execute(
            select(ingest_configs.c.revision).where(ingest_configs.c.tenant == self.tenant)
        )).scalar() or 0

    async def save_config(self, overrides: dict[str, Any], now: datetime) -> int:
        """Store ``overrides`` as the practice's config; its new revision (one more)."""
        stmt = _insert(self.session)(ingest_configs).values(
            tenant=self.tenant, config=json.dumps(overrides), updated_at=now, revision=1)
        stmt = stmt.on_conflict_do_update(index_elements=["tenant"],
                                          set_={"config": stmt.excluded.config,
                                                "updated_at": stmt.excluded.updated_at,
                                                "revision": ingest_configs.c.revision + 1})
        return (await self.session.execute(
            stmt.returning(ingest_configs.c.revision))).scalar_one()

    async def live_resources(self, rtype: str, after: str, limit: int) -> list[LiveResource]:
        """The live (not deleted) ``rtype`` resources with ids after ``after``, in id order, at
        most ``limit``. Not locked: read under the config's exclusive hold (``hold_config``),
        which every write of the practice waits for."""
        stmt = (select(resources, resource_versions.c.resource, resource_versions.c.received_at,
                       resource_versions.c.connection)
                .select_from(resources.join(resource_versions, _IS_CURRENT))
                .where(resources.c.tenant == self.tenant, resources.c.type == rtype,
                       resources.c.id > after, resources.c.deleted.is_(False),
                       resources.c.version_id > 0)
                .order_by(resources.c.id).limit(limit))
        return [LiveResource(_current(r), json.loads(r.resource) if r.resource else {},
                             utc(r.received_at), r.connection)
                for r in (await self.session.execute(stmt)).all()]


def _config_lock_name(tenant: str) -> str:
    """The advisory lock (``xact_lock``) of a practice's ingest config."""
    return f"ingest-config:{tenant}"


def _state_text(session: AsyncSession, key: str):  # noqa: ANN202 - a SQL expression
    """The text of one key of a resource's ``ccm_state`` (stored as JSON text) in SQL."""
    if session.bind.dialect.name == "postgresql":
        return cast(resources.c.ccm_state, JSONB)[key].astext
    return func.json_extract(resources.c.ccm_state, f"$.{key}")


async def practices_with_consents_ending(session: AsyncSession, since: str) -> list[str]:
    """The practices holding a current CCM consent that ends (``expiresOn``, an ISO day) on
    ``since`` or later, in id order: the only ones a consent-expiry pass can owe a notice. The
    pass visited every practice: on a database with 5,325 of them (left by test runs) the
    relay's process spent half a core and PostgreSQL as much on finding nothing."""
    expires = _state_text(session, "expiresOn")
    return list((await session.execute(
        select(resources.c.tenant).where(
            resources.c.type == "Consent", resources.c.deleted.is_(False),
            resources.c.patient.is_not(None), expires >= since)
        .distinct().order_by(resources.c.tenant))).scalars())


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _current(row) -> CurrentRow:  # noqa: ANN001
    return CurrentRow(row.type, row.id, row.version_id, row.last_version, utc(row.last_updated),
                      row.sha256, row.deleted, json.loads(row.ccm_state), row.patient)


def _version(row) -> VersionRow:  # noqa: ANN001
    return VersionRow(row.type, row.id, row.version_id,
                      json.loads(row.resource) if row.resource else None, row.sha256,
                      utc(row.last_updated), utc(row.received_at), row.deleted, row.applied,
                      row.method, getattr(row, "patient", None))

