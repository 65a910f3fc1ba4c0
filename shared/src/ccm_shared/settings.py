"""Configuration from the environment (prefix ``CCM_``), refused at start-up when unsafe."""

from __future__ import annotations

import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

PLACEHOLDER_SECRETS = frozenset({"", "changethis", "changeme", "secret", "dev-secret-key"})
DEV_SECRET_KEY = "dev-secret-key"
# A setting (platform or service) whose name contains one of these is a secret: `ccm config`
# shows it as ***; so is a URL query parameter named like one (…?password=…).
SECRET_WORDS = ("password", "secret", "key", "token")
# The SQLAlchemy drivers the platform runs on (ccm_shared.db): PostgreSQL and embedded SQLite.
DATABASE_DRIVERS = ("postgresql+asyncpg", "sqlite+aiosqlite")


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ConfigurationError(RuntimeError):
    """Settings that must not be used; the message says which and what to do."""


class Settings(BaseSettings):
    """Every setting the services read. Each field is documented in the README."""

    model_config = SettingsConfigDict(env_prefix="CCM_", extra="ignore", frozen=True)
    # Whether the Kafka settings are checked: not for commands that use only the database
    # (`ccm migrate`: its Kubernetes Job runs before the Kafka users and CA exist).
    checks_kafka: ClassVar[bool] = True

    env: Environment = Field(Environment.DEVELOPMENT, description="development, test or production")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL: postgresql+asyncpg://… (production) or "
        "sqlite+aiosqlite:///path/platform.db (embedded mode)",
    )
    kafka_bootstrap_servers: str | None = Field(
        None, description="Comma-separated host:port list of the Kafka brokers"
    )
    kafka_security_protocol: str = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (Strimzi KafkaUser: SCRAM-SHA-512)"
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user (the service's KafkaUser)")
    kafka_sasl_password: str | None = Field(None, description="SASL password")
    kafka_ssl_cafile: str | None = Field(
        None, description="CA bundle that signed the brokers' certificates (SSL, SASL_SSL)"
    )
    kafka_client_id_prefix: str = Field("ccm", description="Prefix of Kafka client ids")
    kafka_compression: Literal["lz4", "zstd", "gzip", "none"] = Field(
        "lz4", description="Compression of what producers send: lz4 (default), zstd, gzip or none"
    )
    secret_key: str = Field(
        DEV_SECRET_KEY, description="Key for signed links and webhook secrets; never the default"
    )
    outbound_allow_private: bool | None = Field(
        None,
        description="Outgoing requests to practices' addresses (webhooks, subscriptions, FHIR "
        "endpoints, EHR pushes) may reach loopback, private and link-local addresses; default: "
        "refused in production (CCM_ENV=production), allowed otherwise",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL"
    )
    log_json: bool = Field(True, description="JSON logs (true) or human-readable console logs")
    http_host: str = Field("127.0.0.1", description="Address the HTTP API binds to")
    http_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the HTTP API (1-65535); default: the service's own (8081-8084)",
    )
    max_body_bytes: int = Field(5 * 1024 * 1024, gt=0, description="Largest accepted request body")
    max_json_depth: int = Field(64, gt=0, description="Deepest accepted JSON nesting")
    outbox_batch_size: int = Field(1000, gt=0, le=10_000, description="Events per relay batch")
    outbox_poll_interval_seconds: float = Field(
        0.2, gt=0, description="Relay wait when the outbox is empty"
    )
    consumer_max_retries: int = Field(
        5, ge=0, description="Attempts after the first before an event goes to <topic>.dlq"
    )
    consumer_retry_backoff_seconds: float = Field(
        0.2, ge=0, description="First retry delay; doubles per attempt"
    )
    consumer_retry_backoff_max_seconds: float = Field(5.0, ge=0, description="Largest retry delay")
    consumer_batch_size: int = Field(
        100, ge=1, le=1000, description="Messages applied per transaction (PostgreSQL)"
    )
    consumer_stall_seconds: float = Field(
        120.0, gt=0, description="/readyz fails when a consumer has not polled for this long"
    )
    db_pool_size: int = Field(
        10,
        gt=0,
        description="PostgreSQL connections per process; under load up to twice as many, "
        "kept open once opened (each renewed after 30 minutes)",
    )
    auth_cache_seconds: float = Field(
        10.0,
        ge=0,
        description="How long the API keeps a resolved bearer token before asking the database "
        "again; a revoked token stops working within this time (0: ask on every request)",
    )
    outbox_retention_days: float = Field(
        7.0,
        ge=0,
        description="Outbox rows already published to Kafka are deleted after this many days "
        "(0: kept forever); unpublished rows are never deleted",
    )
    inbox_retention_days: float = Field(
        30.0,
        ge=0,
        description="Inbox rows (ids of applied events) are deleted after this many days (0: "
        "kept forever); keep it longer than Kafka's retention, so a redelivered event is still "
        "recognised as applied",
    )

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.env is Environment.DEVELOPMENT:
            return self
        problems: list[str] = []
        if not self.database_url:
            problems.append("CCM_DATABASE_URL is not set (postgresql+asyncpg://user:pass@host/db)")
        elif self.env is Environment.PRODUCTION and self.database_url.startswith("sqlite"):
            problems.append("CCM_DATABASE_URL is SQLite; production needs PostgreSQL")
        if self.checks_kafka and not self.kafka_bootstrap_servers:
            problems.append("CCM_KAFKA_BOOTSTRAP_SERVERS is not set (host:port[,host:port])")
        if self.env is Environment.PRODUCTION and self.secret_key.lower() in PLACEHOLDER_SECRETS:
            problems.append("CCM_SECRET_KEY is missing or a placeholder; set a long random value")
        if self.env is Environment.PRODUCTION and len(self.secret_key) < 32:
            problems.append("CCM_SECRET_KEY is shorter than 32 characters")
        if self.checks_kafka and self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            problems.append(
                "CCM_KAFKA_SECURITY_PROTOCOL is SASL_* but CCM_KAFKA_SASL_MECHANISM, "
                "CCM_KAFKA_SASL_USERNAME and CCM_KAFKA_SASL_PASSWORD are not all set"
            )
        if problems:
            raise ValueError(
                f"unsafe configuration for CCM_ENV={self.env.value}: " + "; ".join(problems)
            )
        return self

    @field_validator("kafka_security_protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        value = value.upper()
        if value not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
            raise ValueError("must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
        return value

    @field_validator("log_level", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url", "kafka_sasl_mechanism", "kafka_ssl_cafile", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError(
                "not a database URL; use postgresql+asyncpg://user:pass@host:5432/db or "
                "sqlite+aiosqlite:///path/platform.db"
            ) from None
        if url.drivername not in DATABASE_DRIVERS:
            raise ValueError(
                f"unsupported database {url.drivername!r}; use postgresql+asyncpg://… or "
                "sqlite+aiosqlite:///…"
            )
        if url.drivername.startswith("sqlite") and url.database in (None, "", ":memory:"):
            raise ValueError("SQLite needs a file path, e.g. sqlite+aiosqlite:///path/platform.db")
        return value

    @field_validator("kafka_ssl_cafile")
    @classmethod
    def _cafile_exists(cls, value: str | None) -> str | None:
        if cls.checks_kafka and value is not None and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @property
    def is_postgres(self) -> bool:
        return bool(self.database_url and self.database_url.startswith("postgresql"))

    @property
    def outbound_private_allowed(self) -> bool:
        """``outbound_allow_private``, else allowed outside production."""
        if self.outbound_allow_private is not None:
            return self.outbound_allow_private
        return self.env != Environment.PRODUCTION


class _DatabaseOnlySettings(Settings):
    """Settings of a command that uses only the database: its Kafka settings are read as given,
    not checked (``load_settings(kafka=False)``)."""

    checks_kafka: ClassVar[bool] = False


AnySettings = TypeVar("AnySettings", bound=BaseSettings)


def load_settings(*, kafka: bool = True, **overrides: object) -> Settings:
    """Read settings from the environment; raise ConfigurationError with a readable message.

    ``kafka`` False: for a command that uses only the database (``ccm migrate``), whose Kafka
    settings (bootstrap servers, SASL credentials, a CA file) are neither needed nor checked.
    """
    return load_service_settings(Settings if kafka else _DatabaseOnlySettings, **overrides)


def load_service_settings(model: type[AnySettings], **overrides: object) -> AnySettings:
    """Read a settings class (the platform's or a service's own, by its ``env_prefix``) from the
    environment; raise ConfigurationError naming each refused variable, one per line."""
    prefix = str(model.model_config.get("env_prefix") or "").upper()
    try:
        return model(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            name = f"{prefix}{field.upper()}" if field else "configuration"
            lines.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigurationError("\n".join(dict.fromkeys(lines))) from None
    except SettingsError as exc:  # a value pydantic-settings could not even decode (JSON)
        found = re.search(r'field "([^"]+)"', str(exc))
        name = f"{prefix}{found.group(1).upper()}" if found else "configuration"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigurationError(f"{name}: cannot be read{cause}") from None


def mask_url(url: str) -> str:
    """``url`` without its secrets: the password of ``user:password@`` and the value of every
    query parameter named like a secret (``?password=…``) become ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # user[:password]@: the password may hold '?', '/' or '@'. Up to the last '@' when no '?'
    # comes before it (a password with '@' in it); else as SQLAlchemy reads it, to the first
    # '@' (a password with '?' in it; a query's own '@' is not the userinfo's).
    last = rest.rfind("@")
    if last >= 0 and "?" not in rest[:last]:
        found = re.match(r"([^:/@]*)(:.*)?@$", rest[:last + 1], re.DOTALL)
    else:
        found = re.match(r"([^:/@]*)(:[^@]*)?@", rest)
    userinfo = ""
    if found:
        userinfo = f"{found.group(1)}{':***' if found.group(2) else ''}@"
        rest = rest[found.end():]
    head, question, query = rest.partition("?")
    head = userinfo + head
    if question:
        pairs = []
        for pair in query.split("&"):
            key, eq, _value = pair.partition("=")
            secret = eq and any(w in key.lower() for w in SECRET_WORDS)
            pairs.append(f"{key}=***" if secret else pair)
        query = "&".join(pairs)
    return f"{scheme}://{head}{question}{query}"


def masked(name: str, value: object) -> object:
    """A setting's value as it may be shown (`ccm config`, error messages), by one rule for the
    platform's and the services' settings: a setting named like a secret (SECRET_WORDS) is ***
    when set; a URL loses its password (mask_url)."""
    if value and any(w in name.lower() for w in SECRET_WORDS):
        return "***"
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
