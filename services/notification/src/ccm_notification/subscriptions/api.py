"""HTTP API of practice subscriptions (bearer token of the practice; others' answer 404).

Every route needs the token's ``notification`` scope (``NotificationTenant``, the same dependency
as notification's main router); without it → 403 before anything is read or written."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ccm_notification.config import NotificationSettings
from ccm_notification.entrypoints.api import JSON_BODY, NotificationTenant
from ccm_notification.entrypoints.workers import http_client_of, notifier_of
from ccm_notification.subscriptions import service
from ccm_notification.subscriptions.domain import (
    DEFAULT_OVERLAP_HOURS,
    FEED_TYPES,
    MAX_OVERLAP_HOURS,
)
from ccm_shared.errors import InvalidInput
from ccm_shared.outbound import refuse_unreachable
from ccm_shared.service import ServiceRuntime
from ccm_shared.text import http_url_problem, is_text

EventType = Literal[FEED_TYPES]  # type: ignore[valid-type]
BASE = "/v1/practices/{practice}/subscriptions"


def _storable_text(value: Any) -> Any:  # noqa: ANN401
    """No NUL (PostgreSQL cannot store one) and no lone surrogate: 422, nothing stored."""
    if isinstance(value, str) and not is_text(value):
        raise ValueError("text must not contain NUL characters or lone surrogates")
    return value


class SubscriptionCreate(BaseModel):
    """A webhook subscription (modelled on the FHIR Subscriptions backport)."""

    model_config = ConfigDict(extra="forbid")
    events: list[EventType] = Field(  # type: ignore[valid-type]
        ..., min_length=1, max_length=len(FEED_TYPES),
        description="Event types to receive (the subscription topic's filter)",
    )
    endpoint: str = Field(..., max_length=500, description="Where notifications are POSTed")
    payload: Literal["id-only", "full-resource"] = Field(
        "id-only",
        description="id-only: event number, type and focus reference; full-resource: plus the "
        "event's data (the FHIR R4 Invoice for invoice events)",
    )
    description: str | None = Field(None, max_length=200)

    _storable = field_validator("description", mode="before")(_storable_text)


class SubscriptionUpdate(BaseModel):
    """A PATCH: the fields given change, those left out stay (``description`` null clears it).
    Validated as at creation."""

    model_config = ConfigDict(extra="forbid")
    events: list[EventType] | None = Field(  # type: ignore[valid-type]
        None, min_length=1, max_length=len(FEED_TYPES),
        description="Event types to receive from now on",
    )
    endpoint: str | None = Field(None, max_length=500, description="Where notifications go")
    description: str | None = Field(None, max_length=200)

    _storable = field_validator("description", mode="before")(_storable_text)


# Event numbers are 32-bit INTEGER columns (PostgreSQL): a larger ``since`` matches nothing and
# cannot even be sent as a parameter.
MAX_EVENT_NUMBER = 2**31 - 1


def _check_endpoint(url: str, require_https: bool) -> None:
    problem = http_url_problem(url, ("https",) if require_https else ("https", "http"))
    if problem is not None:
        raise InvalidInput(f"endpoint {problem}" + ("; verify the signature instead"
                                                     if "credentials" in problem else ""))


def view(row, secret: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    """A subscription as the API shows it (``secret``: ``service.secret_summaries``' entry:
    when it was rotated and until when earlier secrets sign; never a secret)."""
    return {
        "id": row.id,
        "practice": row.practice,
        "description": row.description,
        "events": row.event_types,
        "endpoint": row.endpoint,
        "payload": row.payload,
        "status": row.status,
        "lastEventNumber": row.last_event_number,
        "deliveredThrough": row.delivered_through,
        "createdAt": row.created_at.isoformat(),
        **secret,
    }


async def _views(uow, rows: list, now) -> list[dict[str, Any]]:  # noqa: ANN001
    summaries = await service.secret_summaries(uow, [r.id for r in rows], now)
    return [view(r, summaries[r.id]) for r in rows]


def build_subscriptions_router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter(tags=["subscriptions"])
    db = runtime.db

    def settings() -> NotificationSettings:
        s = runtime.service_settings()
        assert isinstance(s, NotificationSettings)
        return s

    # (resume has no body and needs no Content-Type)
    @router.post(BASE, status_code=201, summary="Subscribe a webhook to the practice's events",
                 dependencies=JSON_BODY)
    async def create(
        practice: str, body: SubscriptionCreate, tenant: NotificationTenant, response: Response
    ) -> dict:
        tenant.require_practice(practice)
        _check_endpoint(body.endpoint, settings().subscription_require_https)
        await refuse_unreachable(body.endpoint, "endpoint",
                                 allow_private=runtime.settings.outbound_private_allowed)
        spec = service.NewSubscription(
            list(body.events), body.endpoint, body.payload, body.description
        )
        async with db.unit_of_work() as uow:
            row, secret = await service.create_subscription(
                uow, practice, spec, secret_key=runtime.settings.secret_key,
                limit=settings().max_subscriptions_per_practice, now=runtime.clock(),
            )
            [shown] = await _views(uow, [row], runtime.clock())
            await uow.commit()
        response.headers["Location"] = f"/v1/practices/{practice}/subscriptions/{row.id}"
        return shown | {"secret": secret}

    @router.get(BASE, summary="The practice's subscriptions")
    async def list_all(practice: str, tenant: NotificationTenant) -> list[dict]:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            return await _views(uow, await service.list_subscriptions(uow, practice),
                                runtime.clock())

    @router.get(BASE + "/{sub_id}", summary="One subscription")
    async def get_one(practice: str, sub_id: str, tenant: NotificationTenant) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            [shown] = await _views(uow, [await service.load(uow, practice, sub_id)],
                                   runtime.clock())
            return shown

    @router.patch(BASE + "/{sub_id}", summary="Change a subscription's endpoint, events or "
                  "description", dependencies=JSON_BODY)
    async def change(
        practice: str, sub_id: str, body: SubscriptionUpdate, tenant: NotificationTenant
    ) -> dict:
        tenant.require_practice(practice)
        given = body.model_fields_set
        for name in ("events", "endpoint"):
            if name in given and getattr(body, name) is None:
                raise InvalidInput(f"{name} may not be null: leave it out to keep it")
        async with db.unit_of_work() as uow:  # another practice's: 404 before any check
            await service.load(uow, practice, sub_id)
        if body.endpoint is not None:
            _check_endpoint(body.endpoint, settings().subscription_require_https)
            await refuse_unreachable(body.endpoint, "endpoint",
                                     allow_private=runtime.settings.outbound_private_allowed)
        change = service.SubscriptionChange(
            event_types=list(body.events) if body.events is not None else None,
            endpoint=body.endpoint, description=body.description,
            clear_description="description" in given and body.description is None)
        async with db.unit_of_work() as uow:
            row = await service.update_subscription(uow, practice, sub_id, change,
                                                    now=runtime.clock())
            [shown] = await _views(uow, [row], runtime.clock())
            await uow.commit()
        return shown

    # (rotation and the test delivery have no body and need no Content-Type)
    @router.post(BASE + "/{sub_id}/secret",
                 summary="Rotate the signing secret (the new one is shown once)")
    async def rotate(
        practice: str,
        sub_id: str,
        tenant: NotificationTenant,
        overlap_hours: Annotated[int, Query(
            alias="overlapHours", ge=0, le=MAX_OVERLAP_HOURS,
            description="How long the secret replaced keeps signing deliveries beside the new "
            "one (0: it stops at once, e.g. when it leaked)")] = DEFAULT_OVERLAP_HOURS,
    ) -> dict:
        tenant.require_practice(practice)
        now = runtime.clock()
        async with db.unit_of_work() as uow:
            row, secret = await service.rotate_secret(
                uow, practice, sub_id, secret_key=runtime.settings.secret_key,
                overlap=timedelta(hours=overlap_hours), now=now)
            [shown] = await _views(uow, [row], now)
            await uow.commit()
        return shown | {"secret": secret}

    @router.post(BASE + "/{sub_id}/test",
                 summary="Send a signed ping to the endpoint now and report the answer")
    async def send_test(practice: str, sub_id: str, tenant: NotificationTenant) -> dict:
        tenant.require_practice(practice)
        result = await service.send_ping(
            db, practice, sub_id, secret_key=runtime.settings.secret_key,
            client=http_client_of(runtime), clock=runtime.clock,
            timeout=settings().webhook_timeout_seconds)
        return {
            "subscription": sub_id,
            "ping": result.ping_id,
            "delivered": result.delivered,
            "status": result.status,
            "response": result.response,
            "latencyMs": result.latency_ms,
            "signatures": result.signatures,
        }

    @router.delete(BASE + "/{sub_id}", status_code=204, summary="Unsubscribe (stops delivery)")
    async def remove(practice: str, sub_id: str, tenant: NotificationTenant) -> Response:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            await service.delete_subscription(uow, practice, sub_id, notifier_of(runtime))
            await uow.commit()
        return Response(status_code=204)

    @router.post(BASE + "/{sub_id}/resume", summary="Resume a paused subscription")
    async def resume(practice: str, sub_id: str, tenant: NotificationTenant) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            await service.resume(uow, practice, sub_id, now=runtime.clock(),
                                 notifier=notifier_of(runtime))
            row = await service.load(uow, practice, sub_id)
            [shown] = await _views(uow, [row], runtime.clock())
            await uow.commit()
        return shown

    @router.get(BASE + "/{sub_id}/events", summary="Replay notifications numbered above `since`")
    async def events(
        practice: str,
        sub_id: str,
        tenant: NotificationTenant,
        since: Annotated[
            int,
            Query(ge=0, le=MAX_EVENT_NUMBER, description="The last event number you processed"),
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            found = await service.events_since(uow, practice, sub_id, since, limit)
            row = await service.load(uow, practice, sub_id)
        return {
            "subscription": sub_id,
            "lastEventNumber": row.last_event_number,
            "events": found,
            "next": found[-1]["eventNumber"] if len(found) == limit else None,
        }

    @router.get(BASE + "/{sub_id}/status", summary="Lag, failures and the last delivery")
    async def status(practice: str, sub_id: str, tenant: NotificationTenant) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            return await service.status_of(uow, practice, sub_id, runtime.clock())

    @router.get(BASE + "/{sub_id}/deliveries", summary="Delivery log, newest first")
    async def deliveries(
        practice: str,
        sub_id: str,
        tenant: NotificationTenant,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict]:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            return await service.delivery_log(uow, practice, sub_id, limit)

    return router
