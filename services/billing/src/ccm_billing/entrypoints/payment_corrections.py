"""HTTP API of corrections to the money recorded against an invoice: a payment voided
(recorded in error, reversed by the bank) and a refund of what a practice overpaid.

The same scope and tenancy as payments (``http.BillingTenant``: 403 without the ``billing``
scope; another practice's invoice or payment answers 404); money as payments take it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ccm_billing.entrypoints.http import (
    JSON_BODY,
    BillingTenant,
    Day,
    IdempotencyKey,
    Reference,
    day_text,
    idempotency_key,
    money_responses,
    record_money,
)
from ccm_billing.service_layer import invoicing
from ccm_shared.errors import InvalidInput


class VoidIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, description="Why the payment is voided "
                        "(recorded in error, cheque bounced, chargeback …); kept with it")


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: str = Field(description='US dollars with at most two decimals, e.g. "8.00"; at most '
                        "what the invoice owes back")
    date: Annotated[Day, BeforeValidator(day_text), Field(
        description="YYYY-MM-DD: the day the money was sent back")]
    reference: Reference = Field(None, max_length=200, description="Check or transfer "
                                  "reference; the same reference again with the same details "
                                  "is that refund (200, nothing recorded), with other details "
                                  "409")


def void_reason(text: str) -> str:
    """The reason as kept: trimmed, with something to say, and no control character but line
    breaks and tabs (a NUL is no PostgreSQL text)."""
    reason = text.strip()
    if not reason or any(not c.isprintable() and c not in "\n\t" for c in reason):
        raise InvalidInput("reason must say why the payment is voided, in text without "
                           "control characters", expression=["reason"])
    return reason


def build_payment_corrections_router(runtime) -> APIRouter:  # noqa: ANN001
    router = APIRouter(tags=["billing"])
    db = runtime.db

    @router.post("/v1/invoices/{invoice_id}/payments/{payment_id}/void",
                 summary="Void a payment recorded in error or reversed by the bank (idempotent)",
                 dependencies=JSON_BODY)
    async def void_payment(invoice_id: str, payment_id: str, tenant: BillingTenant,
                           body: VoidIn) -> dict:
        reason = void_reason(body.reason)
        async with db.unit_of_work() as uow:
            result = await invoicing.void_payment(
                uow, tenant.practice_id, invoice_id, payment_id, reason=reason,
                actor=tenant.token_id, actor_label=tenant.label, now=runtime.clock())
            await uow.commit()
        return result

    @router.post("/v1/invoices/{invoice_id}/refunds", status_code=201,
                 summary="Record a refund of what the practice overpaid (idempotent with an "
                 "Idempotency-Key or a reference)", dependencies=JSON_BODY,
                 responses=money_responses("refund"))
    async def post_refund(invoice_id: str, tenant: BillingTenant, body: RefundIn,
                          response: Response, key: IdempotencyKey = None) -> dict:
        return await record_money(
            db, response, invoicing.record_refund, tenant.practice_id, invoice_id,
            amount=invoicing.parse_amount(body.amount), refunded_on=body.date,
            reference=body.reference, now=runtime.clock(), idempotency_key=idempotency_key(key))

    return router
