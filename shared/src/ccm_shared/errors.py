"""One error base class carrying its HTTP status; the edge maps it once.

Non-FHIR APIs answer ``application/problem+json`` (RFC 9457); FHIR endpoints turn the same errors
into an OperationOutcome (the ingest service installs that mapping for ``/fhir``).
"""

from __future__ import annotations


class AppError(Exception):
    status: int = 400
    title: str = "Bad request"
    code: str = "invalid"  # FHIR issue type, for the OperationOutcome mapping

    def __init__(self, detail: str, *, expression: list[str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.expression = expression or []


class InvalidInput(AppError):
    status, title, code = 422, "Invalid input", "invalid"


class EventTooLarge(AppError):
    """An event over what Kafka takes (``transport.MAX_MESSAGE_BYTES``): refused when it would
    be written to the outbox, with its unit of work, instead of stalling the relay later."""

    status, title, code = 422, "Event too large", "too-costly"


class MalformedRequest(AppError):
    status, title, code = 400, "Malformed request", "structure"


class Unauthorized(AppError):
    status, title, code = 401, "Unauthorized", "login"


class Forbidden(AppError):
    status, title, code = 403, "Forbidden", "forbidden"


class NotFound(AppError):
    status, title, code = 404, "Not found", "not-found"


class Gone(AppError):
    status, title, code = 410, "Gone", "deleted"


class Conflict(AppError):
    status, title, code = 409, "Conflict", "conflict"


class PreconditionFailed(AppError):
    status, title, code = 412, "Precondition failed", "conflict"


class TryAgain(AppError):
    """The database made this request give way to a concurrent one (a deadlock, a
    serialization failure): nothing of it was stored, and the same request may simply be sent
    again (``Retry-After``)."""

    status, title, code = 503, "Try again", "transient"
    retry_after_seconds = 1


class PayloadTooLarge(AppError):
    status, title, code = 413, "Payload too large", "too-costly"


class UnsupportedMediaType(AppError):
    status, title, code = 415, "Unsupported media type", "not-supported"


def problem(status: int, title: str, detail: str, **extra: object) -> dict:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return body
