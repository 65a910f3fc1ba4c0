"""The careplan service's own settings (environment prefix ``CCM_CAREPLAN_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CareplanSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CCM_CAREPLAN_", extra="ignore", frozen=True)

    scheduler_enabled: bool = Field(
        True, description="Run the review scheduler in this process (any number of replicas may)")
    scheduler_interval_seconds: float = Field(
        300.0, gt=0, le=86_400, description="Seconds between scheduler passes")
    scheduler_batch_size: int = Field(
        200, gt=0, le=5_000, description="Plans locked and processed per scheduler transaction")
