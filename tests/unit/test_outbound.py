"""Outgoing requests to practices' addresses (webhooks, subscriptions, FHIR endpoints, EHR
pushes) never reach the platform's own network unless allowed: a subscription at
https://169.254.169.254/ or a webhook at http://127.0.0.1:8082/ made the services post there and
keep the answer for the practice to read."""

from __future__ import annotations

import asyncio
import ipaddress

import httpcore
import httpx
import pytest

from ccm_shared.outbound import (
    GuardedBackend,
    destination_problem,
    is_private,
    outbound_client,
    outbound_transport,
)
from ccm_shared.settings import load_settings


@pytest.mark.parametrize(("address", "private"), [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True),
    ("::1", True), ("::ffff:127.0.0.1", True), ("fe80::1", True), ("fc00::1", True),
    ("8.8.8.8", False), ("93.184.216.34", False), ("2606:4700:4700::1111", False),
    # IPv4 carried in IPv6: NAT64 (DNS64 answers), its local-use prefix, 6to4
    ("64:ff9b::a9fe:a9fe", True), ("64:ff9b::a00:1", True), ("64:ff9b:1::1", True),
    ("2002:a00:1::1", True), ("64:ff9b::808:808", False), ("2002:808:808::1", False),
    # IPv4-compatible (deprecated ::/96): ::7f00:1 is 127.0.0.1
    ("::7f00:1", True), ("::a00:1", True), ("::808:808", False),
])
def test_which_addresses_are_not_public(address, private):
    assert is_private(ipaddress.ip_address(address)) is private


@pytest.fixture
async def receiver():
    """A loopback HTTP server answering 200 'internal'; yields (port, requests seen)."""
    seen = []

    async def answer(reader, writer):
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\ninternal")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], seen
    server.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "127.1",
                                  "0x7f000001"])
async def test_a_guarded_client_refuses_the_platforms_own_network(receiver, host):
    port, seen = receiver
    async with httpx.AsyncClient(transport=outbound_transport(allow_private=False)) as client:
        with pytest.raises(httpx.ConnectError, match="not a public internet address"):
            await client.post(f"http://{host}:{port}/hook", content=b"{}")
    assert seen == []


async def test_allowed_private_addresses_are_reached(receiver):
    port, seen = receiver
    async with httpx.AsyncClient(transport=outbound_transport(allow_private=True)) as client:
        answer = await client.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
    assert answer.text == "internal" and len(seen) == 1


async def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch):
    """Resolved once and connected by address: a name that resolves to a public address when
    checked and to a private one a moment later (DNS rebinding) is not resolved again."""
    asked = []

    class Inner(httpcore.AsyncNetworkBackend):
        async def connect_tcp(self, host, port, timeout=None, local_address=None,
                              socket_options=None):
            asked.append((host, port))
            raise httpcore.ConnectError("not really connecting")

    answers = iter([[(2, 1, 6, "", ("93.184.216.34", 443))],
                    [(2, 1, 6, "", ("127.0.0.1", 443))]])

    async def getaddrinfo(host, port, **kwargs):
        return next(answers)

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    with pytest.raises(httpcore.ConnectError, match="not really connecting"):
        await GuardedBackend(Inner()).connect_tcp("rebind.example", 443)
    assert asked == [("93.184.216.34", 443)]


@pytest.mark.parametrize(("env", "allow", "allowed"), [
    ("production", None, False), ("development", None, True), ("test", None, True),
    ("production", "true", True), ("development", "false", False),
])
def test_private_destinations_are_refused_in_production_by_default(monkeypatch, env, allow,
                                                                   allowed):
    monkeypatch.setenv("CCM_ENV", env)
    monkeypatch.setenv("CCM_SECRET_KEY", "a-real-secret-of-enough-length-0123456789")
    monkeypatch.setenv("CCM_DATABASE_URL", "postgresql+asyncpg://u:p@db:5432/ccm")
    monkeypatch.setenv("CCM_KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    if allow is not None:
        monkeypatch.setenv("CCM_OUTBOUND_ALLOW_PRIVATE", allow)
    assert load_settings().outbound_private_allowed is allowed


async def test_a_proxy_set_in_the_environment_is_used(monkeypatch):
    """httpx reads HTTP(S)_PROXY only for a client given no transport; the guarded clients are
    given one, and went around an egress proxy the operator had set."""
    seen = []

    async def proxy(reader, writer):
        seen.append((await reader.readline()).decode().strip())
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        async with outbound_client(allow_private=False, timeout=5) as client:
            answer = await client.get("http://receiver.example/hook")
    finally:
        server.close()
    assert answer.status_code == 204 and seen == ["GET http://receiver.example/hook HTTP/1.1"]


async def test_a_webhook_to_a_refused_address_fails_at_once_with_the_reason():
    """Notification's webhook deliveries to a refused address: no retries, the reason kept."""
    from ccm_notification.adapters.channels import post_signed

    async with outbound_client(allow_private=False) as client:
        result = await post_signed(client, "http://127.0.0.1:9/hook", b"{}", "secret", 0, {}, 5)
    assert result.permanent and result.response.startswith("refused: 127.0.0.1 resolves to")


@pytest.mark.parametrize(("url", "refused"), [
    ("https://127.0.0.1/hook", True), ("http://localhost:8082/hook", True),
    ("https://0x7f000001/hook", True), ("https://[::ffff:10.0.0.1]/hook", True),
    ("https://169.254.169.254/latest/meta-data", True), ("https://10.1.2.3:8443/fhir", True),
    ("https://93.184.216.34/hook", False),
    # A name that does not resolve now is not refused: every connection checks again.
    ("https://no-such-host.invalid/hook", False),
])
async def test_an_address_requests_may_not_reach_is_told_when_given(url, refused):
    problem = await destination_problem(url, allow_private=False)
    assert (problem is not None) is refused, problem
    if refused:
        assert "not a public internet address" in problem
    assert await destination_problem(url, allow_private=True) is None


async def test_an_address_an_environment_proxy_carries_is_the_proxys_to_police(monkeypatch):
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert await destination_problem("https://10.1.2.3/hook", allow_private=False) is None
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")  # not through the proxy: ours to refuse
    assert await destination_problem("https://10.1.2.3/hook", allow_private=False) is not None
    # http:// is not what HTTPS_PROXY carries
    assert await destination_problem("http://10.1.2.4/hook", allow_private=False) is not None


async def test_the_address_a_refused_name_resolves_to_is_not_told():
    """The answer reaches the practice (a registration's 422, a delivery's result): naming the
    address let a practice map the platform's own network by name (db.internal → 10.x)."""
    problem = await destination_problem("http://localhost:8082/hook", allow_private=False)
    assert problem.startswith("localhost resolves to an address that is not a public")
    assert "127.0.0.1" not in problem and "::1" not in problem
