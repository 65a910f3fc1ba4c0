"""Async database access: one engine per service schema, and the unit of work.

Each service owns a PostgreSQL schema (``ingest``, ``billing``, …); its tables are declared without
a schema and placed there by SQLAlchemy's ``schema_translate_map``. The tenant registry lives in the
``platform`` schema. On SQLite (embedded mode) every schema is a sibling database file ATTACHed
under the schema's name, so the same SQL works on both.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog
from sqlalchemy import TextClause, event, exc, text
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

if TYPE_CHECKING:
    from ccm_shared.outbox import Outbox

_log = structlog.get_logger(__name__)

PLATFORM_SCHEMA = "platform"
SCHEMAS = ("platform", "ingest", "billing", "careplan", "notification")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


class _UtcSqliteDateTime(sqlite.DATETIME):
    """A timezone-aware column on SQLite, which has no offsets: stored in UTC, read back in UTC.
    SQLAlchemy's own SQLite type wrote the wall-clock time of whatever offset a value had and
    read it back naive, so 02:00-05:00 came back as 02:00 (an instant five hours early) and
    values written with different offsets compared wrongly in SQL."""

    def bind_processor(self, dialect):  # noqa: ANN001, ANN201
        process = super().bind_processor(dialect)
        if not self.timezone:
            return process

        def bind(value):  # noqa: ANN001, ANN202
            if isinstance(value, datetime) and value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            return process(value) if process else value

        return bind

    def result_processor(self, dialect, coltype):  # noqa: ANN001, ANN201
        process = super().result_processor(dialect, coltype)
        if not self.timezone:
            return process

        def result(value):  # noqa: ANN001, ANN202
            value = process(value) if process else value
            if isinstance(value, datetime) and value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return value

        return result


def _sqlite_instants(engine: AsyncEngine) -> None:
    """Timezone-aware DateTime columns of this engine keep instants (``_UtcSqliteDateTime``)."""
    dialect = engine.sync_engine.dialect
    dialect.colspecs = {**dialect.colspecs, sqltypes.DateTime: _UtcSqliteDateTime}


def _sqlite_attach(engine: AsyncEngine, url: str) -> None:
    """Attach ``<schema>.db`` beside the main SQLite file for every schema."""
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ValueError("embedded mode needs a SQLite file path, e.g. sqlite+aiosqlite:///x.db")
    folder = Path(database).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record):  # noqa: ANN001
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.fetchall()
        cursor.execute("PRAGMA foreign_keys=ON")
        for schema in SCHEMAS:
            cursor.execute(f"ATTACH DATABASE '{folder / (schema + '.db')}' AS {schema}")
            # WAL is per database file: without it, readers of one service's file block
            # writers of it, and the embedded services stall each other.
            cursor.execute(f"PRAGMA {schema}.journal_mode=WAL")
            cursor.fetchall()
        cursor.close()


# A pooled PostgreSQL connection idle longer than this is pinged before use; busier ones are not.
IDLE_PING_SECONDS = 10.0
# Connections are replaced after this long, so server-side idle timeouts never bite.
POOL_RECYCLE_SECONDS = 1800


def _ping_idle_connections(engine: AsyncEngine, idle_seconds: float) -> None:
    """Survive a PostgreSQL restart without a ping on every checkout (``pool_pre_ping``).

    A connection that waited in the pool longer than ``idle_seconds`` is pinged when checked out,
    and replaced if it is dead. One in steady use is not: if the server went away under it, its
    statement fails with a disconnect error, SQLAlchemy invalidates it and every connection of
    the pool opened before the error, and the next checkout connects afresh.
    """

    @event.listens_for(engine.sync_engine, "checkin")
    def _checked_in(_dbapi_connection, record):  # noqa: ANN001
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy):  # noqa: ANN001
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < idle_seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:  # noqa: BLE001 - the pool retries with a new connection
            raise exc.DisconnectionError(f"idle pooled connection is dead: {error!r}") from error


def dialect_insert(dialect: str):  # noqa: ANN201 - postgresql.insert or sqlite.insert
    """The dialect's INSERT construct, the one with ``on_conflict_do_…`` (PostgreSQL, or SQLite
    in embedded mode): by the dialect's name (``session.bind.dialect.name``)."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


