"""Tenancy: the practice is the tenant. API tokens resolve to exactly one practice.

Tokens are 256-bit random strings shown once; only their SHA-256 is stored (a slow password hash
adds nothing for tokens of that entropy, and lookups stay one indexed query). The API edge keeps
resolved tokens for a few seconds (``TokenCache``, ``CCM_AUTH_CACHE_SECONDS``), so a revoked
token stops working within that time, not at once.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from ccm_shared.errors import Conflict, Forbidden, InvalidInput, NotFound
from ccm_shared.tables import api_tokens, practices

TOKEN_PREFIX = "ccm_"
PRACTICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Every scope a token may carry, and what a token made without ``--scope`` gets. ``billing``
# reads and writes billing (payments, voids, refunds, closes, recomputes, duplicate-biller
# releases, the EHR endpoint: the CCM vendor's staff); ``billing:read`` only reads it (invoices,
# worklists, reports, FHIR Invoice/ChargeItem, compliance records: a practice's own system).
# services/billing/README.md, "Scopes", has the table of routes.
DEFAULT_SCOPES = ("fhir:write", "fhir:read", "billing", "billing:read", "careplan",
                  "notification", "admin")


@dataclass(frozen=True)
class Tenant:
    """Who is calling: one practice and the scopes of its token."""

    practice_id: str
    token_id: str
    scopes: frozenset[str]
    label: str | None = None  # what the token is for, e.g. the EHR connection's name

    def require_practice(self, practice_id: str) -> None:
        """Another practice's resources do not exist for this caller (404, not 403)."""
        if practice_id != self.practice_id:
            raise NotFound(f"practice {practice_id!r} not found")

    def require_scope(self, scope: str) -> None:
        """403 unless this token carries ``scope``."""
        if scope not in self.scopes:
            raise Forbidden(f"this token lacks the {scope!r} scope")


@dataclass(frozen=True)
class Pricing:
    """How the CCM vendor bills this practice (used by billing's Invoice), and the practice's
    billing rule options (``rules``, see PRACTICE_RULES)."""

    model: str = "per-code"  # per-code | percent-of-medicare | flat-per-patient
    rates: dict[str, Decimal] | None = None
    percent: Decimal | None = None
    flat_fee: Decimal | None = None
    due_days: int = 30
    rules: dict[str, str | int] | None = None

    def as_dict(self) -> dict:
        terms = {
            "model": self.model,
            "rates": {k: str(v) for k, v in (self.rates or {}).items()},
            "percent": str(self.percent) if self.percent is not None else None,
            "flat_fee": str(self.flat_fee) if self.flat_fee is not None else None,
            "due_days": self.due_days,
        }
        if self.rules:
            terms["rules"] = dict(self.rules)
        return terms

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


# The practice's billing rule options, kept in its pricing document under "rules" (billing reads
# them; services/billing/README.md says what each does): a name and the values it takes.
RENEWAL_RULE = "consent_renewal_months"
MAX_RENEWAL_MONTHS = 1200  # a hundred years: more is a typing mistake, not a contract
PRACTICE_RULES: dict[str, tuple[str, ...] | None] = {
    "date_of_service": ("month-end", "threshold-met"),
    "initiating_visit_missing": ("warning", "blocker"),
    RENEWAL_RULE: None,  # whole months, 0 (none) to MAX_RENEWAL_MONTHS
}


