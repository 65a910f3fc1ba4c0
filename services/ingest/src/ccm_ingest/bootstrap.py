"""Composition root of the ingest service (the `ccm.services` entry point)."""

from ccm_shared.service import ServiceDefinition

from ccm_ingest.adapters.orm import metadata

SERVICE = ServiceDefinition(
    name="ingest",
    port=8081,
    description="FHIR R4 push API for EHRs: validated, versioned, idempotent; mapped to CCM events.",
    metadata=metadata,
    migrations_package="ccm_ingest.migrations",
)