@functools.cache
def _lock_statement(shared: bool, wait: bool, count: int = 1) -> TextClause:
    fn = f"pg{'' if wait else '_try'}_advisory_xact_lock{'_shared' if shared else ''}"
    return text("SELECT " + ", ".join(f"{fn}(:k{n})" for n in range(count)))


def lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


async def xact_lock(conn: AsyncConnection | AsyncSession, name: str, *, shared: bool = False,
                    wait: bool = True) -> bool:
    """A PostgreSQL advisory lock named ``name``, held until the current transaction ends:
    exclusive or ``shared``; ``wait`` False tries once and answers whether it was taken.
    On SQLite (one writer at a time anyway) it is always taken."""
    if not wait:
        if not _is_postgres(conn):
            return True
        if (name, shared) in (_held_by(conn) or ()):
            return True
        taken = bool((await conn.execute(_lock_statement(shared, False),
                                         {"k0": lock_key(name)})).scalar())
        if taken:
            _remember(conn, [name], shared)
        return taken
    await xact_locks(conn, [name], shared=shared)
    return True


async def xact_locks(conn: AsyncConnection | AsyncSession, names: list[str], *,
                     shared: bool = False) -> None:
    """``xact_lock`` of each of ``names`` (waiting), taken in that order with one statement:
    one round trip where a unit of work needs several locks at its start."""
    if not _is_postgres(conn):
        return
    held = _held_by(conn) or set()
    wanted = [n for n in dict.fromkeys(names) if (n, shared) not in held]
    if not wanted:
        return  # taken earlier in this transaction (a consumer batch: once per practice)
    await conn.execute(_lock_statement(shared, True, len(wanted)),
                       {f"k{n}": lock_key(name) for n, name in enumerate(wanted)})
    _remember(conn, wanted, shared)


def _is_postgres(conn: AsyncConnection | AsyncSession) -> bool:
    dialect = conn.bind.dialect if isinstance(conn, AsyncSession) else conn.dialect
    return dialect.name == "postgresql"


def _remember(conn: AsyncConnection | AsyncSession, names: list[str], shared: bool) -> None:
    held = _held_by(conn)
    if held is not None:
        held.update((name, shared) for name in names)


# The advisory locks a session's transaction holds (by name and mode), kept only while no
# savepoint is open: rolling a savepoint back releases what was taken inside it.
_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _held_by(conn: AsyncConnection | AsyncSession) -> set[tuple[str, bool]] | None:
    if not isinstance(conn, AsyncSession):
        return None
    session = conn.sync_session
    transaction = session.get_transaction()
    if transaction is None or session.in_nested_transaction():
        return None
    return _HELD.setdefault(transaction, set())


def schema_of(bind: AsyncConnection | AsyncSession) -> str | None:
    """The schema the engine's ``schema_translate_map`` puts a service's tables in (None when it
    has none), for SQL written by hand (COPY, ``unnest`` inserts)."""
    source = bind.bind if isinstance(bind, AsyncSession) else bind.sync_connection
    return (source.get_execution_options().get("schema_translate_map") or {}).get(None)


def qualified(schema: str | None, table: str) -> str:
    """``"schema"."table"`` (or ``"table"`` without a schema), for SQL written by hand."""
    return f'"{schema}"."{table}"' if schema else f'"{table}"'


# The largest consumer batch (CCM_CONSUMER_BATCH_SIZE, at most 1,000) uses 2,000 savepoint texts;
# the rest is room for the service's own statements. Savepoint statements cost PostgreSQL next
# to nothing to keep.
PREPARED_STATEMENTS_PER_CONNECTION = 2_100


def behind_transaction_pooler(url: str | URL) -> bool:
    """The URL says connections go through a transaction-mode pooler such as PgBouncer
    (``?prepared_statement_cache_size=0``): consecutive statements outside a transaction may
    reach different server connections, and no prepared statement may outlive its transaction."""
    return make_url(url).query.get("prepared_statement_cache_size") == "0"


