"""A service's background tasks are supervised: one that fails is logged when it fails and
started again after a backoff (a relay that met a short database outage used to stay dead
behind a live process until the pod was replaced), while /readyz says it is restarting; an
API-only process neither starts the broker's transport nor reports it or consumers it does
not run."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import MetaData

from ccm_shared import service as service_module
from ccm_shared.service import BackgroundJob, ServiceDefinition, ServiceRuntime
from ccm_shared.settings import load_settings
from ccm_shared.transport import InProcessTransport

pytestmark = pytest.mark.asyncio


class Flaky:
    """A job failing on its first ``failures`` runs, then running until stopped."""

    def __init__(self, failures: int) -> None:
        self.failures, self.runs = failures, 0
        self.running = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise ConnectionError("the database went away")
        self.running.set()
        await stopping.wait()


class Watched(InProcessTransport):
    started = 0

    async def start(self) -> None:
        Watched.started += 1
        await super().start()


def runtime(tmp_path, job: Flaky) -> ServiceRuntime:
    definition = ServiceDefinition(
        name="flaky", port=1, description="", metadata=MetaData(), migrations_package="x",
        background=lambda _rt: [BackgroundJob("flaky", job.run)])
    settings = load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db",
                             outbox_retention_days=0, inbox_retention_days=0)
    rt = ServiceRuntime.build(definition, settings, transport=Watched())
    rt.run_audit_sealer = False
    return rt


async def test_a_failing_background_task_is_logged_and_started_again(tmp_path, monkeypatch):
    from structlog.testing import capture_logs

    monkeypatch.setattr(service_module, "TASK_RESTART_INITIAL_SECONDS", 0.2)
    job = Flaky(failures=2)
    rt = runtime(tmp_path, job)
    with capture_logs() as logged:
        await rt.start(consumers=False, relay=False)
        await asyncio.sleep(0.05)
    checks = await rt.readiness()
    assert checks["job-flaky"] == "restarting after ConnectionError", checks
    assert any(e["event"] == "background task failed; starting it again" and e["task"] ==
               "job-flaky" for e in logged), logged
    await asyncio.wait_for(job.running.wait(), timeout=5)
    assert job.runs == 3
    checks = await rt.readiness()
    assert "job-flaky" not in checks and rt.failed_tasks() == [], checks
    await rt.stop()


async def test_a_task_waiting_to_restart_stops_with_the_process(tmp_path, monkeypatch):
    monkeypatch.setattr(service_module, "TASK_RESTART_INITIAL_SECONDS", 30)
    job = Flaky(failures=1)
    rt = runtime(tmp_path, job)
    await rt.start(consumers=False, relay=False)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(rt.stop(), timeout=5)
    assert job.runs == 1


async def test_an_api_only_process_starts_no_broker_transport(tmp_path):
    Watched.started = 0
    rt = runtime(tmp_path, Flaky(failures=0))
    await rt.start(consumers=False, relay=False, background=False)
    assert Watched.started == 0
    assert set(await rt.readiness()) == {"database"}
    await rt.stop()
    await rt.start(consumers=True, relay=True, background=False)
    assert Watched.started == 1
    await rt.stop()
