"""Settings of the billing service (environment variables ``CCM_BILLING_*``)."""

import json
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ccm_shared.tenancy import MAX_RENEWAL_MONTHS


class BillingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CCM_BILLING_", extra="ignore", frozen=True)

    alert_days: Annotated[tuple[int, ...], NoDecode] = Field(
        (7, 3), description="Days before month end at which threshold-at-risk events go out "
        "(comma-separated, e.g. 7,3, or a JSON list [7, 3])"
    )
    near_threshold_minutes: int = Field(
        10, ge=1, description="Worklist filter near-threshold: at most this many minutes to go"
    )
    scheduler_interval_seconds: float = Field(
        300.0, gt=0, description="How often threshold alerts and overdue invoices are checked"
    )
    decide_interval_seconds: float = Field(
        60.0, gt=0, description="How often the decisions of open months are brought up to date "
        "(changed patients only), so that a month close only files and invoices"
    )

    ehr_push_interval_seconds: float = Field(
        10.0, gt=0, description="How often due EHR pushes of Invoices are sent"
    )
    ehr_push_max_attempts: int = Field(8, ge=1, description="Attempts before a push is marked failed")
    ehr_push_backoff_seconds: float = Field(
        30.0, gt=0, description="First retry delay of a failed EHR push; doubles per attempt"
    )
    ehr_push_backoff_max_seconds: float = Field(3600.0, gt=0, description="Largest retry delay")
    ehr_push_timeout_seconds: float = Field(15.0, gt=0, description="HTTP timeout of one push")

    fhir_base_url: str | None = Field(
        None, description="Public base URL of billing's /fhir, for the absolute fullUrl of "
        "searchset entries (default: from the request, e.g. http://127.0.0.1:8082/fhir)"
    )

    consent_renewal_months: int = Field(
        0, ge=0, le=MAX_RENEWAL_MONTHS,
        description="Consent renewal interval in months (0: consents do not "
        "expire; at most 1,200); a practice overrides it with pricing rules.consent_renewal_months"
    )
    consent_expiring_days: int = Field(
        30, ge=0, description="Consent tracker: 'expiring' means expiring within this many days"
    )

    @field_validator("fhir_base_url")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("an absolute http(s) URL, e.g. https://billing.example.org/fhir")
        return v

    @field_validator("alert_days", mode="before")
    @classmethod
    def _list(cls, v: object) -> object:
        if not isinstance(v, str):
            return v
        if v.strip().startswith("["):
            try:
                return json.loads(v)
            except ValueError:
                raise ValueError("not a JSON list of days such as [7, 3]") from None
        return [d.strip() for d in v.split(",") if d.strip()]

    @field_validator("alert_days")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in v):
            raise ValueError("alert days must be >= 0")
        return tuple(sorted(set(v), reverse=True))
