"""`ccm serve` gives requests in flight a bounded time to finish on SIGTERM: uvicorn's own
default waits for them without a limit, so the grace the deployment documents (30 s, within
the pods' terminationGracePeriodSeconds) was never what the process did."""

from __future__ import annotations

from fastapi import FastAPI

from ccm_shared import cli


def test_the_servers_wait_30_seconds_for_requests_in_flight():
    config = cli._server_config(FastAPI(), host="127.0.0.1", port=8081)
    assert config.timeout_graceful_shutdown == cli.GRACEFUL_SHUTDOWN_SECONDS == 30
    assert (config.host, config.port, config.lifespan, config.access_log) == (
        "127.0.0.1", 8081, "off", False)
