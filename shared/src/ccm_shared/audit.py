"""Tamper-evident audit trail of every read and write of patient data, across the services.

Recording is cheap and never serialises requests: an API call (after its response) or an applied
event (inside the consumer's own transaction) inserts an *unsealed* row into ``platform.audit_log``.
API calls go through an ``AuditWriter`` (group commit): the entries of concurrent calls share one
multi-row INSERT and one COMMIT, and each call still finishes only once its own entry is committed,
so nothing is held in memory that a crash could lose beyond what a per-call transaction would (the
response is already sent either way). A sealer — one active at a time, behind an advisory lock —
then chains the rows of each practice in id order: ``seq`` = 1, 2, 3 … and ``hash`` = SHA-256 of the
previous entry's hash and this entry's canonical content. ``platform.audit_heads`` keeps each
practice's last sequence and hash, so removing the newest entry is detected as surely as changing or
removing one in the middle. Rows are never updated after sealing and never deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    MetaData,
    SmallInteger,
    String,
    Table,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ccm_shared.db import GroupCommit, autocommit_engine, dialect_insert, xact_lock
from ccm_shared.tables import BigId

log = structlog.get_logger(__name__)

GENESIS = "0" * 64
audit_metadata = MetaData(schema="platform")
audit_log = Table(
    "audit_log",
    audit_metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("practice", String(64), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("service", String(32), nullable=False),
    Column("actor_type", String(16), nullable=False),  # client | system
    Column("actor", String(200), nullable=False),  # token id, or consumer group
    Column("actor_label", String(200), nullable=True),
    Column("action", String(1), nullable=False),  # FHIR AuditEvent.action: C R U D E
    Column("what", String(300), nullable=False),  # route template or event type
    Column("entity", String(300), nullable=True),  # e.g. Patient/123, Invoice/abc, a packet
    Column("patient", String(100), nullable=True),
    Column("outcome", SmallInteger, nullable=False),  # 0 success, 4 minor, 8 serious failure
    Column("correlation_id", String(64), nullable=True),
    Column("seq", BigInteger, nullable=True),  # set when sealed
    Column("prev_hash", String(64), nullable=True),
    Column("hash", String(64), nullable=True),
    Index("ix_audit_practice_patient", "practice", "patient"),
    Index("ix_audit_practice_seq", "practice", "seq", unique=True),
    # The sealer's work list: only the unsealed entries, so a pass costs what is left to seal,
    # not the size of the whole (ever growing) trail.
    Index("ix_audit_unsealed", "id", postgresql_where=text("seq IS NULL"),
          sqlite_where=text("seq IS NULL")),
)
audit_heads = Table(
    "audit_heads",
    audit_metadata,
    Column("practice", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

CONTENT_FIELDS = (
    "practice",
    "recorded_at",
    "service",
    "actor_type",
    "actor",
    "actor_label",
    "action",
    "what",
    "entity",
    "patient",
    "outcome",
    "correlation_id",
    "seq",
)
METHOD_ACTION = {"POST": "C", "GET": "R", "HEAD": "R", "PUT": "U", "PATCH": "U", "DELETE": "D"}


def outcome_for(status: int) -> int:
    """FHIR AuditEvent.outcome from an HTTP status."""
    return 0 if status < 400 else 4 if status < 500 else 8


def _canonical_time(value: datetime) -> str:
    if value.tzinfo is None:  # SQLite returns naive datetimes; they were stored as UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def entry_hash(prev_hash: str, row: dict) -> str:
    content = {k: row[k] for k in CONTENT_FIELDS}
    content["recorded_at"] = _canonical_time(row["recorded_at"])
    payload = prev_hash + json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    practice: str
    service: str
    actor_type: str
    actor: str
    action: str
    what: str
    outcome: int = 0
    entity: str | None = None
    patient: str | None = None
    actor_label: str | None = None
    correlation_id: str | None = None

    def values(self) -> dict:
        values = {**self.__dict__, "recorded_at": datetime.now(UTC)}
        for name in _BOUNDED:  # a long URL must not cost the entry (or its batch)
            if values[name] is not None:
                values[name] = values[name][: audit_log.c[name].type.length]
        return values


_BOUNDED = ("practice", "service", "actor", "actor_label", "what", "entity", "patient",
            "correlation_id")


async def record_now(engine: AsyncEngine, entry: AuditRecord) -> None:
    """One entry in a transaction of its own."""
    async with engine.begin() as conn:
        await record_many(conn, [entry])


class AuditWriter:
    """Audit entries by group commit (``ccm_shared.db.GroupCommit``): ``record`` returns once
    the entry is committed; entries recorded meanwhile share one multi-row INSERT and COMMIT
    (at most ``max_batch``); an entry that cannot be written fails alone, not its batch.
    """

    def __init__(self, engine: AsyncEngine, *, max_batch: int = 500) -> None:
        self.engine = engine
        # A batch is one multi-row INSERT, atomic on its own: on PostgreSQL it runs in
        # autocommit mode, without the BEGIN and COMMIT round trips that were half of its cost
        # (the entries of concurrent durable FHIR POSTs come in batches of ~16, one batch per
        # group commit of their writes); not behind a pooler (``db.autocommit_engine``).
        self._autocommit = autocommit_engine(engine)
        self._group = GroupCommit(self._insert, max_batch=max_batch, name="audit-writer")

    async def record(self, entry: AuditRecord) -> None:
        await self._group.submit(entry.values())

    async def flush(self) -> None:
        """Wait until every entry recorded so far is written (or has failed)."""
        await self._group.flush()

    async def _insert(self, rows: list[dict]) -> list[None]:
        if self._autocommit is not None:  # committed when the statement ends
            async with self._autocommit.connect() as conn:
                await insert_rows(conn, rows)
        else:
            async with self.engine.begin() as conn:
                await insert_rows(conn, rows)
        return [None] * len(rows)


async def record_many(conn: AsyncConnection | AsyncSession, entries: list[AuditRecord]) -> None:
    """``record`` for many entries at once, in the caller's transaction, in one statement (a
    consumer batch's entries)."""
    if entries:
        await insert_rows(conn, [e.values() for e in entries])