def practice_rule(name: str, value: str) -> tuple[str, str | int]:
    """A rule option as given (``NAME=VALUE`` on the command line), checked: its name and value
    as the pricing document keeps them. InvalidInput says what the rule takes."""
    if name not in PRACTICE_RULES:
        raise InvalidInput(f"unknown rule {name!r}; rules: {', '.join(PRACTICE_RULES)}")
    choices = PRACTICE_RULES[name]
    if choices is not None:
        if value not in choices:
            raise InvalidInput(f"rule {name} takes {' or '.join(choices)}, not {value!r}")
        return name, value
    if not (value.isascii() and value.isdigit() and int(value) <= MAX_RENEWAL_MONTHS):
        raise InvalidInput(f"rule {name} takes whole months from 0 (none) to "
                           f"{MAX_RENEWAL_MONTHS}, not {value!r}")
    return name, int(value)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_practice(practice_id: str, timezone: str) -> None:
    if not PRACTICE_ID.match(practice_id):
        raise InvalidInput(
            "practice id must be 1-63 lowercase letters, digits or hyphens, starting with a "
            "letter or digit"
        )
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown IANA time zone {timezone!r} (e.g. America/Chicago)") from None


async def create_practice(
    engine: AsyncEngine, *, practice_id: str, name: str, timezone: str, pricing: Pricing
) -> None:
    validate_practice(practice_id, timezone)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(practices).values(
                    id=practice_id,
                    name=name,
                    timezone=timezone,
                    pricing=pricing.to_json(),
                    created_at=datetime.now(UTC),
                )
            )
    except IntegrityError:
        raise Conflict(f"practice {practice_id!r} already exists") from None


async def update_practice(
    engine: AsyncEngine, practice_id: str, *, name: str | None = None,
    pricing: Pricing | None = None, due_days: int | None = None,
    rules: dict[str, str | int | None] | None = None,
) -> dict:
    """Amend a practice's name, contract (``pricing``: the whole contract; its rules kept unless
    ``rules`` changes them), payment terms (``due_days`` alone) or rule options (``rules``: a
    name to its new value, or to None to remove it, so the default applies). Its id and time
    zone never change (a zone moves every month's boundary under the months already billed).
    Returns the practice as ``get_practice`` shows it."""
    async with engine.begin() as conn:
        row = (await conn.execute(
            select(practices.c.pricing).where(practices.c.id == practice_id).with_for_update()
        )).first()
        if row is None:
            raise NotFound(f"practice {practice_id!r} not found")
        current = json.loads(row.pricing or "{}")
        kept_rules = current.get("rules") or {}
        terms = pricing.as_dict() if pricing is not None else dict(current)
        terms.pop("rules", None)
        if due_days is not None:
            terms["due_days"] = due_days
        merged = {**kept_rules, **(rules or {})}
        merged = {k: v for k, v in merged.items() if v is not None}
        if merged:
            terms["rules"] = merged
        values: dict = {"pricing": json.dumps(terms)}
        if name is not None:
            values["name"] = name
        await conn.execute(update(practices).where(practices.c.id == practice_id).values(values))
    return await get_practice(engine, practice_id)


async def list_practices(engine: AsyncEngine) -> list[dict]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(practices).order_by(practices.c.id))).all()
    return [_practice_view(row) for row in rows]


async def get_practice(engine: AsyncEngine, practice_id: str) -> dict:
    async with engine.connect() as conn:
        row = (await conn.execute(select(practices).where(practices.c.id == practice_id))).first()
    if row is None:
        raise NotFound(f"practice {practice_id!r} not found")
    return _practice_view(row)


def _practice_view(row) -> dict:  # noqa: ANN001 - a practices row
    return {
        "id": row.id,
        "name": row.name,
        "timezone": row.timezone,
        "pricing": json.loads(row.pricing),
        "created_at": row.created_at.isoformat(),
    }


async def create_token(
    engine: AsyncEngine,
    *,
    practice_id: str,
    scopes: tuple[str, ...] = DEFAULT_SCOPES,
    label: str | None = None,
) -> str:
    """Create a token for a practice and return it; it is never shown again."""
    await get_practice(engine, practice_id)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = str(uuid.uuid4())
    async with engine.begin() as conn:
        await conn.execute(
            insert(api_tokens).values(
                id=token_id,
                practice_id=practice_id,
                token_hash=hash_token(token),
                scopes=" ".join(scopes),
                label=label,
                created_at=datetime.now(UTC),
            )
        )
        await _audit_token(conn, practice_id, token_id, "C", f"token created ({' '.join(scopes)})")
    return token


