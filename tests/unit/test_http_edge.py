"""The HTTP edge on the embedded database: auth, tenancy, errors, limits, operations routes."""

import httpx
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_shared.http import json_depth
from ccm_shared.migrate import upgrade_async, upgrade_platform
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token
from ccm_shared.transport import InProcessTransport
from tests.support.embedded import embedded_runtime


@pytest_asyncio.fixture
async def client(tmp_path):
    runtime = await embedded_runtime(tmp_path, "ingest", max_body_bytes=1000)
    for pid in ("alpha", "beta"):
        await create_practice(runtime.db.engine, practice_id=pid, name=pid.title(),
                              timezone="America/New_York", pricing=Pricing())
    tokens = {pid: await create_token(runtime.db.engine, practice_id=pid) for pid in ("alpha", "beta")}
    transport = httpx.ASGITransport(app=runtime.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        c.tokens = tokens
        yield c
    await runtime.db.dispose()


def auth(token):
    return {"Authorization": f"Bearer {token}"}


async def test_own_practice_is_readable(client):
    r = await client.get("/v1/practices/alpha", headers=auth(client.tokens["alpha"]))
    assert r.status_code == 200 and r.json()["timezone"] == "America/New_York"


async def test_other_practice_answers_not_found(client):
    r = await client.get("/v1/practices/beta", headers=auth(client.tokens["alpha"]))
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer ccm_wrong"},
                                     {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}])
async def test_missing_or_wrong_token_answers_401(client, headers):
    r = await client.get("/v1/practices/alpha", headers=headers)
    assert r.status_code == 401
    assert r.json()["status"] == 401
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_oversized_body_answers_413(client):
    r = await client.post("/v1/practices/alpha", content=b"x" * 2000,
                          headers=auth(client.tokens["alpha"]))
    assert r.status_code == 413
    assert r.json()["title"] == "Payload too large"


async def test_correlation_id_is_echoed(client):
    r = await client.get("/healthz", headers={"X-Correlation-ID": "abc123"})
    assert r.headers["x-correlation-id"] == "abc123"


async def test_readyz_reports_database(client):
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["database"] == "ok"


async def test_metrics_are_exported(client):
    await client.get("/healthz")
    body = (await client.get("/metrics")).text
    assert "ccm_http_requests_total" in body and "ccm_outbox_backlog" in body


def test_json_depth_limit():
    deep = current = {}
    for _ in range(100):
        current["a"] = {}
        current = current["a"]
    with pytest.raises(ValueError, match="deeper than 64"):
        json_depth(deep, 64)
    assert json_depth({"a": [1, {"b": 2}]}, 64) == 4


