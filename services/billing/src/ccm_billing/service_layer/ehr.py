"""Pushing Invoices and their ChargeItems to a practice's EHR FHIR endpoint.

A delivery row is written in the same transaction that issues or cancels the Invoice (so a push
is never lost and never precedes the commit); a background job sends due deliveries as one FHIR
transaction Bundle of PUTs (idempotent at the EHR), outside any database transaction, retrying
with exponential backoff. The delivery log records attempts, HTTP status and error class only
(never response bodies, which may carry PHI). A failed push leaves the Invoice untouched.
"""

from __future__ import annotations

import functools
import json
import uuid
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
import structlog
from sqlalchemy import bindparam, select, update

from ccm_billing.adapters import fhir, filed, orm
from ccm_shared.db import Database, UnitOfWork
from ccm_shared.errors import InvalidInput
from ccm_shared.outbound import outbound_client, refusal
from ccm_shared.text import http_url_problem

LAST_ERROR = orm.ehr_deliveries.c.last_error.type.length

log = structlog.get_logger(__name__)


def validate_base_url(url: str) -> str:
    if http_url_problem(url) is not None or (parts := urlsplit(url)).query or parts.fragment:
        raise InvalidInput("baseUrl must be an http(s) FHIR base URL without credentials, "
                           "query or fragment, e.g. https://ehr.example.org/fhir/R4",
                           expression=["baseUrl"])
    return url.rstrip("/")


def has_endpoint_clause(practice):  # noqa: ANN001, ANN201
    """Whether ``practice`` (a column or parameter) has an EHR endpoint, for a select list."""
    e = orm.ehr_endpoints
    return select(e.c.practice).where(e.c.practice == practice).exists()


@functools.cache
def _endpoint_statement():  # noqa: ANN202 - built once (every invoice issued)
    e = orm.ehr_endpoints
    return select(has_endpoint_clause(bindparam("practice", type_=e.c.practice.type)))


async def queue_delivery(uow: UnitOfWork, practice: str, invoice_id: str, now: datetime, *,
                         has_endpoint: bool | None = None) -> bool:
    """Queue a push of the invoice when the practice has an EHR endpoint (``has_endpoint``:
    whether it has, when the caller has read it in this transaction)."""
    if has_endpoint is None:
        has_endpoint = bool((await uow.session.execute(
            _endpoint_statement(), {"practice": practice})).scalar())
    if not has_endpoint:
        return False
    await uow.session.execute(orm.ehr_deliveries.insert().values(
        id=str(uuid.uuid4()), practice=practice, invoice_id=invoice_id, status="pending",
        attempts=0, next_attempt_at=now, created_at=now))
    return True


def transaction_bundle(invoice: dict, charge_items: list[dict], base_url: str) -> dict:
    """The push: a transaction of PUTs, each entry's fullUrl the resource's absolute URL at the
    EHR's ``base_url`` (where the PUT puts it)."""
    entries = [
        {"fullUrl": fhir.full_url(base_url, r), "resource": r,
         "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in [*charge_items, invoice]
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def _load(db: Database, delivery_id: str):  # noqa: ANN202
    d, e, i, ci = orm.ehr_deliveries, orm.ehr_endpoints, orm.invoices, filed.charge_items
    async with db.unit_of_work() as uow:
        row = (await uow.session.execute(select(d).where(d.c.id == delivery_id))).first()
        endpoint = (await uow.session.execute(select(e).where(e.c.practice == row.practice))).first()
        invoice = (await uow.session.execute(select(i).where(i.c.id == row.invoice_id))).first()
        resource = await filed.invoice_resource(uow.session, invoice)
        items = (await uow.session.execute(select(ci.c.resource).where(ci.c.invoice_id == row.invoice_id)
                                           .order_by(ci.c.id))).scalars().all()
    return row, endpoint, resource, [json.loads(x) for x in items]


async def deliver_due(db: Database, now: datetime, *, transport: httpx.AsyncBaseTransport | None = None,
                      allow_private: bool = False,
                      max_attempts: int = 8, backoff: float = 30.0, backoff_max: float = 3600.0,
                      timeout: float = 15.0, limit: int = 50) -> dict[str, int]:
    """Send the deliveries that are due; returns counts by outcome. The client is made only when
    something is due: ``ccm_shared.outbound``'s (guarded unless ``allow_private``, the
    environment's proxies), or one on ``transport`` (tests)."""
    d = orm.ehr_deliveries
    async with db.unit_of_work() as uow:
        due = (await uow.session.execute(
            select(d.c.id).where(d.c.status == "pending", d.c.next_attempt_at <= now)
            .order_by(d.c.next_attempt_at).limit(limit))).scalars().all()
    counts = {"delivered": 0, "retrying": 0, "failed": 0}
    if not due:
        return counts
    client = (httpx.AsyncClient(transport=transport, timeout=timeout) if transport is not None
              else outbound_client(allow_private=allow_private, timeout=timeout))
    async with client:
        for delivery_id in due:
            row, endpoint, invoice, items = await _load(db, delivery_id)
            status, error, permanent = None, None, False
            if endpoint is None:
                error, permanent = "endpoint removed", True
            else:
                headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
                if endpoint.authorization:
                    headers["Authorization"] = endpoint.authorization
                try:
                    response = await client.post(endpoint.base_url, headers=headers,
                                                 content=json.dumps(transaction_bundle(
                                                     invoice, items, endpoint.base_url)))
                    status = response.status_code
                    if not response.is_success:
                        error = f"HTTP {status}"
                except httpx.HTTPError as exc:
                    if (reason := refusal(exc)) is not None:  # never reachable: not retried
                        # Cut to what the log holds: a host name may have 253 characters.
                        error, permanent = f"refused: {reason}"[:LAST_ERROR], True
                    else:
                        error = type(exc).__name__
            attempts = row.attempts + 1
            if error is None:
                values = {"status": "delivered", "delivered_at": now, "last_error": None}
                counts["delivered"] += 1
            elif attempts >= max_attempts or permanent:
                values = {"status": "failed", "last_error": error}
                counts["failed"] += 1
            else:
                delay = min(backoff * 2 ** (attempts - 1), backoff_max)
                values = {"last_error": error, "next_attempt_at": now + timedelta(seconds=delay)}
                counts["retrying"] += 1
            async with db.unit_of_work() as uow:
                await uow.session.execute(update(d).where(d.c.id == delivery_id).values(
                    attempts=attempts, last_status=status, **values))
                await uow.commit()
            log.info("ehr push", practice=row.practice, outcome=values.get("status", "retrying"),
                     http_status=status, attempts=attempts)
    return counts


def delivery_view(row) -> dict:  # noqa: ANN001
    return {
        "id": row.id, "invoiceId": row.invoice_id, "status": row.status, "attempts": row.attempts,
        "nextAttemptAt": row.next_attempt_at.isoformat() if row.status == "pending" else None,
        "lastStatus": row.last_status, "lastError": row.last_error,
        "createdAt": row.created_at.isoformat(),
        "deliveredAt": row.delivered_at.isoformat() if row.delivered_at else None,
    }
