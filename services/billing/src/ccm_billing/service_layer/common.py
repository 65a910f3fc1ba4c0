"""Small helpers the billing service layer shares: dialect upserts, practice facts, sequences."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from ccm_billing.adapters.orm import practice_sequences
from ccm_billing.domain.model import Month
from ccm_billing.domain.pricing import Contract
from ccm_shared.consumer import PoisonMessage
from ccm_shared.db import dialect_insert, schema_of
from ccm_shared.errors import NotFound
from ccm_shared.tables import practices
from ccm_shared.tenancy import MAX_RENEWAL_MONTHS, RENEWAL_RULE

SOURCE = "/ccm/billing"


def insert_for(session: AsyncSession):  # noqa: ANN201 - dialect insert construct
    return dialect_insert(session.bind.dialect.name)


@functools.cache
def _widths(table) -> tuple[tuple[str, int], ...]:  # noqa: ANN001
    return tuple((c.name, c.type.length) for c in table.c if getattr(c.type, "length", None))


def refuse_unheld(table, row: dict) -> None:  # noqa: ANN001
    """PoisonMessage when ``row`` (of an event's values) has a text ``table`` cannot hold:
    longer than its column (PostgreSQL refuses it; SQLite, which would keep it, refuses it
    too), or with a NUL (no PostgreSQL text holds one). It would fail the same way at every
    retry; refused, the event is dead-lettered at once, with the column named (never the value:
    the reason travels in a Kafka header)."""
    for name, width in _widths(table):
        value = row.get(name)
        if isinstance(value, str) and len(value) > width:
            raise PoisonMessage(f"{table.name}.{name} holds {width} characters at most; the "
                                f"event's value has {len(value)}")
    for name, value in row.items():
        if isinstance(value, str) and "\x00" in value:
            raise PoisonMessage(f"the event's value for {table.name}.{name} has a NUL "
                                "character, which no PostgreSQL text holds")


@functools.cache
def _upsert_statement(dialect: str, table, keys: tuple[str, ...], values: tuple[str, ...],  # noqa: ANN001, ANN202
                      newer: str | None, returning: str | None):
    ins = dialect_insert(dialect)(table).values(
        {c: bindparam(c, type_=table.c[c].type) for c in keys + values})
    stmt = ins.on_conflict_do_update(
        index_elements=list(keys), set_={c: ins.excluded[c] for c in values},
        where=(table.c[newer] < ins.excluded[newer]) if newer else None)
    return stmt.returning(table.c[returning]) if returning else stmt


def upsert_statement(session: AsyncSession, table, keys, values, *, newer: str | None = None,  # noqa: ANN001, ANN201
                     returning: str | None = None):
    """INSERT … ON CONFLICT (keys) DO UPDATE SET values [WHERE the row's ``newer`` column is older
    than the incoming one], built once per shape and executed with the row as parameters (the
    projections run it for every event; building the construct each time cost more than the
    round trip)."""
    return _upsert_statement(session.bind.dialect.name, table, tuple(keys), tuple(values), newer,
                             returning)


@dataclass(frozen=True)
class PracticeInfo:
    id: str
    name: str
    timezone: str
    pricing: dict

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def contract(self) -> Contract:
        return Contract.from_json(self.pricing)

    def terms_json(self) -> str:
        """The terms a month is billed under (``billing_periods.terms``): the pricing document,
        that is the contract and the practice's rule options, with the consent renewal interval
        in force written into its rules (it may be the service's default, which can change after
        the close). (Not the time zone: the projections place each entry in its month with the
        zone of the day it arrives.)"""
        rules = self.pricing.get("rules") or {}
        pricing = {**self.pricing, "rules": {
            **rules, RENEWAL_RULE: consent_renewal_months(self)}}
        return json.dumps({"pricing": pricing}, sort_keys=True)

    def under(self, terms_json: str | None) -> PracticeInfo:
        """This practice under the terms a month was billed with (as it is now when the month
        was closed before they were kept)."""
        if not terms_json:
            return self
        return replace(self, pricing=json.loads(terms_json)["pricing"])

    def today(self, now: datetime) -> date:
        return now.astimezone(self.tz).date()

    @classmethod
    def of_row(cls, row) -> PracticeInfo:  # noqa: ANN001 - a platform.practices row
        return cls(row.id, row.name, row.timezone, json.loads(row.pricing or "{}"))


log = structlog.get_logger(__name__)


@functools.cache
def _practice_statement():  # noqa: ANN202 - built once (every close, decider pass, request)
    return select(practices).where(practices.c.id == bindparam("id", type_=practices.c.id.type))


async def practice_info(session: AsyncSession, practice: str) -> PracticeInfo:
    row = (await session.execute(_practice_statement(), {"id": practice})).first()
    if row is None:
        raise NotFound(f"practice {practice!r} not found")
    return PracticeInfo.of_row(row)


_ZONES: dict[str, tuple[float, ZoneInfo]] = {}
ZONE_TTL_SECONDS = 60.0


async def practice_zone(session: AsyncSession, practice: str) -> ZoneInfo:
    """The practice's time zone, kept a minute per process (the projections need it per event;
    NotFound when the practice does not exist)."""
    hit = _ZONES.get(practice)
    if hit is not None and time.monotonic() - hit[0] < ZONE_TTL_SECONDS:
        return hit[1]
    zone = (await practice_info(session, practice)).tz
    _ZONES[practice] = (time.monotonic(), zone)
    return zone


async def all_practices(session: AsyncSession) -> list[PracticeInfo]:
    rows = (await session.execute(select(practices))).all()
    return [PracticeInfo.of_row(r) for r in rows]


@functools.cache
def _sequence_statement(dialect: str):  # noqa: ANN202 - built once per dialect
    ins = dialect_insert(dialect)(practice_sequences)
    count = bindparam("count", type_=practice_sequences.c["last"].type)
    return (
        ins.values(practice=bindparam("practice", type_=practice_sequences.c.practice.type),
                   last=count)
        .on_conflict_do_update(
            index_elements=["practice"], set_={"last": practice_sequences.c["last"] + count}
        )
        .returning(practice_sequences.c["last"])
    )


async def next_practice_sequence(session: AsyncSession, practice: str, count: int = 1) -> int:
    """Per-practice counter of practice-facing events, so a practice can detect gaps. Reserves
    ``count`` numbers in one statement and answers the last of them (the first is
    ``last - count + 1``)."""
    return (await session.execute(_sequence_statement(session.bind.dialect.name),
                                  {"practice": practice, "count": count})).scalar_one()


def parse_instant(text: str | None) -> datetime | None:
    if not text:
        return None
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_day(text: str | None) -> date | None:
    if not text:
        return None
    return date.fromisoformat(text[:10])


def local_day(text: str | None, tz: ZoneInfo | None, *, end: bool = False) -> date | None:
    """A FHIR date or dateTime as a day of the practice: a dateTime with a time of day is the
    day it is in ``tz`` (``2026-04-01T02:00Z`` is 31 March in New York); a date as written; a
    partial one (``2026-03``, ``2026``) its first day, or with ``end`` its last (a period that
    ends in 2026 runs to 31 December). Without ``tz`` (the practice is not known here), or for
    a dateTime Python cannot hold (a leap second, one past 9999 in the zone), the date as
    written."""
    if not text:
        return None
    if "T" in text:
        if tz is not None:
            try:
                return parse_instant(text).astimezone(tz).date()
            except (ValueError, OverflowError):
                pass
        return date.fromisoformat(text[:10])
    year, *rest = (int(p) for p in text.split("-"))
    if len(rest) == 2:
        return date(year, *rest)
    month = rest[0] if rest else (12 if end else 1)
    if not end:
        return date(year, month, 1)
    return Month(year, month).last_day


async def bulk_insert(session: AsyncSession, table, rows: list[dict]) -> None:  # noqa: ANN001
    """Insert many rows in the session's transaction: COPY on PostgreSQL, executemany elsewhere."""
    if not rows:
        return
    if session.bind.dialect.name != "postgresql":
        from sqlalchemy import insert

        await session.execute(insert(table), rows)
        return
    conn = await session.connection()
    # SQLAlchemy sends BEGIN lazily, with the first statement it executes: make sure the
    # transaction has begun, or COPY on the raw connection would autocommit on its own.
    await conn.exec_driver_sql("SELECT 1")
    schema = schema_of(conn)
    raw = (await conn.get_raw_connection()).driver_connection
    columns = list(rows[0])
    await raw.copy_records_to_table(
        table.name, records=[tuple(r[c] for c in columns) for r in rows], columns=columns,
        schema_name=schema,
    )