def autocommit_engine(engine: AsyncEngine) -> AsyncEngine | None:
    """``engine`` in autocommit mode, for single statements that are atomic on their own (no
    BEGIN and COMMIT round trips); None where that is not safe: SQLite, or PostgreSQL behind a
    transaction-mode pooler (outside a transaction a statement's prepare and its execution may
    reach two server connections)."""
    if engine.dialect.name != "postgresql" or behind_transaction_pooler(engine.url):
        return None
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def connect_args_for(url: str) -> dict:
    """asyncpg's connection arguments for a PostgreSQL URL.

    asyncpg prepares every statement and keeps the last N per connection. A consumer batch of
    100 events alone uses 200 statement texts (SQLAlchemy numbers its savepoints: SAVEPOINT
    sa_savepoint_1 … 100 and their RELEASE), which thrashed the default 100: every savepoint was
    a prepare plus an execute. A URL that sets ``?prepared_statement_cache_size=`` wins; with 0
    (a transaction-mode pooler) asyncpg's own statement cache is off too and every statement it
    prepares has a name of its own, as SQLAlchemy documents for PgBouncer (the dialect's cache
    alone left asyncpg's, and PgBouncer answered "prepared statement … already exists")."""
    if behind_transaction_pooler(url):
        return {"statement_cache_size": 0,
                "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__"}
    if "prepared_statement_cache_size" in make_url(url).query:
        return {}
    return {"prepared_statement_cache_size": PREPARED_STATEMENTS_PER_CONNECTION}


# SQLSTATEs of a transaction the database rolled back so that a concurrent one could go on:
# deadlock_detected, serialization_failure. Sent again, the same work normally succeeds.
_GAVE_WAY = ("40P01", "40001")


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of ``exc`` (a SQLAlchemy DBAPIError, or what it wraps)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for name in ("sqlstate", "pgcode"):
            if isinstance(code := getattr(current, name, None), str):
                return code
        current = getattr(current, "orig", None) or current.__cause__
    return None


def described(error: BaseException) -> str:
    """An error as its type, and its SQLSTATE when it has one: nothing of the data it was
    about."""
    code = sqlstate(error)
    return f"{type(error).__name__} (SQLSTATE {code})" if code else type(error).__name__


def loggable(error: BaseException, limit: int = 300) -> str:
    """What a log line may say of an infrastructure error: a database statement's error
    ``described`` (SQLAlchemy's text quotes the statement and its parameters: an event's data,
    a patient's), any other error's own words (a connection's host and port)."""
    if isinstance(error, exc.StatementError):
        return described(error)
    return str(error)[:limit]


def gave_way(exc: BaseException) -> bool:
    """Whether ``exc`` is a deadlock or serialization failure: nothing was stored, and the same
    transaction may be tried again."""
    return sqlstate(exc) in _GAVE_WAY


def giving_way(attempts: int, *, what: str, **fields: str) -> AsyncRetrying:
    """Runs of a unit of work that rolled back because it ``gave_way`` to a concurrent one
    (nothing was stored), at most ``attempts``, after a short random pause growing with each
    run; any other error, and the last run's, is raised (the HTTP layer answers a deadlock or
    serialization failure 503 with Retry-After). ``what`` and ``fields`` (ids only) name the
    work in the log line of a run again::

        async for attempt in giving_way(3, what="transaction", practice=practice):
            with attempt:
                async with db.unit_of_work() as uow:
                    ...
    """

    def pause(state: RetryCallState) -> float:
        return random.uniform(0.005, 0.05) * state.attempt_number

    def again(state: RetryCallState) -> None:
        _log.info(f"{what} gave way to a concurrent one; running it again",
                  attempt=state.attempt_number, **fields)

    return AsyncRetrying(retry=retry_if_exception(gave_way), stop=stop_after_attempt(attempts),
                         wait=pause, before_sleep=again, reraise=True)


# SQLSTATEs of a value the database cannot store as sent (data exceptions): too long for its
# column, a number out of range, a date or time out of range, a NUL or a character the
# encoding lacks. The request's values are what reach the database, so it is told (422), not
# answered 500 as if the server had failed.
REFUSED_VALUES = {"22000": "a value cannot be stored as sent (e.g. a number out of range, or a "
                           "lone surrogate in a text)",
                  "22001": "a value is longer than the database keeps",
                  "22003": "a number is out of the range the database keeps",
                  "22008": "a date or time is out of the range the database keeps",
                  "22021": "a text has a character the database cannot store (e.g. NUL)",
                  "22P05": "a text has a character the database cannot store (e.g. NUL)"}