def _depth_by_definition(value: object) -> int:
    """Every value one level below its container, a scalar or empty container itself 1."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max((_depth_by_definition(v) for v in value), default=0)
    return 1


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner,
                                                                max_size=3),
    max_leaves=30)


@settings(max_examples=300)
@given(JSON_VALUES, st.integers(min_value=1, max_value=8))
def test_json_depth_matches_its_definition_and_the_limit(value, limit):
    depth = _depth_by_definition(value)
    if depth > limit:
        with pytest.raises(ValueError, match=f"deeper than {limit}"):
            json_depth(value, limit)
    else:
        assert json_depth(value, limit) == depth


async def test_process_without_api_serves_only_operations_endpoints(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/platform.db"
    runtime = ServiceRuntime.build(discover_services()["billing"], load_settings(database_url=url),
                                   transport=InProcessTransport())
    app = runtime.app(operations_only=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/v1/practices/alpha")).status_code == 404
    await runtime.db.dispose()


# ---- bearer tokens are cached for a few seconds (CCM_AUTH_CACHE_SECONDS) --------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def revoke(engine, token):
    from datetime import UTC, datetime

    from sqlalchemy import update

    from ccm_shared.tables import api_tokens
    from ccm_shared.tenancy import hash_token

    async with engine.begin() as conn:
        await conn.execute(update(api_tokens).where(api_tokens.c.token_hash == hash_token(token))
                           .values(revoked_at=datetime.now(UTC)))


@pytest_asyncio.fixture
async def registry(tmp_path):
    import asyncio

    from ccm_shared.db import create_engine_for

    url = f"sqlite+aiosqlite:///{tmp_path}/platform.db"
    await asyncio.to_thread(upgrade_platform, url)
    engine = create_engine_for(url, schema=None)
    await create_practice(engine, practice_id="alpha", name="Alpha", timezone="UTC",
                          pricing=Pricing())
    yield url, engine
    await engine.dispose()


async def test_a_revoked_token_works_until_its_cache_entry_expires_then_never(registry):
    from ccm_shared.tenancy import TokenCache

    _, engine = registry
    token = await create_token(engine, practice_id="alpha", label="epic")
    clock = FakeClock()
    cache = TokenCache(10, clock=clock)
    assert (await cache.resolve(engine, token)).practice_id == "alpha"
    await revoke(engine, token)
    clock.now += 9.9
    assert (await cache.resolve(engine, token)).label == "epic"  # cached: not asked yet
    clock.now += 0.2
    assert await cache.resolve(engine, token) is None  # 10 s after it was resolved
    assert len(cache) == 0
    clock.now += 100
    assert await cache.resolve(engine, token) is None


async def test_unknown_tokens_are_never_cached_and_a_zero_ttl_asks_every_time(registry):
    from ccm_shared.tenancy import TokenCache

    _, engine = registry
    cache = TokenCache(10, clock=FakeClock())
    assert await cache.resolve(engine, "ccm_not-a-token") is None
    assert len(cache) == 0
    token = await create_token(engine, practice_id="alpha")
    off = TokenCache(0, clock=FakeClock())
    assert await off.resolve(engine, token) is not None
    await revoke(engine, token)
    assert await off.resolve(engine, token) is None  # at once, without any time passing


async def test_the_cache_keeps_at_most_max_entries_dropping_the_least_recently_used(registry):
    from ccm_shared.tenancy import TokenCache

    _, engine = registry
    first, second, third = [await create_token(engine, practice_id="alpha") for _ in range(3)]
    cache = TokenCache(60, max_entries=2, clock=FakeClock())
    for token in (first, second, first, third):  # second is now the least recently used
        assert await cache.resolve(engine, token) is not None
    assert len(cache) == 2
    for token in (first, second, third):
        await revoke(engine, token)
    assert await cache.resolve(engine, first) is not None  # still cached
    assert await cache.resolve(engine, third) is not None
    assert await cache.resolve(engine, second) is None  # evicted: asked the database again


async def test_the_api_caches_tokens_for_the_configured_seconds(registry):
    from ccm_shared.tenancy import TokenCache

    url, engine = registry
    ingest = discover_services()["ingest"]
    await upgrade_async(url, ingest.schema, ingest.migrations_package)
    token = await create_token(engine, practice_id="alpha")
    for seconds, after_revocation in ((30.0, 200), (0.0, 401)):
        runtime = ServiceRuntime.build(
            ingest, load_settings(database_url=url, auth_cache_seconds=seconds),
            transport=InProcessTransport())
        app = runtime.app()
        cache = app.state.token_cache
        assert isinstance(cache, TokenCache) and cache.ttl == seconds
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            assert (await c.get("/v1/practices/alpha", headers=auth(token))).status_code == 200
            await revoke(engine, token)
            r = await c.get("/v1/practices/alpha", headers=auth(token))
            assert r.status_code == after_revocation
            cache.clock = lambda: float("inf")  # long after: every entry has expired
            assert (await c.get("/v1/practices/alpha", headers=auth(token))).status_code == 401
        await runtime.db.dispose()
        token = await create_token(engine, practice_id="alpha")


async def test_a_correlation_id_that_is_no_plain_token_is_replaced(client):
    """It goes into every log line and event of the request: bytes that are no UTF-8 answered
    500 on every route."""
    for sent in (b"\xff", b"two words", b"a\x1bb"):
        r = await client.get("/healthz", headers=[(b"X-Correlation-ID", sent)])
        assert r.status_code == 200
        assert r.headers["x-correlation-id"] not in (sent.decode("latin-1"), "")
    trace = b"Root=1-67891233-abcdef012345678912345678;Parent=53995c3f42cd8ad8;Sampled=1"
    r = await client.get("/healthz", headers=[(b"X-Correlation-ID", trace)])
    assert r.headers["x-correlation-id"] == trace[:64].decode()  # kept, cut to 64


async def test_audit_paging_beyond_any_id_is_refused_not_500(client):
    r = await client.get("/v1/practices/alpha/audit-events",
                         params={"before": str(2**63)}, headers=auth(client.tokens["alpha"]))
    assert r.status_code == 422, r.text


class _GaveWay(Exception):
    sqlstate = "40P01"  # deadlock_detected, as asyncpg's errors carry it


@pytest.mark.parametrize(("path", "media"), [("/v1/gave-way", "application/problem+json"),
                                             ("/fhir/a/b/c/d/gave-way", "application/fhir+json")])
async def test_a_request_the_database_rolled_back_for_another_is_told_to_retry(client, path,
                                                                               media):
    """A deadlock or serialization failure is 503 with Retry-After (nothing was stored; the
    same request may be sent again), in the endpoint's own error format, not a 500."""
    from sqlalchemy.exc import DBAPIError

    async def gave_way():
        raise DBAPIError("UPDATE …", {}, _GaveWay("deadlock detected"))

    async def broken():
        raise DBAPIError("UPDATE …", {}, Exception("something else"))

    app = client._transport.app
    app.add_api_route(path, gave_way)
    app.add_api_route(f"{path}-broken", broken)
    headers = auth(client.tokens["alpha"])  # /fhir asks for a token before any route
    r = await client.get(path, headers=headers)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.headers["content-type"].startswith(media) and "send it again" in r.text
    assert (await client.get(f"{path}-broken", headers=headers)).status_code == 500


