"""Structured JSON logs with a correlation id, and the Prometheus metrics every service exports.

No PHI in logs: log ids, types, counts and error classes — never resource bodies, names, dates of
birth or free text from a payload. ``scrub`` enforces that for the keys that are known to be risky.
"""

from __future__ import annotations

import logging
import sys
import uuid
from contextvars import ContextVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)

# Keys that could carry PHI if a caller passed a payload to the logger by mistake.
PHI_KEYS = frozenset(
    {
        "name",
        "birthdate",
        "birth_date",
        "address",
        "telecom",
        "phone",
        "email",
        "payload",
        "body",
        "resource",
        "text",
        "note",
        "data",
        "identifier",
        "mbi",
        "ssn",
    }
)


def current_correlation_id() -> str | None:
    return _correlation_id.get()


def set_correlation_id(value: str | None) -> object:
    return _correlation_id.set(value)


def reset_correlation_id(token: object) -> None:
    _correlation_id.reset(token)  # type: ignore[arg-type]


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def _add_correlation_id(_logger, _name, event_dict):  # noqa: ANN001, ANN202
    cid = _correlation_id.get()
    if cid and "correlation_id" not in event_dict:
        event_dict["correlation_id"] = cid
    return event_dict


def scrub(_logger, _name, event_dict):  # noqa: ANN001, ANN202
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(
    level: str = "INFO", *, json: bool = True, service: str | None = None
) -> None:
    """Route stdlib and structlog logs to stderr as one JSON object per line."""
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_correlation_id,
        scrub,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs would print URLs with patient ids in query strings; our middleware logs instead.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    # httpx logs each outgoing request's full URL at INFO: webhook and subscription endpoints,
    # an EHR's address, with whatever their query strings carry.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    if service:
        structlog.contextvars.bind_contextvars(service=service)


class Metrics:
    """The platform's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "ccm_http_requests_total",
            "HTTP requests",
            ["service", "method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "ccm_http_request_duration_seconds",
            "HTTP request latency",
            ["service", "route"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "ccm_consumer_lag",
            "Messages not yet consumed",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.consumed = Counter(
            "ccm_consumer_events_total", "Events consumed", ["group", "outcome"], registry=r
        )
        self.dlq = Counter(
            "ccm_consumer_dead_lettered_total",
            "Events sent to a dead-letter topic",
            ["group", "topic"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "ccm_outbox_backlog", "Outbox events not yet published", ["service"], registry=r
        )
        self.outbox_published = Counter(
            "ccm_outbox_published_total", "Outbox events published", ["service"], registry=r
        )
        self.outbox_failures = Counter(
            "ccm_outbox_publish_failures_total", "Failed relay attempts", ["service"], registry=r
        )
        self.audit_failures = Counter(
            "ccm_audit_write_failures_total",
            "API calls answered whose audit entry could not be recorded",
            ["service"],
            registry=r,
        )


metrics = Metrics()
