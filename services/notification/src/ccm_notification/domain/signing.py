"""Signed, expiring links and webhook signatures (HMAC-SHA256; pure).

Link token: ``base64url(json payload) "." base64url(hmac)``; the payload carries its purpose and
expiry (unix seconds) so a link for one action can never be replayed for another.

Webhook signature header ``X-CCM-Signature: t=<unix seconds>,v1=<hex hmac>`` where the HMAC is
over ``"<t>." + raw body``. Receivers recompute it with their secret, compare in constant time,
and reject a timestamp older than their tolerance (replays).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime
from typing import Any


class LinkInvalid(Exception):
    """The link was altered, is for another purpose, or is not a link at all."""


class LinkExpired(Exception):
    """The link was genuine but its time is up."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_key(secret: str, purpose: str) -> bytes:
    """One key per purpose, so a leaked webhook secret cannot forge acknowledgement links."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()


def sign_link(secret: str, purpose: str, payload: dict[str, Any], expires_at: datetime) -> str:
    body = json.dumps(
        {**payload, "purpose": purpose, "exp": int(expires_at.timestamp())},
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    mac = hmac.new(derive_key(secret, "link"), body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(mac)}"


def verify_link(secret: str, purpose: str, token: str, now: datetime) -> dict[str, Any]:
    """The payload of a genuine, unexpired link for ``purpose``; otherwise raise."""
    try:
        body_part, mac_part = token.split(".")
        body, mac = _unb64(body_part), _unb64(mac_part)
    except (ValueError, TypeError):
        raise LinkInvalid("malformed link") from None
    expected = hmac.new(derive_key(secret, "link"), body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise LinkInvalid("signature does not match")
    payload = json.loads(body)
    if payload.get("purpose") != purpose:
        raise LinkInvalid("link is for another action")
    if now.timestamp() >= payload["exp"]:
        raise LinkExpired("link has expired")
    return payload


def webhook_secret(secret: str, practice: str) -> str:
    """The practice's webhook signing secret (derived, so nothing extra is stored)."""
    return (
        "whsec_"
        + hmac.new(derive_key(secret, "webhook"), practice.encode(), hashlib.sha256).hexdigest()
    )


def webhook_signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_webhook(secret: str, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """What a receiver does: right signature and a timestamp within ``tolerance`` seconds."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = webhook_signature(secret, timestamp, body)
    return hmac.compare_digest(expected, header.strip())