async def insert_rows(conn: AsyncConnection | AsyncSession, rows: list[dict]) -> None:
    """Unsealed entries (``AuditRecord.values()``) in one statement."""
    if isinstance(conn, AsyncSession):
        conn = await conn.connection()
    if conn.dialect.name == "postgresql":  # one array per column: no per-row SQL
        await conn.exec_driver_sql(
            _PG_INSERT, tuple([row[c] for row in rows] for c, _ in _PG_COLUMNS)
        )
    else:
        await conn.execute(insert(audit_log), rows)


_PG_COLUMNS = (
    *((c, "text") for c in ("practice", "service", "actor_type", "actor", "actor_label")),
    ("recorded_at", "timestamptz"),
    *((c, "text") for c in ("action", "what", "entity", "patient", "correlation_id")),
    ("outcome", "smallint"),
)
_PG_INSERT = (
    f"INSERT INTO platform.audit_log ({', '.join(c for c, _ in _PG_COLUMNS)}) "
    f"SELECT * FROM unnest({', '.join(f'${n}::{t}[]' for n, (_, t) in enumerate(_PG_COLUMNS, 1))})"
)


async def seal(engine: AsyncEngine, *, batch: int = 2000) -> int:
    """Chain unsealed entries in id order; return how many were sealed."""
    sealed = 0
    async with engine.begin() as conn:
        if not await xact_lock(conn, "ccm-audit-sealer", wait=False):
            return 0  # another sealer is at work
        rows = (
            (
                await conn.execute(
                    select(audit_log)
                    .where(audit_log.c.seq.is_(None))
                    .order_by(audit_log.c.id)
                    .limit(batch)
                )
            )
            .mappings()
            .all()
        )
        if not rows:
            return 0
        practices = {r["practice"] for r in rows}
        heads = {
            r.practice: (r.seq, r.hash)
            for r in (
                await conn.execute(select(audit_heads).where(audit_heads.c.practice.in_(practices)))
            ).all()
        }
        links = []  # (id, seq, prev_hash, hash)
        for row in rows:
            seq, prev = heads.get(row["practice"], (0, GENESIS))
            values = dict(row)
            values["seq"] = seq + 1
            digest = entry_hash(prev, values)
            links.append((row["id"], seq + 1, prev, digest))
            heads[row["practice"]] = (seq + 1, digest)
        if await _link(conn, links) != len(links):
            # another sealer got there first: roll all of this back
            raise RuntimeError("audit entry sealed concurrently; retrying")
        sealed = len(links)
        ins = dialect_insert(engine.dialect.name)
        for practice, (seq, digest) in heads.items():
            if practice not in practices:
                continue
            await conn.execute(
                ins(audit_heads)
                .values(practice=practice, seq=seq, hash=digest)
                .on_conflict_do_update(
                    index_elements=["practice"], set_={"seq": seq, "hash": digest}
                )
            )
    return sealed


