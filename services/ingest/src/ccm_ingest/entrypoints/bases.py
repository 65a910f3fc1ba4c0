"""This server's /fhir bases, as a request to it has them (FHIR API and config API alike)."""

from __future__ import annotations

from starlette.requests import Request


class FhirBases:
    """The /fhir base of Location and fullUrl (``fhir_base_url`` when configured, else the one
    the request came to), and where an absolute reference is this server's."""

    def __init__(self, configured: str | None) -> None:
        self.configured = (configured or "").rstrip("/")
        self._seen: dict[tuple, str] = {}  # base_url for the same scheme, server, root, Host

    def base(self, request: Request) -> str:
        """The /fhir base of Location and fullUrl: configured, or from the request."""
        return self.configured or self.of_request(request)

    def local(self, request: Request) -> tuple[str, ...]:
        """Where an absolute reference is this server's: the configured base and the one the
        request came to (a client may use either, e.g. a Location it was given)."""
        found = self.of_request(request)
        configured = self.configured
        return (configured, found) if configured and configured != found else (found,)

    def of_request(self, request: Request) -> str:
        """The /fhir base the request came to (Starlette builds base_url anew each time, ~25 µs:
        2 % of a durable POST, so it is remembered)."""
        scope = request.scope
        key = (scope.get("scheme"), scope.get("server"), scope.get("root_path"),
               scope.get("app_root_path"), request.headers.get("host"))
        found = self._seen.get(key)
        if found is None:
            found = str(request.base_url).rstrip("/") + "/fhir"
            if len(self._seen) < 64:  # Host is the client's: a bounded memory of it
                self._seen[key] = found
        return found
