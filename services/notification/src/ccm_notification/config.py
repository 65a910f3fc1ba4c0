"""The notification service's own settings (environment prefix ``CCM_NOTIFICATION_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ccm_notification.domain.kinds import KINDS


class NotificationSettings(BaseSettings):
    """Every setting is documented in services/notification/README.md."""

    model_config = SettingsConfigDict(env_prefix="CCM_NOTIFICATION_", extra="ignore", frozen=True)

    smtp_host: str = Field("localhost", description="SMTP server host")
    smtp_port: int = Field(587, gt=0, le=65535,
                           description="SMTP server port (587 submission, 465 TLS)")
    smtp_starttls: bool = Field(True, description="Upgrade the connection with STARTTLS")
    smtp_implicit_tls: bool = Field(False, description="TLS from the first byte (port 465)")
    smtp_username: str | None = Field(None, description="SMTP AUTH user; unset: no AUTH")
    smtp_password: str | None = Field(None, description="SMTP AUTH password")
    smtp_timeout_seconds: float = Field(30.0, gt=0, description="SMTP connect/command timeout")
    mail_from: str = Field("CCM Notifications <notifications@localhost>",
                           description="From address of every email")
    public_base_url: str = Field("http://localhost:8084",
                                 description="Base URL of this service as providers reach it "
                                             "(acknowledgement and call-slot links)")
    link_ttl_hours: float = Field(72.0, gt=0, description="Lifetime of signed links")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Webhook/FHIR request timeout")
    email_max_attempts: int = Field(6, ge=1, description="Email delivery attempts before failing")
    webhook_max_attempts: int = Field(8, ge=1, description="Webhook attempts before failing")
    fhir_max_attempts: int = Field(8, ge=1, description="FHIR Communication attempts")
    retry_backoff_seconds: float = Field(30.0, ge=0, description="First retry delay; doubles")
    retry_backoff_max_seconds: float = Field(3600.0, ge=0, description="Largest retry delay")
    dispatch_interval_seconds: float = Field(1.0, gt=0, description="Dispatcher poll interval")
    dispatch_batch_size: int = Field(50, gt=0, description="Messages claimed per dispatch pass")
    sending_lease_seconds: float = Field(300.0, gt=0,
                                         description="A claimed message not finished within this "
                                                     "is retried (crash recovery)")
    ack_kinds: str = Field(
        ",".join(k.name for k in KINDS.values() if k.time_sensitive),
        description="Kinds that need acknowledgement unless a practice policy says otherwise "
        "(comma-separated)",
    )
    ack_sla_minutes: int = Field(240, gt=0, description="Default acknowledgement SLA")
    ack_sweep_interval_seconds: float = Field(30.0, gt=0,
                                              description="How often overdue acks are checked")

    subscription_pause_after_failures: int = Field(
        10, ge=1, description="A webhook subscription is paused after this many consecutive "
        "failed deliveries (retried with the backoff above until then)")
    subscription_require_https: bool = Field(
        True, description="Subscription endpoints must be https:// (false: http:// allowed too)")
    subscription_batch_size: int = Field(
        100, gt=0, description="Events delivered per subscription per dispatch pass")
    max_subscriptions_per_practice: int = Field(20, gt=0, description="Subscriptions per practice")
    subscription_retention_days: float = Field(
        90.0, ge=0, description="A webhook subscription's notification (its replay copy, "
        "`/events`) and the log of its delivery attempts are deleted this many days after the "
        "event was delivered (0: kept forever); an event not yet delivered is never deleted")
    practice_topic_partitions: int = Field(
        1, ge=1, description="Partitions of a per-practice topic created by the service (1 keeps "
        "the practice's whole feed in one order)")
    practice_topic_replication: int = Field(
        1, ge=1, description="Replication factor of per-practice topics (3 in production)")
    practice_feed_hold_seconds: float = Field(
        30.0, ge=0, description="How long the practice feed holds a billing event for the ones "
        "billing numbered before it (they travel on other topics) before numbering it anyway")
    practice_topic_refresh_seconds: float = Field(
        0.0, ge=0, description="If > 0: how often the topics of every registered practice are "
        "ensured (0: off; topics are created at a practice's first event or by "
        "`ccm notification practice-topics`)")

    def max_attempts(self, channel: str) -> int:
        return {"email": self.email_max_attempts, "webhook": self.webhook_max_attempts,
                "fhir": self.fhir_max_attempts}[channel]

    @property
    def ack_kind_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.ack_kinds.split(",") if k.strip())
