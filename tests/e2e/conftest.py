"""The four services as separate `ccm serve` processes on the real Kafka and PostgreSQL, plus a
real SMTP server and an HTTP webhook receiver on loopback ports. Tests talk to them over HTTP
and Kafka only; each test uses its own practice."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ccm_shared.db import create_engine_for
from ccm_shared.tenancy import Pricing, create_practice, create_token
from tests.e2e.processes import ROOT, Process, free_port, wait_ready
from tests.support.infra import start_infra

SERVICES = ("ingest", "billing", "careplan", "notification")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        platform = item.funcargs.get("platform")
        if platform is not None:  # the services' logs explain most e2e failures
            for name, proc in platform.processes.items():
                report.sections.append((f"log of {name}", proc.tail(8000)))


class Mailbox:
    """An aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.messages: list = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802, ANN001, ANN201
        with self.lock:
            self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def to(self, address: str) -> list:
        with self.lock:
            return [m for m in self.messages if address in m.get("To", "")]


class WebhookInbox:
    """An HTTP receiver keeping every POST (path, headers, body)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802, ANN202
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                inbox.calls.append({"path": self.path, "headers": dict(self.headers),
                                    "body": body})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):  # noqa: ANN002, ANN202
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def to(self, path: str) -> list[dict]:
        return [c for c in self.calls if c["path"] == path]


@dataclass
class Platform:
    env: dict[str, str]
    urls: dict[str, str]
    processes: dict[str, Process]
    mailbox: Mailbox
    webhooks: WebhookInbox
    database_url: str
    kafka: str
    practices: list[str] = field(default_factory=list)

    def restart(self, name: str, *, kill: bool = True) -> None:
        proc = self.processes[name]
        proc.kill() if kill else proc.stop()
        proc.start()
        wait_ready(self.urls[name], proc)

    def new_practice(self, timezone: str = "America/Chicago") -> tuple[str, str]:
        """A fresh practice (35 % of Medicare) and a token for it."""
        practice = f"e2e-{uuid.uuid4().hex[:10]}"

        async def make() -> str:
            engine = create_engine_for(self.database_url, schema=None)
            try:
                await create_practice(engine, practice_id=practice, name="E2E Clinic",
                                      timezone=timezone, pricing=Pricing(
                                          model="percent-of-medicare", percent=35))
                return await create_token(engine, practice_id=practice, label="e2e")
            finally:
                await engine.dispose()

        token = asyncio.run(make())
        self.practices.append(practice)
        return practice, token


def consumer_groups() -> dict[str, list[str]]:
    """Consumer group → topics, from the AsyncAPI document as the code describes it now."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["uv", "run", "--frozen", "--no-sync", "ccm", "contracts", "--out", out],
                       cwd=ROOT, check=True, capture_output=True, timeout=120)
        doc = json.loads((Path(out) / "asyncapi.json").read_text())
    groups: dict[str, list[str]] = {}
    for op in doc["operations"].values():
        if op.get("action") == "receive" and op.get("x-consumer-group"):
            topic = op["channel"]["$ref"].rsplit("/", 1)[-1]
            groups.setdefault(op["x-consumer-group"], []).append(topic)
    return groups


async def start_groups_at_end(bootstrap: str, groups: dict[str, list[str]]) -> None:
    """The services' groups skip what other test runs left on the shared broker: each test
    makes a fresh practice, so only events from now on concern it."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = sorted({t for topics in groups.values() for t in topics} & existing)
        described = await admin.describe_topics(wanted) if wanted else []
    finally:
        await admin.close()
    partitions: dict[str, list] = {}
    for d in described:
        partitions[d["topic"]] = [TopicPartition(d["topic"], p["partition"])
                                  for p in d["partitions"]]
    for group, topics in groups.items():
        parts = [tp for t in topics for tp in partitions.get(t, [])]
        if not parts:
            continue
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            await consumer.commit(dict(ends))
        finally:
            await consumer.stop()


@pytest.fixture(scope="session")
def platform(tmp_path_factory):
    from aiosmtpd.controller import Controller

    infra = start_infra()
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    webhooks = WebhookInbox()
    ports = {name: free_port() for name in SERVICES}
    urls = {name: f"http://127.0.0.1:{p}" for name, p in ports.items()}
    env = dict(os.environ) | {
        "CCM_ENV": "test",
        "CCM_DATABASE_URL": infra.database_url,
        "CCM_KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers,
        "CCM_LOG_LEVEL": "INFO",
        "CCM_OUTBOX_POLL_INTERVAL_SECONDS": "0.1",
        "CCM_NOTIFICATION_SMTP_HOST": "127.0.0.1",
        "CCM_NOTIFICATION_SMTP_PORT": str(smtp.port),
        "CCM_NOTIFICATION_SMTP_STARTTLS": "false",
        "CCM_NOTIFICATION_DISPATCH_INTERVAL_SECONDS": "0.3",
        "CCM_NOTIFICATION_PUBLIC_BASE_URL": urls["notification"],
        "CCM_NOTIFICATION_SUBSCRIPTION_REQUIRE_HTTPS": "false",
        "CCM_CAREPLAN_SCHEDULER_INTERVAL_SECONDS": "1",
    }
    migrate = subprocess.run(["uv", "run", "--frozen", "--no-sync", "ccm", "migrate"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    asyncio.run(start_groups_at_end(infra.kafka_bootstrap_servers, consumer_groups()))
    logs = tmp_path_factory.mktemp("e2e-logs")
    processes = {
        name: Process(name, ["ccm", "serve", name, "--port", str(ports[name])], env,
                      logs / f"{name}.log")
        for name in SERVICES
    }
    for proc in processes.values():
        proc.start()
    try:
        for name, proc in processes.items():
            wait_ready(urls[name], proc, timeout=120)
        yield Platform(env, urls, processes, mailbox, webhooks, infra.database_url,
                       infra.kafka_bootstrap_servers)
    finally:
        for proc in processes.values():
            proc.stop()
        smtp.stop()
        webhooks.server.shutdown()
        infra.close()
