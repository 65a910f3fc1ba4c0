"""Correlation ids travel from request to event to consumer; logs carry no PHI."""

import json
import logging

import structlog

from ccm_shared.consumer import ConsumerRuntime
from ccm_shared.events import CloudEvent
from ccm_shared.observability import (
    configure_logging,
    current_correlation_id,
    reset_correlation_id,
    set_correlation_id,
)
from ccm_shared.outbox import OutboxRelay
from ccm_shared.transport import InProcessTransport
from tests.support.messaging import make_event


async def test_correlation_id_flows_from_request_to_event_to_consumer(sqlite_db):
    bus = InProcessTransport()
    token = set_correlation_id("req-42")
    try:
        async with sqlite_db.unit_of_work() as uow:
            stored = await uow.outbox.add("tests.thing.happened.v1", make_event())
            await uow.commit()
    finally:
        reset_correlation_id(token)
    assert stored.correlationid == "req-42"
    await OutboxRelay(sqlite_db, bus).drain()
    [msg] = bus.messages("tests.thing.happened.v1")
    assert msg.header("correlation-id") == b"req-42"

    seen = []

    async def handler(event: CloudEvent, uow) -> None:
        seen.append(current_correlation_id())

    runtime = ConsumerRuntime(name="corr", topics=["tests.thing.happened.v1"], handler=handler,
                              db=sqlite_db, transport=bus, poll_timeout=0.01)
    await runtime.start()
    await runtime.run_once()
    assert seen == ["req-42"]
    assert current_correlation_id() is None


def test_logs_are_json_with_correlation_id_and_phi_keys_redacted(capsys):
    configure_logging("INFO", json=True, service="tests")
    token = set_correlation_id("c-1")
    try:
        structlog.get_logger("t").info("patient seen", name="Jane Doe", birthDate="1950-01-01",
                                        resource={"x": 1}, count=3)
    finally:
        reset_correlation_id(token)
        structlog.contextvars.clear_contextvars()
        logging.getLogger().handlers.clear()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["correlation_id"] == "c-1" and line["count"] == 3
    assert line["name"] == "[redacted]" and line["birthDate"] == "[redacted]"
    assert line["resource"] == "[redacted]"


def test_outgoing_request_urls_are_not_logged_at_info(capsys):
    """httpx logged every outgoing request's URL at INFO (a webhook's, an EHR's, with their
    query strings)."""
    import httpx

    configure_logging("INFO", json=True, service="tests")
    try:
        transport = httpx.MockTransport(lambda request: httpx.Response(204))
        with httpx.Client(transport=transport) as client:
            client.post("https://receiver.example/hook?patient=p-secret")
    finally:
        logging.getLogger().handlers.clear()
    assert "p-secret" not in capsys.readouterr().err