def create_engine_for(
    url: str,
    *,
    schema: str | None,
    pool_size: int = 10,
    idle_ping_seconds: float = IDLE_PING_SECONDS,
) -> AsyncEngine:
    """An engine whose unqualified tables live in ``schema``."""
    # hide_parameters: a statement's values (patients' names, notes) stay out of the message
    # of a database error, which the error log writes.
    if is_sqlite(url):
        engine = create_async_engine(url, hide_parameters=True)
        _sqlite_instants(engine)
        _sqlite_attach(engine, url)
    else:
        # Up to twice ``pool_size`` connections, as with an overflow of ``pool_size``, but
        # kept once opened: an overflow connection is closed when it comes back, so a busy
        # process opened (forked, authenticated, type-introspected) a new PostgreSQL backend
        # every few requests — 316 for 2,000 concurrent FHIR POSTs, measured.
        engine = create_async_engine(
            url, pool_size=2 * pool_size, max_overflow=0, pool_recycle=POOL_RECYCLE_SECONDS,
            connect_args=connect_args_for(url), hide_parameters=True,
        )
        _ping_idle_connections(engine, idle_ping_seconds)
    if schema is not None:
        engine = engine.execution_options(schema_translate_map={None: schema})
    return engine


class Database:
    """Engine and session factory of one service schema."""

    def __init__(self, url: str, *, schema: str, pool_size: int = 10) -> None:
        self.url = url
        self.schema = schema
        self.engine = create_engine_for(url, schema=schema, pool_size=pool_size)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


class UnitOfWork:
    """One transaction: state changes, outbox rows and inbox rows commit together or not at all.

    Handlers never commit; whoever opened the unit of work (a request or a consumed message) does.
    Leaving the block without ``commit()`` rolls back.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.session: AsyncSession
        self.outbox: Outbox
        self._committed = False

    async def __aenter__(self) -> UnitOfWork:
        from ccm_shared.outbox import Outbox

        self.session = self.db.sessions()
        await self.session.begin()
        self.outbox = Outbox(self.session)
        self._committed = False
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        try:
            if not self._committed:
                await self.session.rollback()
        finally:
            await self.session.close()

    async def commit(self) -> None:
        await self.session.commit()
        self._committed = True

    async def rollback(self) -> None:
        await self.session.rollback()


Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """Group commit: items submitted while a batch of the same key is being committed go
    together in the next batch (at most ``max_batch``), which ``commit`` stores in one
    transaction, returning one result per item. ``submit`` returns an item's result only once
    its batch committed, so nothing is acknowledged before it is durable; idle, a batch is one
    item, under load one COMMIT serves many. When ``commit`` raises for a batch, each of its
    items is committed alone, so an item fails only for its own reasons.
    """

    def __init__(
        self,
        commit: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        max_batch: int = 100,
        name: str = "group-commit",
    ) -> None:
        self.commit = commit
        self.max_batch = max_batch
        self.name = name
        self._queues: dict[Hashable, list[tuple[Item, asyncio.Future]]] = {}
        self._drainers: dict[Hashable, asyncio.Task] = {}

    async def submit(self, item: Item, key: Hashable = None) -> Result:
        done = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append((item, done))
        drainer = self._drainers.get(key)
        if drainer is None or drainer.done():
            # A task of its own: a cancelled caller must not stop the others' batch.
            self._drainers[key] = asyncio.create_task(self._drain(key), name=self.name)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:  # committed all the same; nobody waits for the result
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    async def flush(self) -> None:
        """Wait until every item submitted so far is committed (or has failed)."""
        while pending := [t for t in self._drainers.values() if not t.done()]:
            await asyncio.wait(pending)

    async def _drain(self, key: Hashable) -> None:
        try:
            while queue := self._queues.get(key):
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                await self._commit_batch(batch)
        finally:
            if not self._queues.get(key):
                self._queues.pop(key, None)
                self._drainers.pop(key, None)

    async def _commit_batch(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await self.commit([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each item on its own, with its own result
            if len(batch) == 1:
                _settle(batch[0][1], error=exc)
                return
            for item, done in batch:
                try:
                    (result,) = await self.commit([item])
                except Exception as alone:  # noqa: BLE001 - that caller's answer
                    _settle(done, error=alone)
                else:
                    _settle(done, result)
            return
        for (_, done), result in zip(batch, results, strict=True):
            _settle(done, result)


def _settle(
    done: asyncio.Future, result: Any = None, *, error: BaseException | None = None
) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


@asynccontextmanager
async def connect(url: str, *, schema: str) -> AsyncIterator[Database]:
    db = Database(url, schema=schema)
    try:
        yield db
    finally:
        await db.dispose()
