"""Outgoing HTTP to the addresses practices give (message webhooks, event subscriptions, FHIR
Communication endpoints, an EHR's Invoice endpoint): never into the platform's own network
unless the operator allows it (``CCM_OUTBOUND_ALLOW_PRIVATE``).

Each connection resolves the host itself, refuses it when any address it resolves to is not a
public one (loopback, private, link-local such as a cloud's metadata service at
169.254.169.254, shared, reserved, multicast; IPv4 in IPv6 too) and then connects to an address
it checked, so a name that resolves differently a moment later (DNS rebinding) cannot slip
through. TLS still verifies the certificate against the URL's host name. A proxy set in the
environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``; ``NO_PROXY``) is used as httpx
uses it (``outbound_mounts``): a request through it is the proxy's to police.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpcore
import httpx

from ccm_shared.errors import InvalidInput

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# IPv6 forms that carry an IPv4 address: NAT64's well-known prefix (its last 32 bits), which
# DNS64 answers with on an IPv6-only network; its local-use prefix is private as a whole.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def is_private(address: Address) -> bool:
    """Not an address of the public internet (see the module's docstring); an IPv4 address
    carried in IPv6 (mapped, 6to4, NAT64, the deprecated IPv4-compatible ``::a.b.c.d``) is
    judged as that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return True
        embedded = (address.ipv4_mapped or address.sixtofour
                    or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
                        if address in _NAT64 or int(address) < 2**32 else None))
        if embedded is not None:
            address = embedded
    return not address.is_global or address.is_multicast


def _refused(host: str, addresses: Iterable[str]) -> str | None:
    """Why a connection to ``host`` is refused, when one of the addresses it resolves to is not
    public; else None."""
    for text in addresses:
        if is_private(ipaddress.ip_address(text.split("%", 1)[0])):
            # Which address is not said: the answer reaches the practice (a registration's 422,
            # a delivery's result), and would let it map the platform's own network by name.
            return (f"{host} resolves to an address that is not a public internet address: "
                    "outgoing requests may not reach it (CCM_OUTBOUND_ALLOW_PRIVATE)")
    return None


async def destination_problem(url: str, *, allow_private: bool,
                              timeout: float = 3.0) -> str | None:
    """Why outgoing requests will never reach ``url`` (an http(s) URL a practice gives: a
    webhook, an endpoint), else None. Asked when the address is given, so the practice is told
    then rather than by failed deliveries: its host resolves, now, to an address they may not
    reach. A host that does not resolve now is not refused (every connection checks again),
    nor a URL an environment proxy carries (the proxy's to police)."""
    if allow_private or _proxied(url):
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        # Threads of their own: a lookup given up on goes on in its thread, and names that
        # resolve slowly must not take the threads the process's other lookups use.
        found = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
            _LOOKUPS, functools.partial(socket.getaddrinfo, host, port,
                                        type=socket.SOCK_STREAM)), timeout)
    except (OSError, TimeoutError, ValueError, UnicodeError):
        return None
    return _refused(host, dict.fromkeys(info[4][0] for info in found))


# The threads registration-time lookups run in (``destination_problem``).
_LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ccm-address-check")


async def refuse_unreachable(url: str, field: str, *, allow_private: bool) -> None:
    """InvalidInput (422 on ``field``) when outgoing requests will never reach ``url``
    (``destination_problem``): for an address a practice gives."""
    if (problem := await destination_problem(url, allow_private=allow_private)) is not None:
        raise InvalidInput(f"{field}: {problem}", expression=[field])


def _proxied(url: str) -> bool:
    """Whether an environment proxy carries requests to ``url`` (httpx's choice of mount: the
    most specific pattern that matches)."""
    from httpx._utils import URLPattern, get_environment_proxies

    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    for pattern, proxy in sorted((URLPattern(p), proxy)
                                 for p, proxy in get_environment_proxies().items()):
        if pattern.matches(target):
            return proxy is not None
    return False


class RefusedDestination(httpcore.ConnectError):
    """The host resolves to an address outgoing requests may not reach (httpx raises it as an
    ``httpx.ConnectError`` with this message)."""


def refusal(error: BaseException) -> str | None:
    """The reason, when ``error`` (an ``httpx.ConnectError``) is a refused destination: a
    delivery that can never succeed, to fail at once with it rather than retry."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, RefusedDestination):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to public addresses it resolved itself."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable | None = None) -> httpcore.AsyncNetworkStream:
        try:
            found = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"{host}: cannot be resolved ({exc})") from exc
        addresses = list(dict.fromkeys(info[4][0] for info in found))
        if (problem := _refused(host, addresses)) is not None:
            raise RefusedDestination(problem)
        failure: httpcore.ConnectError | None = None
        for text in addresses:  # as the resolver ordered them, as a plain connection would
            try:
                return await self.inner.connect_tcp(text, port, timeout=timeout,
                                                    local_address=local_address,
                                                    socket_options=socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"{host}: no address")

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise RefusedDestination("outgoing requests do not use Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def outbound_mounts() -> dict[str, httpx.AsyncBaseTransport | None]:
    """The environment's proxies as an ``httpx.AsyncClient``'s mounts: httpx reads them only for
    a client given no transport of its own, and these clients are given one. A host
    ``NO_PROXY`` names maps to None: the client's own (guarded) transport."""
    from httpx._utils import get_environment_proxies  # httpx's own reading of the variables

    return {pattern: httpx.AsyncHTTPTransport(proxy=proxy) if proxy else None
            for pattern, proxy in get_environment_proxies().items()}


def outbound_client(*, allow_private: bool, **options: object) -> httpx.AsyncClient:
    """A client for practices' addresses: guarded transport, the environment's proxies."""
    return httpx.AsyncClient(transport=outbound_transport(allow_private=allow_private),
                             mounts=outbound_mounts(), **options)  # type: ignore[arg-type]


def outbound_transport(*, allow_private: bool) -> httpx.AsyncHTTPTransport:
    """The transport of an ``httpx.AsyncClient`` that calls practices' addresses: guarded
    (``GuardedBackend``) unless ``allow_private``."""
    # One TLS context (loading the CA bundle takes ~20 ms), the transport's and the pool's.
    ssl_context = httpx.create_ssl_context()
    transport = httpx.AsyncHTTPTransport(verify=ssl_context)
    if not allow_private:
        # httpx builds its connection pool without a way to pass a network backend: the same
        # pool (httpx's default limits) with the guarded backend.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                              keepalive_expiry=5.0)
        transport._pool = httpcore.AsyncConnectionPool(  # noqa: SLF001
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(),
        )
    return transport