class _TooLong(Exception):
    sqlstate = "22001"  # string_data_right_truncation


async def test_a_value_the_database_cannot_store_is_422_not_500(client):
    """A safety net under the routes' own checks: a data exception (a value too long, out of
    range, a NUL) is the request's value, refused whole (422), not a server failure."""
    from sqlalchemy.exc import DBAPIError

    async def too_long():
        raise DBAPIError("INSERT …", {}, _TooLong("value too long for type varchar(200)"))

    app = client._transport.app
    app.add_api_route("/v1/too-long", too_long)
    app.add_api_route("/fhir/a/b/c/d/too-long", too_long)
    headers = auth(client.tokens["alpha"])
    for path, media in (("/v1/too-long", "application/problem+json"),
                        ("/fhir/a/b/c/d/too-long", "application/fhir+json")):
        r = await client.get(path, headers=headers)
        assert r.status_code == 422 and r.headers["content-type"].startswith(media), r.text
        assert "longer than the database keeps" in r.text and "varchar" not in r.text


async def test_a_database_error_carries_no_values_of_the_statement(tmp_path):
    """Engines hide a statement's parameters: a database error's message (which the error log
    writes) must not carry a patient's name."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from ccm_shared.db import create_engine_for

    engine = create_engine_for(f"sqlite+aiosqlite:///{tmp_path}/x.db", schema=None)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE people (name TEXT NOT NULL UNIQUE)"))
        await conn.execute(text("INSERT INTO people VALUES (:n)"), {"n": "Jane Doe"})
        with pytest.raises(DBAPIError) as failed:
            await conn.execute(text("INSERT INTO people VALUES (:n)"), {"n": "Jane Doe"})
    await engine.dispose()
    assert "Jane" not in str(failed.value)


async def test_text_of_the_request_that_cannot_be_encoded_is_422_not_500(client):
    """A lone surrogate (JSON may escape one) fails to encode wherever it goes next (a database
    driver, an answer): the request's value, 422, never echoed."""
    async def encodes_it():
        "Jane\ud800Doe".encode()

    client._transport.app.add_api_route("/v1/encodes-it", encodes_it)
    r = await client.get("/v1/encodes-it")
    assert r.status_code == 422 and "lone surrogate" in r.text and "Jane" not in r.text


