"""ccm-platform ingest service: FHIR R4 push API for EHRs (validated, versioned, idempotent),
mapped to CCM events."""