def consent_renewal_months(info: PracticeInfo) -> int | None:
    """The practice's consent renewal interval in months (None: consents do not expire): its
    pricing ``rules.consent_renewal_months`` when it has one (null or 0: none), else the
    service's CCM_BILLING_CONSENT_RENEWAL_MONTHS. Billing's decisions and the compliance records
    (tracker, audit packet) all take it from here, so they cannot disagree on an expiry."""
    rules = info.pricing.get("rules") or {}
    value = rules.get(RENEWAL_RULE, _service_renewal_months())
    try:
        months = int(value or 0)
    except (TypeError, ValueError):
        months = -1
    if not 0 <= months <= MAX_RENEWAL_MONTHS or isinstance(value, bool | float):
        # Pricing documents are written by hand: an unreadable interval must not stop billing,
        # and must not pass unnoticed either: said when a practice's value becomes unreadable,
        # not on every decision pass that reads it.
        shown = repr(value)[:80]
        if _UNREADABLE_RENEWAL.get(info.id) != shown:
            _UNREADABLE_RENEWAL[info.id] = shown
            log.warning("pricing rules.consent_renewal_months is not a whole number of months "
                        f"from 0 to {MAX_RENEWAL_MONTHS}; the service default applies",
                        practice=info.id, value=shown)
        months = _service_renewal_months()
    else:
        _UNREADABLE_RENEWAL.pop(info.id, None)
    return months or None


# The unreadable renewal value last warned about, per practice (one entry per practice at most).
_UNREADABLE_RENEWAL: dict[str, str] = {}


@functools.cache
def _service_renewal_months() -> int:
    # Read from the environment once per process, as the service's settings are.
    from ccm_billing.settings import BillingSettings

    return BillingSettings().consent_renewal_months