async def test_try_again_raised_by_a_route_says_when_to_retry(client):
    """Retry-After comes with every TryAgain, not only with a deadlock the platform maps (a
    service's own, e.g. a provider that kept changing under a write, had none)."""
    from ccm_shared.errors import TryAgain

    async def busy():
        raise TryAgain("the provider changed while this request wrote it; send it again")

    client._transport.app.add_api_route("/v1/busy", busy)
    r = await client.get("/v1/busy")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


@pytest.mark.parametrize(("failures", "error", "runs", "answered"), [
    (0, None, 1, "done"),  # nothing gave way: one run
    (2, "40P01", 3, "done"),  # a deadlock twice: run again each time, the third run stands
    (1, "40001", 2, "done"),  # a serialization failure: the same
    (3, "40P01", 3, "40P01"),  # still at the last run: its error is raised (503 upstream)
    (1, "23505", 1, "23505"),  # any other database error: raised at once, never run again
])
async def test_a_unit_of_work_that_gave_way_is_run_again_a_bounded_number_of_times(
        failures, error, runs, answered):
    from sqlalchemy.exc import DBAPIError

    from ccm_shared.db import giving_way, sqlstate

    class _Failed(Exception):
        def __init__(self, code: str) -> None:
            super().__init__(code)
            self.sqlstate = code

    calls = 0

    async def unit_of_work() -> str:
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise DBAPIError("UPDATE …", {}, _Failed(error))
        return "done"

    try:
        async for attempt in giving_way(3, what="test", practice="alpha"):
            with attempt:
                result = await unit_of_work()
    except DBAPIError as exc:
        result = sqlstate(exc)
    assert (calls, result) == (runs, answered)


async def test_readiness_asks_the_database_and_kafka_at_once(tmp_path, monkeypatch):
    """One after the other they took up to 5 s each, past the probe's timeout: a database ping
    that can only answer while Kafka's is in flight shows they are asked together."""
    import asyncio

    runtime = await embedded_runtime(tmp_path, "ingest")
    kafka_asked = asyncio.Event()

    async def database_ping() -> None:
        await kafka_asked.wait()

    async def kafka_ping() -> None:
        kafka_asked.set()

    monkeypatch.setattr(runtime.db, "ping", database_ping)
    monkeypatch.setattr(runtime.transport, "ping", kafka_ping, raising=False)
    monkeypatch.setattr(runtime, "_uses_broker", True)
    try:
        checks = await runtime.readiness()
    finally:
        await runtime.db.dispose()
    assert (checks["database"], checks["kafka"]) == ("ok", "ok")


async def test_an_audit_entry_that_cannot_be_recorded_is_counted(client, monkeypatch):
    """The call is answered (its response was sent), the failure logged and counted: on a
    cluster whose roles could not write the audit trail, every entry was lost while /readyz
    stayed 200, and nothing but a log line said so."""
    from ccm_shared.audit import AuditWriter
    from ccm_shared.observability import metrics

    async def refused(self, entry):  # noqa: ANN001, ANN202
        raise PermissionError("permission denied for table audit_log")

    counted = metrics.audit_failures.labels("ingest")
    before = counted._value.get()
    monkeypatch.setattr(AuditWriter, "record", refused)
    r = await client.get("/fhir/Patient/p1", headers=auth(client.tokens["alpha"]))
    assert r.status_code == 404  # answered as ever
    assert counted._value.get() == before + 1
