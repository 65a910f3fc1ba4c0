"""Composition root of the ingest service (the `ccm.services` entry point)."""

from fastapi import FastAPI

from ccm_ingest.adapters.orm import metadata
from ccm_ingest.domain.mapping import EVENT_TYPES
from ccm_ingest.entrypoints import config_api, edge, fhir_api
from ccm_ingest.entrypoints.jobs import background
from ccm_ingest.service_layer.expiry import EXPIRING
from ccm_ingest.settings import IngestSettings
from ccm_shared.service import ServiceDefinition, ServiceRuntime


def _routers(runtime: ServiceRuntime):  # noqa: ANN202
    settings: IngestSettings = runtime.service_settings()  # type: ignore[assignment]
    runtime.state.setdefault("practice_cache",
                             fhir_api.PracticeCache(settings.practice_cache_seconds))
    return (fhir_api.build_router(runtime), config_api.build_router(runtime))


def _configure(app: FastAPI, runtime: ServiceRuntime) -> None:
    edge.install(app)


SERVICE = ServiceDefinition(
    name="ingest",
    port=8081,
    description="FHIR R4 push API for EHRs: validated, versioned, idempotent; mapped to CCM "
    "events.",
    metadata=metadata,
    migrations_package="ccm_ingest.migrations",
    routers=_routers,
    configure_app=_configure,
    background=background,
    produces=(*EVENT_TYPES, EXPIRING),
    settings_model=IngestSettings,
)
