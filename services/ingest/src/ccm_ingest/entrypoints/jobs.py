"""The ingest service's background job: consent expiry notices."""

from __future__ import annotations

from ccm_ingest.service_layer.expiry import expiry_pass
from ccm_shared.service import BackgroundJob, ServiceRuntime, every


def background(runtime: ServiceRuntime) -> list[BackgroundJob]:
    settings = runtime.service_settings()
    if not settings.expiry_notices_enabled:  # type: ignore[attr-defined]
        return []

    async def one_pass() -> None:
        result = await expiry_pass(runtime.db, runtime.clock())
        if result.sent and runtime.relay is not None:
            runtime.relay.notify()

    async def run(stopping) -> None:  # noqa: ANN001
        await every(stopping, settings.expiry_interval_seconds,  # type: ignore[attr-defined]
                    one_pass, failed="consent expiry pass failed; retrying", level="warning")

    return [BackgroundJob("consent-expiry", run)]
