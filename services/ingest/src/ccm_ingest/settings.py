"""The ingest service's own settings (environment prefix ``CCM_INGEST_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class IngestSettings(BaseSettings):
    """Settings of the FHIR endpoint; the body-size and JSON-depth limits are the platform's
    ``CCM_MAX_BODY_BYTES`` (5 MB) and ``CCM_MAX_JSON_DEPTH`` (64)."""

    model_config = SettingsConfigDict(env_prefix="CCM_INGEST_", extra="ignore", frozen=True)

    max_bundle_entries: int = Field(1000, gt=0, description="Most entries in one Bundle")
    fhir_base_url: str | None = Field(
        None, description="Public base URL of /fhir for Location and fullUrl (default: from the "
        "request, e.g. http://127.0.0.1:8081/fhir); absolute references under it, or under the "
        "base a request came to, are this server's resources")
    max_clock_skew_seconds: float = Field(
        300.0, ge=0, le=86_400, description="How far ahead of the server's clock a "
        "meta.lastUpdated may be (at most a day); later ones are refused (422): a version from "
        "the future would keep every later one from applying")
    practice_cache_seconds: float = Field(
        5.0, ge=0, description="How long a practice's time zone and ingest config are cached")
    expiry_notices_enabled: bool = Field(
        True, description="Send consent expiry notices (ingest.consent.expiring.v1) from this "
        "process's background jobs (any number of replicas may: each notice goes out once)")
    expiry_interval_seconds: float = Field(
        3600.0, gt=0, le=86_400, description="Seconds between consent expiry passes")
