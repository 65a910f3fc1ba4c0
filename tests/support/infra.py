"""Real PostgreSQL and Apache Kafka for integration tests — never a fake, never a skip.

Resolution order:
1. ``CCM_DATABASE_URL`` and ``CCM_KAFKA_BOOTSTRAP_SERVERS`` set: use them (``.ci/run`` does this
   after ``deploy/local/up.sh``).
2. A Docker engine reachable: start PostgreSQL and Kafka with testcontainers.
3. Otherwise: start them with ``deploy/local/up.sh`` (Kafka jars from Maven Central, PostgreSQL
   from Debian's package) and stop them at the end of the session — unless they were already
   running (a developer's stack, another test session): those are used and left running.
Anything missing makes the tests fail with a message that says what to start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "deploy" / "local"


class KafkaControl(Protocol):
    def stop(self) -> None: ...
    def start(self) -> None: ...


def local_dir() -> Path:
    return Path(os.environ.get("CCM_LOCAL_DIR", ROOT / ".ccm-local"))


def _run(script: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [str(LOCAL / script), *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"deploy/local/{script} {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}\n{proc.stdout[-1000:]}",
            pytrace=False,
        )
    return proc.stdout


def _parse(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        line = line.removeprefix("export ").strip()
        if line.startswith("CCM_") and "=" in line:
            k, _, v = line.partition("=")
            out[k] = v.strip().strip("'\"")
    return out


class LocalKafka:
    """The broker of deploy/local/kafka.sh: stopped and started on the same port and data."""

    def stop(self) -> None:
        _run("kafka.sh", "stop")

    def kill(self) -> None:
        _run("kafka.sh", "kill")

    def start(self) -> None:
        _run("kafka.sh", "start")


class DockerKafka:
    """A testcontainers broker: paused and resumed, so its mapped port survives the outage."""

    def __init__(self, container) -> None:  # noqa: ANN001
        self.container = container

    def stop(self) -> None:
        self.container.get_wrapped_container().pause()

    def start(self) -> None:
        self.container.get_wrapped_container().unpause()


@dataclass
class Infra:
    database_url: str
    kafka_bootstrap_servers: str
    how: str
    kafka_control: KafkaControl | None = None
    _cleanup: list = field(default_factory=list)

    def require_kafka_control(self) -> KafkaControl:
        if self.kafka_control is None:
            pytest.fail(
                "this test stops and restarts the broker, which it can only do for a broker "
                "started by deploy/local/kafka.sh or testcontainers; unset "
                "CCM_KAFKA_BOOTSTRAP_SERVERS (the fixtures then start one) or point it at the "
                "broker of deploy/local/up.sh",
                pytrace=False,
            )
        return self.kafka_control

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            fn()


def _local_kafka_port() -> str | None:
    port_file = local_dir() / "kafka" / "port"
    return port_file.read_text().strip() if port_file.exists() else None


def _running_local_stack() -> dict[str, str] | None:
    """The environment of a deploy/local stack that is up now (both ports answer), else None."""
    envfile = local_dir() / "env"
    if not envfile.exists():
        return None
    env = _parse(envfile.read_text())
    try:
        kafka = env["CCM_KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)
        pg = env["CCM_DATABASE_URL"].split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)
        for host, port in (kafka, pg):
            socket.create_connection((host, int(port)), timeout=1).close()
    except (KeyError, IndexError, ValueError, OSError):
        return None
    return env


def _docker_available() -> bool:
    if not (os.path.exists("/var/run/docker.sock") or os.environ.get("DOCKER_HOST")):
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no usable engine
        return False


def _require_postgres(url: str) -> str:
    if not url.startswith("postgresql"):
        pytest.fail(
            f"integration tests need PostgreSQL, but CCM_DATABASE_URL is {url.split(':')[0]}:…; "
            "unset it (the fixtures then start PostgreSQL) or point it at a PostgreSQL server",
            pytrace=False,
        )
    return url


def start_infra() -> Infra:
    db = os.environ.get("CCM_DATABASE_URL")
    kafka = os.environ.get("CCM_KAFKA_BOOTSTRAP_SERVERS")
    if db and kafka:
        port = _local_kafka_port()
        control = LocalKafka() if port and kafka.endswith(f":{port}") else None
        return Infra(_require_postgres(db), kafka, "environment", control)
    if db or kafka:
        pytest.fail(
            "set both CCM_DATABASE_URL and CCM_KAFKA_BOOTSTRAP_SERVERS, or neither "
            "(the fixtures then start PostgreSQL and Kafka themselves)",
            pytrace=False,
        )
    if _docker_available():
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        pg = PostgresContainer("postgres:16-alpine", driver="asyncpg").start()
        kc = KafkaContainer("apache/kafka:4.1.1").with_kraft().start()
        infra = Infra(pg.get_connection_url(), kc.get_bootstrap_server(), "testcontainers",
                      DockerKafka(kc))
        infra._cleanup += [pg.stop, kc.stop]
        return infra
    running = _running_local_stack()
    if running is not None:
        return Infra(running["CCM_DATABASE_URL"], running["CCM_KAFKA_BOOTSTRAP_SERVERS"],
                     "deploy/local (already running)", LocalKafka())
    env = _parse(_run("up.sh", timeout=900))
    missing = {"CCM_DATABASE_URL", "CCM_KAFKA_BOOTSTRAP_SERVERS"} - env.keys()
    if missing:
        pytest.fail(f"deploy/local/up.sh did not print {', '.join(sorted(missing))}",
                    pytrace=False)
    infra = Infra(env["CCM_DATABASE_URL"], env["CCM_KAFKA_BOOTSTRAP_SERVERS"], "deploy/local",
                  LocalKafka())
    infra._cleanup.append(lambda: _run("down.sh"))
    return infra


@contextlib.asynccontextmanager
async def api_on_postgres(database_url: str, service, practice_prefix: str):  # noqa: ANN001, ANN201
    """A service's runtime on real PostgreSQL (its schema migrated; events on the in-process bus)
    with a fresh practice, and an HTTP client on its app with a token of that practice:
    ``(runtime, client, practice, headers)``."""
    import uuid

    import httpx

    from ccm_shared.migrate import upgrade_async
    from ccm_shared.service import ServiceRuntime
    from ccm_shared.settings import load_settings
    from ccm_shared.tenancy import Pricing, create_practice, create_token
    from ccm_shared.transport import InProcessTransport

    await upgrade_async(database_url, service.schema, service.migrations_package)
    rt = ServiceRuntime.build(service, load_settings(database_url=database_url),
                              transport=InProcessTransport())
    practice = f"{practice_prefix}-{uuid.uuid4().hex[:10]}"
    await create_practice(rt.db.engine, practice_id=practice, name=f"{practice_prefix} clinic",
                          timezone="America/New_York", pricing=Pricing())
    token = await create_token(rt.db.engine, practice_id=practice)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app()),
                                     base_url="http://api", timeout=60) as client:
            yield rt, client, practice, {"Authorization": f"Bearer {token}"}
    finally:
        await rt.db.dispose()
