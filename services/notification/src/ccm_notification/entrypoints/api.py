"""HTTP API of the notification service (problem+json errors from the shared edge).

Every route called with a bearer token needs its ``notification`` scope (``NotificationTenant``);
without it → 403 before anything is read or written. The signed links (acknowledgement, slot
choice) carry no token and stay as they are: their signature is their authorization."""

from __future__ import annotations

import asyncio
import html
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import HTMLResponse
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from ccm_notification.adapters.orm import (
    ack_policies,
    call_requests,
    deliveries,
    messages,
    practice_contacts,
    providers,
    template_overrides,
)
from ccm_notification.adapters.rendering import TemplateInvalid, default_source
from ccm_notification.adapters.sql import upsert
from ccm_notification.domain.directory import SOURCE_FIELDS, UnknownField
from ccm_notification.domain.kinds import KINDS, MissingFields
from ccm_notification.domain.signing import LinkExpired, LinkInvalid, verify_link, webhook_secret
from ccm_notification.service_layer import acks, calls, directory
from ccm_notification.service_layer.handlers import release_held, release_held_reviews
from ccm_notification.service_layer.notify import Intent, Notifier, Recorded
from ccm_shared.errors import Gone, InvalidInput, MalformedRequest, NotFound
from ccm_shared.http import TenantDep, json_body_after
from ccm_shared.outbound import refuse_unreachable
from ccm_shared.service import ServiceRuntime
from ccm_shared.tenancy import Tenant
from ccm_shared.text import http_url_problem, is_text

ID = r"^[A-Za-z0-9\-\.]{1,64}$"
EMAIL = r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$"
ProviderId = Annotated[str, Field(pattern=ID)]
KIND_NAMES = tuple(KINDS)
SCOPE = "notification"


async def notification_tenant(tenant: TenantDep) -> Tenant:
    """The caller, when its token carries the ``notification`` scope; else 403 (an EHR
    connection's fhir:read + fhir:write token must not edit the directory or send messages)."""
    tenant.require_scope(SCOPE)
    return tenant


NotificationTenant = Annotated[Tenant, Depends(notification_tenant)]

# A route whose body is a model; the API's ack and the signed links' form POSTs take no body.
JSON_BODY = json_body_after(notification_tenant)


def _http_url(value: str | None) -> str | None:
    if value is not None and (problem := http_url_problem(value)) is not None:
        raise ValueError(problem)
    return value


HttpUrl = Annotated[str | None, Field(max_length=500), AfterValidator(_http_url)]


def _storable_text(value: Any) -> Any:  # noqa: ANN401
    """A text a provider field may keep: no NUL (PostgreSQL's JSON takes the escape, then every
    message rendered with it fails) and no lone surrogate (no encoder writes one)."""
    if isinstance(value, str) and not is_text(value):
        raise ValueError("text must not contain NUL characters or lone surrogates")
    return value


class ProviderUpdate(BaseModel):
    """Fields to set; fields left out keep their value. ``release`` un-pins fields so they
    follow the EHR again. No field may hold NUL or a lone surrogate (422, nothing stored)."""

    model_config = ConfigDict(extra="forbid")

    _no_nul = field_validator("*", mode="before")(_storable_text)
    name: str | None = Field(None, max_length=200)
    npi: str | None = Field(None, pattern=r"^[0-9]{10}$")
    email: str | None = Field(None, pattern=EMAIL, max_length=320)
    phone: str | None = Field(None, max_length=40)
    organization: str | None = Field(None, pattern=ID)
    active: bool | None = None
    webhook_url: HttpUrl = None
    fhir_endpoint: HttpUrl = None
    preferred_channel: Literal["email", "webhook", "fhir"] | None = None
    supervisor: str | None = Field(None, pattern=ID)
    on_call: str | None = Field(None, pattern=ID)
    release: list[Literal[SOURCE_FIELDS]] = Field(default_factory=list)  # type: ignore[valid-type]


class Contacts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    supervisor: str | None = Field(
        None, pattern=ID, description="Clinical supervisor (provider id)"
    )
    on_call: str | None = Field(None, pattern=ID, description="On-call contact (provider id)")
    summary_recipients: list[ProviderId] = Field(
        default_factory=list,
        max_length=50,
        description="Who gets utilization summaries and invoices (default: the supervisor)",
    )


class TemplateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(max_length=50_000, description="Jinja2 with blocks subject, text, html")


class AckPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requires_ack: bool
    sla_minutes: int = Field(gt=0, le=60 * 24 * 30)


class NotificationCreate(BaseModel):
    """An alert raised by the care team (care gaps, deterioration, attestation reminders…)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal[KIND_NAMES]  # type: ignore[valid-type]
    provider: ProviderId
    fields: dict[str, Any]
    patient: str | None = Field(None, pattern=r"^Patient/[A-Za-z0-9\-\.]{1,64}$")
    idempotency_key: str | None = Field(
        None, max_length=200, description="Same key → same notification, sent once"
    )


def with_patient(kind: str, fields: dict[str, Any], patient: str | None) -> dict[str, Any]:
    """The template fields of a raised alert: the top-level ``patient`` (the message's subject)
    is also its template's ``patient`` field when the kind has one and ``fields`` leaves it
    out; the two differing is a 422 (which patient would the message be about?)."""
    if patient is None or "patient" not in KINDS[kind].fields:
        return fields
    given = fields.get("patient")
    if given in (None, ""):
        return {**fields, "patient": patient}
    if given != patient:
        raise InvalidInput("fields.patient differs from patient: give the patient once, as "
                           "patient")
    return fields


class CallRequestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: ProviderId
    reason: str = Field(min_length=1, max_length=2000)
    slots: list[AwareDatetime] = Field(min_length=1, max_length=10)
    duration_minutes: int = Field(15, gt=0, le=240)
    requester_name: str = Field(min_length=1, max_length=200)
    requester_email: str = Field(pattern=EMAIL, max_length=320)
    patient: str | None = Field(None, pattern=r"^Patient/[A-Za-z0-9\-\.]{1,64}$")


class SlotChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slot: int = Field(ge=0)


def _provider_view(row) -> dict:  # noqa: ANN001
    conflicts = {
        f: row.source[f]
        for f in row.pinned
        if f in row.source and row.source[f] != row.current.get(f)
    }
    return {
        "id": row.id,
        "version": row.version,
        **row.current,
        "pinned": list(row.pinned),
        "ehr_values": row.source,
        "conflicts": conflicts,
        "updated_at": row.updated_at.isoformat(),
    }


def _message_view(row, provider_names: dict | None = None) -> dict:  # noqa: ANN001
    view = {
        "id": row.id,
        "kind": row.kind,
        "provider": row.provider_id,
        "provider_name": (provider_names or {}).get(row.provider_id),
        "patient": row.patient,
        "channel": row.channel,
        "recipient": row.recipient,
        "subject": row.subject,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "created_at": row.created_at.isoformat(),
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "ack_state": row.ack_state,
        "escalation_level": row.escalation_level,
        "ack_due_at": row.ack_due_at.isoformat() if row.ack_due_at else None,
        "acked_at": row.acked_at.isoformat() if row.acked_at else None,
        "acked_by": row.acked_by,
        "root": row.root_id,
        "idempotency_key": row.idempotency_key,
        # held until someone is configured to receive it (the reason is in last_error)
        "waiting_for_recipient": row.status == "pending" and row.next_attempt_at is None,
    }
    return view


def _kind(kind: str):  # noqa: ANN202
    if kind not in KINDS:
        raise NotFound(f"unknown notification kind {kind!r}; one of {', '.join(KINDS)}")
    return KINDS[kind]


def build_router(runtime: ServiceRuntime) -> APIRouter:  # noqa: C901 - one route table
    router = APIRouter(tags=["notification"])
    db = runtime.db

    def notifier() -> Notifier:
        return runtime.state["notifier"]

    # -- provider directory --------------------------------------------------------------------

    @router.get("/v1/practices/{practice}/providers", summary="The provider directory")
    async def list_providers(practice: str, tenant: NotificationTenant) -> list[dict]:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            rows = (
                await uow.session.execute(
                    select(providers)
                    .where(providers.c.practice == practice)
                    .order_by(providers.c.id)
                )
            ).all()
        return [_provider_view(r) for r in rows]

    @router.get("/v1/practices/{practice}/providers/{provider_id}", summary="One provider")
    async def get_provider(
        practice: str, provider_id: str, tenant: NotificationTenant, response: Response
    ) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            row = await directory.load_provider(uow, practice, provider_id)
        if row is None:
            raise NotFound(f"provider {provider_id!r} not found")
        response.headers["ETag"] = f'"{row.version}"'
        return _provider_view(row)

    @router.put(
        "/v1/practices/{practice}/providers/{provider_id}",
        summary="Correct or complete a provider (pins edited EHR fields)",
        dependencies=JSON_BODY,
    )
    async def put_provider(
        practice: str,
        provider_id: Annotated[str, Field(pattern=ID)],
        body: ProviderUpdate,
        tenant: NotificationTenant,
        response: Response,
        if_match: Annotated[str | None, Header()] = None,
    ) -> dict:
        tenant.require_practice(practice)
        expected = None
        if if_match is not None:
            try:
                expected = int(if_match.strip().strip('"').removeprefix("W/").strip('"'))
            except ValueError:
                raise MalformedRequest("If-Match must be a provider version (ETag)") from None
        updates = body.model_dump(exclude_unset=True, exclude={"release"})
        for name in ("webhook_url", "fhir_endpoint"):
            if updates.get(name) is not None:
                await refuse_unreachable(updates[name], name,
                                         allow_private=runtime.settings.outbound_private_allowed)
        try:
            async with db.unit_of_work() as uow:
                _, created = await directory.edit_provider(
                    uow,
                    practice,
                    provider_id,
                    updates,
                    tuple(body.release),
                    actor=f"token:{tenant.token_id}",
                    now=runtime.clock(),
                    if_match=expected,
                )
                # A care-plan message held for a recipient may have one now (this provider's
                # email, or their supervisor).
                await release_held_reviews(notifier(), uow, practice)
                await uow.commit()
        except UnknownField as exc:
            raise InvalidInput(f"unknown field(s): {exc}") from None
        async with db.unit_of_work() as uow:
            row = await directory.load_provider(uow, practice, provider_id)
        response.status_code = 201 if created else 200
        response.headers["ETag"] = f'"{row.version}"'
        return _provider_view(row)

    @router.get(
        "/v1/practices/{practice}/providers/{provider_id}/history",
        summary="Every change to a provider, from the EHR or by hand",
    )
    async def provider_history(
        practice: str, provider_id: str, tenant: NotificationTenant
    ) -> list[dict]:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            if await directory.load_provider(uow, practice, provider_id) is None:
                raise NotFound(f"provider {provider_id!r} not found")
            return await directory.provider_history_of(uow, practice, provider_id)

    @router.get(
        "/v1/practices/{practice}/contacts",
        summary="The practice's clinical supervisor, on-call contact, summary recipients",
    )
    async def get_contacts(practice: str, tenant: NotificationTenant) -> Contacts:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            row = await notifier().contacts(uow, practice)
        if row is None:
            return Contacts()
        return Contacts(
            supervisor=row.supervisor,
            on_call=row.on_call,
            summary_recipients=row.summary_recipients,
        )

    @router.put("/v1/practices/{practice}/contacts", summary="Set the practice's contacts",
                dependencies=JSON_BODY)
    async def put_contacts(practice: str, body: Contacts, tenant: NotificationTenant) -> Contacts:
        tenant.require_practice(practice)
        values = body.model_dump() | {"updated_at": runtime.clock()}
        async with db.unit_of_work() as uow:
            await upsert(uow.session, practice_contacts, {"practice": practice}, values)
            # Messages held because nobody was configured go out now: care-plan reviews to the
            # supervisor, practice-level messages (invoices, summaries, consent notices) to
            # the contacts.
            await release_held(notifier(), uow, practice)
            await uow.commit()
        return body

    # -- templates and policies ----------------------------------------------------------------

    @router.get("/v1/practices/{practice}/templates", summary="Kinds, their fields, overrides")
    async def list_templates(practice: str, tenant: NotificationTenant) -> list[dict]:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            overridden = set(
                (
                    await uow.session.execute(
                        select(template_overrides.c.kind).where(
                            template_overrides.c.practice == practice
                        )
                    )
                ).scalars()
            )
        return [
            {
                "kind": k.name,
                "title": k.title,
                "required": list(k.required),
                "optional": list(k.optional),
                "overridden": k.name in overridden,
            }
            for k in KINDS.values()
        ]

    @router.get(
        "/v1/practices/{practice}/templates/{kind}",
        summary="The template in use (the practice's override or the default)",
    )
    async def get_template(practice: str, kind: str, tenant: NotificationTenant) -> dict:
        tenant.require_practice(practice)
        spec = _kind(kind)
        async with db.unit_of_work() as uow:
            source = await notifier().template_source(uow, practice, kind)
        return {
            "kind": kind,
            "overridden": source is not None,
            "required": list(spec.required),
            "optional": list(spec.optional),
            "source": source or default_source(kind),
        }

    @router.put("/v1/practices/{practice}/templates/{kind}", summary="Override a template",
                dependencies=JSON_BODY)
    async def put_template(
        practice: str, kind: str, body: TemplateBody, tenant: NotificationTenant
    ) -> dict:
        tenant.require_practice(practice)
        spec = _kind(kind)
        try:
            # Validation renders the template (bounded): in a worker thread, off the event loop.
            await asyncio.to_thread(notifier().renderer.validate, spec, body.source)
        except TemplateInvalid as exc:
            raise InvalidInput(f"template refused: {exc}") from None
        values = {"source": body.source, "updated_at": runtime.clock()}
        async with db.unit_of_work() as uow:
            key = {"practice": practice, "kind": kind}
            await upsert(uow.session, template_overrides, key, values)
            await uow.commit()
        return {"kind": kind, "overridden": True, "source": body.source}

    @router.delete(
        "/v1/practices/{practice}/templates/{kind}",
        status_code=204,
        summary="Drop the override; the default applies again",
    )
    async def delete_template(practice: str, kind: str, tenant: NotificationTenant) -> Response:
        tenant.require_practice(practice)
        _kind(kind)
        async with db.unit_of_work() as uow:
            await uow.session.execute(
                delete(template_overrides).where(
                    template_overrides.c.practice == practice, template_overrides.c.kind == kind
                )
            )
            await uow.commit()
        return Response(status_code=204)

    @router.get(
        "/v1/practices/{practice}/ack-policies/{kind}",
        summary="Whether a kind needs acknowledgement, and its SLA",
    )
    async def get_ack_policy(practice: str, kind: str, tenant: NotificationTenant) -> AckPolicy:
        tenant.require_practice(practice)
        _kind(kind)
        async with db.unit_of_work() as uow:
            requires, sla = await notifier().ack_policy(uow, practice, kind)
        return AckPolicy(requires_ack=requires, sla_minutes=sla)

    @router.put("/v1/practices/{practice}/ack-policies/{kind}", summary="Set the ack policy",
                dependencies=JSON_BODY)
    async def put_ack_policy(
        practice: str, kind: str, body: AckPolicy, tenant: NotificationTenant
    ) -> AckPolicy:
        tenant.require_practice(practice)
        _kind(kind)
        values = body.model_dump() | {"updated_at": runtime.clock()}
        async with db.unit_of_work() as uow:
            await upsert(uow.session, ack_policies, {"practice": practice, "kind": kind}, values)
            await uow.commit()
        return body

    @router.get(
        "/v1/practices/{practice}/webhook-secret",
        summary="The secret receivers use to verify X-CCM-Signature",
    )
    async def get_webhook_secret(practice: str, tenant: NotificationTenant) -> dict:
        tenant.require_practice(practice)
        return {
            "secret": webhook_secret(runtime.settings.secret_key, practice),
            "header": "X-CCM-Signature",
            "scheme": "t=<unix seconds>,v1=hex(HMAC-SHA256(secret, '<t>.' + raw body))",
        }

    # -- notifications -------------------------------------------------------------------------

    @router.post(
        "/v1/practices/{practice}/notifications",
        status_code=201,
        summary="Raise an alert to a provider (care gap, deterioration, reminder…)",
        dependencies=JSON_BODY,
    )
    async def create_notification(
        practice: str, body: NotificationCreate, tenant: NotificationTenant, response: Response
    ) -> dict:
        tenant.require_practice(practice)
        if body.kind in ("call-request", "call-confirmed", "ack-escalation",
                         "subscription-paused"):
            raise InvalidInput(f"{body.kind} messages are created by the service itself")
        key = f"{practice}:api:{body.idempotency_key or uuid.uuid4().hex}"
        values = with_patient(body.kind, body.fields, body.patient)
        try:
            async with db.unit_of_work() as uow:
                recorded = await notifier().notify(
                    uow,
                    Intent(
                        practice=practice,
                        kind=body.kind,
                        provider_id=body.provider,
                        values=values,
                        patient=body.patient,
                        idempotency_key=key,
                    ),
                    strict=True,
                )
                await uow.commit()
        except MissingFields as exc:
            raise InvalidInput(str(exc)) from None
        except TemplateInvalid as exc:
            raise InvalidInput(f"template could not render: {exc}") from None
        except IntegrityError:
            # A concurrent request with the same key inserted first (both found the key free):
            # answer with its message, read in a fresh unit of work (this one is rolled back).
            async with db.unit_of_work() as uow:
                winner = await notifier().find_by_key(uow, key)
            if winner is None:
                raise
            recorded = Recorded(winner.id, False, winner.status, winner.last_error)
        if not recorded.created:
            response.status_code = 200
        return {"id": recorded.message_id, "status": recorded.status, "error": recorded.error}

    @router.get(
        "/v1/practices/{practice}/notifications",
        summary="Messages; ?status=failed, ?ack=pending (who has not acknowledged what)",
    )
    async def list_notifications(
        practice: str,
        tenant: NotificationTenant,
        status: Literal["pending", "sending", "sent", "failed"] | None = None,
        ack: Literal["pending", "acknowledged", "closed"] | None = None,
        kind: str | None = None,
        provider: str | None = None,
        limit: Annotated[int, Query(gt=0, le=500)] = 100,
    ) -> list[dict]:
        tenant.require_practice(practice)
        stmt = select(messages).where(messages.c.practice == practice)
        if status:
            stmt = stmt.where(messages.c.status == status)
        if ack:
            stmt = stmt.where(messages.c.ack_state == ack)
        if kind:
            stmt = stmt.where(messages.c.kind == kind)
        if provider:
            stmt = stmt.where(messages.c.provider_id == provider)
        order = messages.c.ack_due_at if ack == "pending" else messages.c.created_at.desc()
        async with db.unit_of_work() as uow:
            rows = (await uow.session.execute(stmt.order_by(order).limit(limit))).all()
            ids = {r.provider_id for r in rows if r.provider_id}
            names = (
                {
                    p.id: p.current.get("name")
                    for p in (
                        await uow.session.execute(
                            select(providers).where(
                                providers.c.practice == practice, providers.c.id.in_(ids)
                            )
                        )
                    ).all()
                }
                if ids
                else {}
            )
        return [_message_view(r, names) for r in rows]

    @router.get(
        "/v1/practices/{practice}/notifications/{message_id}",
        summary="One message with its delivery log",
    )
    async def get_notification(practice: str, message_id: str, tenant: NotificationTenant) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            row = (
                await uow.session.execute(
                    select(messages).where(
                        messages.c.practice == practice, messages.c.id == message_id
                    )
                )
            ).first()
            if row is None:
                raise NotFound(f"notification {message_id} not found")
            log = (
                await uow.session.execute(
                    select(deliveries)
                    .where(deliveries.c.message_id == message_id)
                    .order_by(deliveries.c.id)
                )
            ).all()
        return _message_view(row) | {
            "text": row.text_body,
            "deliveries": [
                {
                    "attempt": d.attempt,
                    "channel": d.channel,
                    "outcome": d.outcome,
                    "response": d.response,
                    "at": d.at.isoformat(),
                }
                for d in log
            ],
        }

    @router.post("/v1/notifications/{message_id}/ack", summary="Acknowledge an alert")
    async def ack_notification(message_id: str, tenant: NotificationTenant) -> dict:
        async with db.unit_of_work() as uow:
            result = await acks.acknowledge(
                uow,
                notifier(),
                tenant.practice_id,
                message_id,
                via="api",
                actor=f"token:{tenant.token_id}",
            )
            await uow.commit()
        return result

    def verified(token: str, purpose: str) -> dict:
        try:
            return verify_link(runtime.settings.secret_key, purpose, token, runtime.clock())
        except LinkExpired:
            raise Gone("this link has expired; ask the care team for a new one") from None
        except LinkInvalid:
            raise NotFound("this link is not valid") from None

    @router.get(
        "/v1/ack/{token}",
        response_class=HTMLResponse,
        summary="Signed acknowledgement link: a confirmation page (no state change)",
    )
    async def ack_page(token: str) -> HTMLResponse:
        verified(token, "ack")
        # Mail scanners follow links: the GET only shows a button, the POST acknowledges.
        return _page(
            "Acknowledge this alert",
            '<form method="post"><button type="submit">Acknowledge</button></form>',
        )

    @router.post(
        "/v1/ack/{token}",
        response_class=HTMLResponse,
        summary="Signed acknowledgement link: acknowledge",
    )
    async def ack_by_link(token: str) -> HTMLResponse:
        payload = verified(token, "ack")
        async with db.unit_of_work() as uow:
            await acks.acknowledge(
                uow, notifier(), payload["p"], payload["m"], via="link", actor="signed-link"
            )
            await uow.commit()
        return _page("Acknowledged", "<p>Thank you. The care team has been informed.</p>")

    # -- calls ---------------------------------------------------------------------------------

    @router.post(
        "/v1/practices/{practice}/calls",
        status_code=201,
        summary="Ask a provider for a call, proposing slots",
        dependencies=JSON_BODY,
    )
    async def create_call(
        practice: str, body: CallRequestCreate, tenant: NotificationTenant
    ) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            try:
                result = await calls.request_call(
                    uow,
                    notifier(),
                    practice,
                    provider_id=body.provider,
                    slots=body.slots,
                    duration_minutes=body.duration_minutes,
                    reason=body.reason,
                    requester_name=body.requester_name,
                    requester_email=body.requester_email,
                    patient=body.patient,
                )
            except (MissingFields, TemplateInvalid) as exc:
                raise InvalidInput(str(exc)) from None
            await uow.commit()
        return result

    @router.get("/v1/practices/{practice}/calls/{call_id}", summary="A call request")
    async def get_call(practice: str, call_id: str, tenant: NotificationTenant) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            row = (
                await uow.session.execute(
                    select(call_requests).where(
                        call_requests.c.practice == practice, call_requests.c.id == call_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound(f"call request {call_id} not found")
        return {
            "id": row.id,
            "provider": row.provider_id,
            "status": row.status,
            "slots": row.slots,
            "duration_minutes": row.duration_minutes,
            "chosen_slot": row.chosen_slot.isoformat() if row.chosen_slot else None,
        }

    @router.post(
        "/v1/practices/{practice}/calls/{call_id}/confirm",
        summary="Choose a slot; both sides get an .ics invitation",
        dependencies=JSON_BODY,
    )
    async def confirm_call(
        practice: str, call_id: str, body: SlotChoice, tenant: NotificationTenant
    ) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            result = await calls.confirm_call(uow, notifier(), practice, call_id, body.slot)
            await uow.commit()
        return result

    @router.get(
        "/v1/calls/choose/{token}",
        response_class=HTMLResponse,
        summary="Signed slot link: a confirmation page (no state change)",
    )
    async def slot_page(token: str) -> HTMLResponse:
        verified(token, "call-slot")
        return _page(
            "Confirm this time", '<form method="post"><button type="submit">Confirm</button></form>'
        )

    @router.post(
        "/v1/calls/choose/{token}",
        response_class=HTMLResponse,
        summary="Signed slot link: confirm the slot",
    )
    async def choose_by_link(token: str) -> HTMLResponse:
        payload = verified(token, "call-slot")
        async with db.unit_of_work() as uow:
            result = await calls.confirm_call(
                uow, notifier(), payload["p"], payload["c"], payload["s"]
            )
            await uow.commit()
        return _page(
            "Call confirmed",
            f"<p>Confirmed for {html.escape(result['chosen_slot'])}. "
            "An invitation is on its way.</p>",
        )

    return router


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