async def _link(conn: AsyncConnection, links: list[tuple[int, int, str, str]]) -> int:
    """Set seq, prev_hash and hash of still unsealed entries; how many were set. PostgreSQL:
    one statement for the whole batch (a statement per entry cost a round trip each)."""
    if conn.dialect.name == "postgresql":
        ids, seqs, prevs, hashes = (list(column) for column in zip(*links, strict=True))
        result = await conn.exec_driver_sql(
            "UPDATE platform.audit_log AS a SET seq = u.seq, prev_hash = u.prev, hash = u.hash "
            "FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[]) "
            "AS u(id, seq, prev, hash) WHERE a.id = u.id AND a.seq IS NULL",
            (ids, seqs, prevs, hashes),
        )
        return result.rowcount
    changed = 0
    for entry_id, seq, prev, digest in links:
        result = await conn.execute(
            update(audit_log)
            .where(audit_log.c.id == entry_id, audit_log.c.seq.is_(None))
            .values(seq=seq, prev_hash=prev, hash=digest)
        )
        changed += result.rowcount
    return changed


async def seal_all(engine: AsyncEngine) -> int:
    total = 0
    while n := await seal(engine):
        total += n
    return total


async def run_sealer(engine: AsyncEngine, stopping: asyncio.Event, interval: float = 1.0) -> None:
    """Background job: seal every ``interval`` seconds until ``stopping`` is set."""
    from ccm_shared.service import every  # service imports this module

    # A failed pass is retried at the next tick; nothing is lost.
    await every(stopping, interval, lambda: seal_all(engine),
                failed="audit sealing failed; retrying", level="warning")


@dataclass(frozen=True)
class VerifyResult:
    practice: str
    entries: int
    unsealed: int
    broken_at: int | None = None  # seq of the first entry that does not verify
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.broken_at is None


async def verify(engine: AsyncEngine, practice: str | None = None) -> list[VerifyResult]:
    """Recompute every practice's chain; report the first broken link of each."""
    async with engine.connect() as conn:
        heads_q = select(audit_heads)
        if practice:
            heads_q = heads_q.where(audit_heads.c.practice == practice)
        heads = {r.practice: r for r in (await conn.execute(heads_q)).all()}
        results = []
        for p in sorted(heads):
            head = heads[p]
            prev, expected_seq, count, broken, reason = GENESIS, 1, 0, None, None
            stream = await conn.stream(
                select(audit_log)
                .where(audit_log.c.practice == p, audit_log.c.seq.is_not(None))
                .order_by(audit_log.c.seq)
            )
            async for row in stream.mappings():
                count += 1
                if broken is not None:
                    continue
                if row["seq"] != expected_seq:
                    broken, reason = expected_seq, f"entry {expected_seq} is missing"
                elif row["prev_hash"] != prev:
                    broken, reason = row["seq"], "link to the previous entry does not match"
                elif entry_hash(prev, dict(row)) != row["hash"]:
                    broken, reason = row["seq"], "entry content was altered"
                prev = row["hash"]
                expected_seq += 1
            if broken is None and (head.seq != expected_seq - 1 or head.hash != prev):
                broken = expected_seq
                reason = f"the chain ends at {expected_seq - 1} but {head.seq} entries were sealed"
            unsealed = (
                await conn.execute(
                    select(func.count()).where(audit_log.c.practice == p, audit_log.c.seq.is_(None))
                )
            ).scalar_one()
            results.append(VerifyResult(p, count, unsealed, broken, reason))
    return results


def as_fhir_audit_event(row) -> dict:  # noqa: ANN001
    """An entry shaped as a FHIR R4 AuditEvent."""
    resource: dict = {
        "resourceType": "AuditEvent",
        "id": str(row.id),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        }
        if row.actor_type == "client"
        else {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110100",
            "display": "Application Activity",
        },
        "action": row.action,
        "recorded": _canonical_time(row.recorded_at),
        "outcome": str(row.outcome),
        "agent": [
            {
                "requestor": row.actor_type == "client",
                "who": {
                    "identifier": {"value": row.actor},
                    "display": row.actor_label or row.actor,
                },
            }
        ],
        "source": {"observer": {"display": f"ccm-platform {row.service}"}},
        "entity": [
            {"what": {"reference": row.entity}} if row.entity else {"what": {"display": row.what}}
        ],
        "extension": [
            {
                "url": "http://ccm-platform.org/fhir/StructureDefinition/audit-chain",
                "extension": [
                    {"url": "practice", "valueString": row.practice},
                    {"url": "sequence", "valueInteger": row.seq} if row.seq is not None else None,
                    {"url": "hash", "valueString": row.hash} if row.hash else None,
                    {"url": "operation", "valueString": row.what},
                ],
            },
        ],
    }
    resource["extension"][0]["extension"] = [e for e in resource["extension"][0]["extension"] if e]
    if row.patient:
        resource["entity"].append(
            {
                "what": {"reference": f"Patient/{row.patient}"},
                "role": {"code": "1", "display": "Patient"},
            }
        )
    return resource
