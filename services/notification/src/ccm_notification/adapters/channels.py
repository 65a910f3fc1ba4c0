"""Delivery channels: email over SMTP, signed webhooks, FHIR Communication to the EHR.

Each returns a ``DeliveryResult``; none raises for a delivery problem. Every request carries the
message id and idempotency key so receivers can drop the rare duplicate that at-least-once
delivery allows (a crash after the send, before the result is recorded).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
import httpx

from ccm_notification.config import NotificationSettings
from ccm_notification.domain.kinds import KINDS
from ccm_notification.domain.signing import webhook_secret, webhook_signature
from ccm_shared.outbound import refusal

SIGNATURE_HEADER = "X-CCM-Signature"
RETRYABLE_HTTP = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Outgoing:
    message_id: str
    practice: str
    idempotency_key: str
    kind: str
    provider_id: str | None
    patient: str | None
    recipient: str
    subject: str
    text: str
    html: str
    fields: dict
    attachments: list
    requires_ack: bool


@dataclass(frozen=True)
class DeliveryResult:
    ok: bool
    response: str
    permanent: bool = False  # retrying cannot help (address refused, 4xx)
    status: int | None = None  # the HTTP status answered (None: no answer, or not HTTP)


class EmailChannel:
    def __init__(self, settings: NotificationSettings) -> None:
        self.settings = settings

    def build(self, out: Outgoing) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.settings.mail_from
        msg["To"] = out.recipient
        msg["Subject"] = out.subject
        msg["Message-ID"] = make_msgid(idstring=out.message_id.replace("-", ""), domain="ccm")
        msg["X-CCM-Message-Id"] = out.message_id
        msg["X-CCM-Idempotency-Key"] = out.idempotency_key
        msg.set_content(out.text)
        msg.add_alternative(f"<!doctype html><html><body>{out.html}</body></html>", subtype="html")
        for a in out.attachments:
            maintype, _, subtype = a["content_type"].partition("/")
            msg.add_attachment(
                a["content"].encode(),
                maintype=maintype,
                subtype=subtype,
                filename=a["filename"],
                params={"method": "REQUEST"} if subtype == "calendar" else {},
            )
        return msg

    async def send(self, out: Outgoing) -> DeliveryResult:
        s = self.settings
        try:
            errors, reply = await aiosmtplib.send(
                self.build(out),
                hostname=s.smtp_host,
                port=s.smtp_port,
                start_tls=s.smtp_starttls and not s.smtp_implicit_tls,
                use_tls=s.smtp_implicit_tls,
                username=s.smtp_username,
                password=s.smtp_password,
                timeout=s.smtp_timeout_seconds,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return DeliveryResult(False, f"recipient refused: {exc}"[:500], permanent=True)
        except aiosmtplib.SMTPResponseException as exc:
            return DeliveryResult(
                False, f"smtp {exc.code}: {exc.message}"[:500], permanent=exc.code >= 500
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return DeliveryResult(False, f"{type(exc).__name__}: {exc}"[:500])
        if errors:
            return DeliveryResult(False, f"recipient refused: {errors}"[:500], permanent=True)
        return DeliveryResult(True, f"smtp: {reply}"[:500])


def _http_result(response: httpx.Response) -> DeliveryResult:
    summary = f"http {response.status_code}: {response.text[:300]}"
    if response.is_success:
        return DeliveryResult(True, summary, status=response.status_code)
    permanent = 400 <= response.status_code < 500 and response.status_code not in RETRYABLE_HTTP
    return DeliveryResult(False, summary, permanent=permanent, status=response.status_code)


class WebhookChannel:
    """POST JSON, signed:
    ``X-CCM-Signature: t=<unix>,v1=hex(HMAC-SHA256(secret, t + "." + body))``."""

    def __init__(
        self,
        settings: NotificationSettings,
        secret_key: str,
        clock: Callable[[], datetime],
        client: httpx.AsyncClient,
    ) -> None:
        self.settings, self.secret_key, self.clock, self.client = (
            settings,
            secret_key,
            clock,
            client,
        )

    def body(self, out: Outgoing) -> bytes:
        return json.dumps(
            {
                "id": out.message_id,
                "practice": out.practice,
                "kind": out.kind,
                "idempotencyKey": out.idempotency_key,
                "provider": f"Practitioner/{out.provider_id}" if out.provider_id else None,
                "patient": out.patient,
                "subject": out.subject,
                "text": out.text,
                "html": out.html,
                "fields": out.fields,
                "requiresAcknowledgement": out.requires_ack,
                "attachments": [
                    {
                        "filename": a["filename"],
                        "contentType": a["content_type"],
                        "content": a["content"],
                    }
                    for a in out.attachments
                ],
            },
            separators=(",", ":"),
        ).encode()

    async def send(self, out: Outgoing) -> DeliveryResult:
        return await post_signed(
            self.client,
            out.recipient,
            self.body(out),
            webhook_secret(self.secret_key, out.practice),
            int(self.clock().timestamp()),
            {"X-CCM-Message-Id": out.message_id, "X-CCM-Idempotency-Key": out.idempotency_key},
            self.settings.webhook_timeout_seconds,
        )


async def post_signed(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    secret: str,
    timestamp: int,
    headers: dict[str, str],
    timeout: float,
) -> DeliveryResult:
    """POST a JSON body signed with ``secret`` (the one webhook signature scheme of the service:
    message webhooks and practice subscriptions)."""
    all_headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: webhook_signature(secret, timestamp, body),
        **headers,
    }
    try:
        response = await client.post(url, content=body, headers=all_headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return _failed(exc)
    return _http_result(response)


def _failed(exc: httpx.HTTPError) -> DeliveryResult:
    """A request that got no answer: retried, unless its destination is refused (never
    reachable: failed at once, with the reason)."""
    if (reason := refusal(exc)) is not None:
        return DeliveryResult(False, f"refused: {reason}"[:500], permanent=True)
    return DeliveryResult(False, f"{type(exc).__name__}: {exc}"[:500])


def communication(out: Outgoing, sent: datetime) -> dict:
    """The FHIR R4 Communication pushed to the EHR (identifier = the message id)."""
    resource: dict = {
        "resourceType": "Communication",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{out.message_id}"}],
        "status": "completed",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/communication-category",
                        "code": "alert" if out.requires_ack else "notification",
                    }
                ]
            }
        ],
        "priority": "urgent" if out.requires_ack else "routine",
        "sent": sent.isoformat(),
        "topic": {"text": KINDS[out.kind].title},
        "payload": [{"contentString": f"{out.subject}\n\n{out.text}"}],
    }
    if out.provider_id:
        resource["recipient"] = [{"reference": f"Practitioner/{out.provider_id}"}]
    if out.patient:
        resource["subject"] = {"reference": out.patient}
    for a in out.attachments:
        resource["payload"].append(
            {
                "contentAttachment": {
                    "contentType": a["content_type"],
                    "title": a["filename"],
                    "data": base64.b64encode(a["content"].encode()).decode(),
                }
            }
        )
    return resource


class FhirChannel:
    """Conditional create (If-None-Exist on the identifier): a retry never makes a second one."""

    def __init__(
        self,
        settings: NotificationSettings,
        clock: Callable[[], datetime],
        client: httpx.AsyncClient,
    ) -> None:
        self.settings, self.clock, self.client = settings, clock, client

    async def send(self, out: Outgoing) -> DeliveryResult:
        url = out.recipient.rstrip("/") + "/Communication"
        headers = {
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
            "If-None-Exist": f"identifier=urn:ietf:rfc:3986|urn:uuid:{out.message_id}",
        }
        try:
            response = await self.client.post(
                url,
                content=json.dumps(communication(out, self.clock())),
                headers=headers,
                timeout=self.settings.webhook_timeout_seconds,
            )
        except httpx.HTTPError as exc:
            return _failed(exc)
        return _http_result(response)