async def list_tokens(engine: AsyncEngine, practice_id: str) -> list[dict]:
    """The practice's tokens (never the token itself: only its hash is kept), oldest first."""
    await get_practice(engine, practice_id)
    t = api_tokens
    async with engine.connect() as conn:
        rows = (await conn.execute(
            select(t.c.id, t.c.label, t.c.scopes, t.c.created_at, t.c.revoked_at)
            .where(t.c.practice_id == practice_id).order_by(t.c.created_at, t.c.id)
        )).all()
    return [{"id": r.id, "label": r.label, "scopes": r.scopes.split(),
             "created_at": r.created_at.isoformat(),
             "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None} for r in rows]


async def revoke_token(engine: AsyncEngine, *, practice_id: str, token_id: str) -> dict:
    """Revoke one of the practice's tokens (already revoked: unchanged); its listing entry.
    Services stop accepting it within ``CCM_AUTH_CACHE_SECONDS``."""
    t = api_tokens
    async with engine.begin() as conn:
        revoked = await conn.execute(update(t).where(
            t.c.id == token_id, t.c.practice_id == practice_id, t.c.revoked_at.is_(None),
        ).values(revoked_at=datetime.now(UTC)))
        if revoked.rowcount:
            await _audit_token(conn, practice_id, token_id, "U", "token revoked")
    found = [x for x in await list_tokens(engine, practice_id) if x["id"] == token_id]
    if not found:
        raise NotFound(f"practice {practice_id} has no token {token_id}")
    return found[0]


async def _audit_token(conn, practice_id: str, token_id: str, action: str,  # noqa: ANN001
                       what: str) -> None:
    """A token's creation or revocation in the audit trail, in the same transaction: who may
    read and write a practice's data is part of its record (the token itself never is)."""
    from ccm_shared.audit import AuditRecord, record_many

    await record_many(conn, [AuditRecord(
        practice=practice_id, service="platform", actor_type="operator",
        actor=f"ccm-cli:{_os_user()}", action=action, what=what,
        entity=f"api-token/{token_id}")])


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's user id with no name (no passwd entry)
        return f"uid {os.getuid()}"


async def resolve_token(engine: AsyncEngine, token: str) -> Tenant | None:
    """The tenant of a live (not revoked) token, or None."""
    return await _resolve_hash(engine, hash_token(token))


async def _resolve_hash(engine: AsyncEngine, token_hash: str) -> Tenant | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(
                    api_tokens.c.id,
                    api_tokens.c.practice_id,
                    api_tokens.c.scopes,
                    api_tokens.c.label,
                ).where(
                    api_tokens.c.token_hash == token_hash,
                    api_tokens.c.revoked_at.is_(None),
                )
            )
        ).first()
    if row is None:
        return None
    return Tenant(
        practice_id=row.practice_id,
        token_id=row.id,
        scopes=frozenset(row.scopes.split()),
        label=row.label,
    )


class TokenCache:
    """Tokens resolved in the last ``ttl`` seconds, so an API call need not ask the database.

    Bounded (the least recently used of ``max_entries`` go first). Only live tokens are kept:
    an unknown or revoked token asks the database every time, and a token revoked while cached
    stops working once its entry is ``ttl`` seconds old. ``ttl`` 0 turns the cache off.
    ``clock`` is monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Tenant]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def resolve(self, engine: AsyncEngine, token: str) -> Tenant | None:
        key = hash_token(token)
        if self.ttl > 0:
            hit = self._entries.get(key)
            if hit is not None and self.clock() < hit[0]:
                self._entries.move_to_end(key)
                return hit[1]
        tenant = await _resolve_hash(engine, key)
        if tenant is None or self.ttl <= 0:
            self._entries.pop(key, None)
            return tenant
        self._entries[key] = (self.clock() + self.ttl, tenant)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return tenant
