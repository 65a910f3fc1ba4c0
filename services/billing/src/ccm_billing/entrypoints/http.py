"""HTTP API of the billing service: worklist, close, reports, invoices, payments, FHIR reads
(voids and refunds: ``payment_corrections``).

Two scopes (README, "Scopes"): every read (GET) takes a token with ``billing:read`` or
``billing`` (``BillingReader``), what a practice's own system gets; every write — a payment, a
void, a refund, a close, a recompute, a duplicate-biller release or reclaim, the EHR endpoint, a
push retried — needs ``billing`` (``BillingTenant``), the CCM vendor's staff. Without the scope
a route needs → 403 (problem+json, an OperationOutcome under /fhir) before anything is read or
written."""

from __future__ import annotations

import json
from datetime import UTC, datetime, tzinfo
from datetime import date as Day  # a field is named date
from email.utils import format_datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import and_, delete, false, func, insert, or_, select, true

from ccm_billing.adapters import fhir, filed, orm
from ccm_billing.domain.model import Month
from ccm_billing.domain.payments import balance_of
from ccm_billing.domain.rules import RulesetMissing, ruleset_for
from ccm_billing.service_layer import corrections, ehr, invoicing, worklist
from ccm_billing.service_layer.common import practice_info, practice_zone
from ccm_billing.service_layer.decisions import duplicate_patients
from ccm_shared import fhir_dates
from ccm_shared.db import dialect_insert
from ccm_shared.errors import AppError, Conflict, Forbidden, InvalidInput, NotFound
from ccm_shared.http import TenantDep, json_body_after
from ccm_shared.outbound import refuse_unreachable
from ccm_shared.tenancy import Tenant

FHIR_JSON = "application/fhir+json"
# A route answering CSV, as its document says (FastAPI documents a Response as no body).
CSV = {200: {"description": "CSV (UTF-8, a header row first)",
             "content": {"text/csv": {"schema": {"type": "string"}}}}}
SCOPE = "billing"
READ_SCOPE = "billing:read"


async def billing_tenant(tenant: TenantDep) -> Tenant:
    """The caller of a write, when its token carries the ``billing`` scope; else 403 (an EHR
    connection's fhir:read + fhir:write token, and a practice system's ``billing:read`` token,
    must not record or void payments, refund, close or recompute months, release patients or
    set the EHR endpoint)."""
    tenant.require_scope(SCOPE)
    return tenant


async def billing_reader(tenant: TenantDep) -> Tenant:
    """The caller of a read, when its token carries ``billing:read`` or ``billing`` (which
    reads too, as every token made before ``billing:read`` existed); else 403."""
    if not {SCOPE, READ_SCOPE} & tenant.scopes:
        raise Forbidden(f"this token lacks the {READ_SCOPE!r} scope (or {SCOPE!r})")
    return tenant


BillingTenant = Annotated[Tenant, Depends(billing_tenant)]
BillingReader = Annotated[Tenant, Depends(billing_reader)]

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def conflict(why: str) -> dict:
    """A route's own 409 (``Conflict``), documented with what it means (the platform's
    derivation, ``ccm_shared.http._platform_answers``, cannot know it)."""
    return {409: {"description": f"Conflict: {why}", "content": PROBLEM}}


def money_responses(kind: str) -> dict:
    """What a payment or refund answers besides the platform's errors: 201 recorded, 200 the
    same request again (Idempotency-Key or reference with the same details: nothing recorded),
    409 refused."""
    why = {"payment": "the invoice is cancelled (its replacement, named, takes payments; one "
                      "cancelled without replacement takes only the refunded money it is owed "
                      "back), or the reference was recorded with other details",
           "refund": "the invoice owes nothing back, or is cancelled and its replacement "
                     "carries its payments (refund against it, named), or the reference was "
                     "recorded with other details"}[kind]
    return {201: {"description": f"The {kind} recorded"},
            200: {"description": f"The same {kind} request again (its Idempotency-Key, or its "
                                 "reference, with the same amount, date and reference): the "
                                 f"{kind} it recorded, with the invoice as it is now; nothing "
                                 "is recorded",
                  "content": {"application/json": {"schema": {"type": "object"}}}},
            **conflict(why)}


# The Idempotency-Key header of a payment or refund (recommended: a new random key per
# payment, the same one on every retry of it).
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=200,
    description="A key the client makes for this payment (e.g. a UUID) and sends again on "
                "every retry of it: the same key with the same body answers what the first "
                "recorded (200) instead of recording it twice; with another body, 422. Printable "
                "ASCII, 1-200 characters; a key names one request of this invoice")]


def idempotency_key(value: str | None) -> str | None:
    """The header's key, or 422: printable ASCII (a key is compared byte for byte)."""
    if value is not None and not (value.isascii() and value.isprintable()):
        raise InvalidInput("Idempotency-Key must be printable ASCII, 1-200 characters",
                           expression=["Idempotency-Key"])
    return value

# A route whose body is a model (a payment with a key twice was recorded for the last amount);
# close and retry take no body.
JSON_BODY = json_body_after(billing_tenant)


def parse_month(text: str, name: str = "month") -> Month:
    """A billing month of a request (``name``: the parameter): 422 for text that is no month,
    and for a month no billing rules cover (before the earliest calendar year: nothing of it
    can be decided, and reading it answered 500)."""
    try:
        month = Month.parse(text)
        ruleset_for(month)
    except (ValueError, RulesetMissing) as exc:
        raise InvalidInput(str(exc), expression=[name]) from None
    return month


def day_text(value: object) -> object:
    """A date is written YYYY-MM-DD: a number (read as a Unix time) is refused."""
    if not isinstance(value, str):
        raise ValueError("a date is written YYYY-MM-DD")
    return value


async def record_money(db, response: Response, record, *args, **kw):  # noqa: ANN001, ANN201
    """A payment or a refund (``record``: invoicing's) in a unit of work of its own; a replay of
    one recorded before (its Idempotency-Key or reference with the same details) answers 200."""
    async with db.unit_of_work() as uow:
        result = await record(uow, *args, **kw)
        await uow.commit()
    if result.replayed:
        response.status_code = 200
    return result


def no_reference_if_blank(value: object) -> object:
    """An empty (or blank) reference is no reference: it names no check or transfer. Kept as
    sent, the second payment with one on an invoice broke the unique index of references (a
    500), and none was looked up as the same payment."""
    return None if isinstance(value, str) and not value.strip() else value


Reference = Annotated[str | None, BeforeValidator(no_reference_if_blank)]


class PaymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: str = Field(description='US dollars with at most two decimals, e.g. "120.50"')
    date: Annotated[Day, BeforeValidator(day_text), Field(description="YYYY-MM-DD")]
    reference: Reference = Field(None, max_length=200, description="Check or transfer reference; "
                                  "the same reference again with the same details is that "
                                  "payment (200, nothing recorded), with other details 409")


class EhrEndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    baseUrl: str = Field(max_length=500, description="FHIR R4 base URL of the practice's EHR")
    authorization: str | None = Field(
        None, max_length=2000, description="Authorization header value sent with each push "
        "(e.g. 'Bearer …'); never shown again")


class DuplicateResolution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["release", "reclaim"] = Field(
        description="release: this practice will not bill CCM for the patient this month (only "
                    "while the patient is flagged duplicate-biller); reclaim: take a release "
                    "back (the flag is raised again in both practices until one releases)"
    )


def build_router(runtime) -> APIRouter:  # noqa: ANN001
    router = APIRouter(tags=["billing"])
    db = runtime.db

    def settings():  # noqa: ANN202
        return runtime.service_settings()

    @router.get("/v1/practices/{practice}/billing-periods/{month}/worklist",
                summary="Who is billable, blocked or short of a threshold this month, and why")
    async def get_worklist(
        practice: str, month: str, tenant: BillingReader,
        status: Annotated[Literal["all", "billable", "blocked", "near-threshold"],
                          Query(description="Filter rows")] = "all",
    ) -> dict:
        tenant.require_practice(practice)
        mo = parse_month(month)
        async with db.unit_of_work() as uow:
            info = await practice_info(uow.session, practice)
            return await worklist.worklist(uow.session, info, mo, status=status,
                                           near_minutes=settings().near_threshold_minutes)

    @router.post("/v1/practices/{practice}/billing-periods/{month}/close",
                 summary="Close the month: lock its time, issue ChargeItems and the Invoice (idempotent)",
                 responses=conflict("the month has not ended in the practice's time zone"))
    async def close(practice: str, month: str, tenant: BillingTenant) -> dict:
        tenant.require_practice(practice)
        mo = parse_month(month)
        async with db.unit_of_work() as uow:
            result = await invoicing.close_period(uow, practice, mo, runtime.clock())
            await uow.commit()
        return result

    async def report_doc(practice: str, month: str, tenant) -> dict:  # noqa: ANN001
        tenant.require_practice(practice)
        mo = parse_month(month)
        async with db.unit_of_work() as uow:
            return await worklist.report(uow.session, await practice_info(uow.session, practice), mo)

    @router.get("/v1/practices/{practice}/billing-periods/{month}/report.json",
                summary="Audit report: per patient minutes by role, codes, amounts, blockers")
    async def report_json(practice: str, month: str, tenant: BillingReader) -> dict:
        return await report_doc(practice, month, tenant)

    @router.get("/v1/practices/{practice}/billing-periods/{month}/report.csv",
                summary="Audit report as CSV (one row per patient × code, TOTAL row last)",
                response_class=Response, responses=CSV)
    async def report_csv(practice: str, month: str, tenant: BillingReader) -> Response:
        doc = await report_doc(practice, month, tenant)
        return Response(worklist.report_csv(doc), media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="ccm-{practice}-{month}.csv"'})

    @router.post("/v1/practices/{practice}/billing-periods/{month}/duplicates/{patient}/resolve",
                 summary="Resolve a duplicate-biller flag: this practice releases the patient-month "
                 "(or reclaims a release)",
                 dependencies=JSON_BODY,
                 responses=conflict("release: the patient is not flagged duplicate-biller that "
                                    "month; reclaim: there is no release to take back"))
    async def resolve_duplicate(practice: str, month: str, patient: str, tenant: BillingTenant,
                                body: DuplicateResolution) -> dict:
        tenant.require_practice(practice)
        mo = parse_month(month)
        rel = orm.duplicate_releases
        async with db.unit_of_work() as uow:
            p = orm.patients
            known = (await uow.session.execute(select(p.c.patient_id, p.c.mbi).where(
                p.c.practice == practice, p.c.patient_id == patient))).first()
            if known is None:
                raise NotFound(f"patient {patient!r} not found")
            mine = and_(rel.c.practice == practice, rel.c.month == str(mo),
                        rel.c.patient == patient)
            exists = (await uow.session.execute(select(rel.c.patient).where(mine))).first()
            if body.decision == "reclaim":
                if exists is None:
                    raise Conflict(f"patient {patient!r} was not released for {mo}: nothing "
                                   "to reclaim")
                await uow.session.execute(delete(rel).where(mine))
            elif exists is None:
                # A release of a patient no other practice bills would only stop this one
                # billing it (there was no flag to resolve, and no one else bills instead).
                if not await duplicate_patients(uow.session, practice, str(mo), patient=patient):
                    raise Conflict(f"patient {patient!r} is not flagged duplicate-biller in "
                                   f"{mo} (no other practice has finished CCM time for the "
                                   "same MBI): there is nothing to release")
                await uow.session.execute(insert(rel).values(
                    practice=practice, month=str(mo), patient=patient, released_at=runtime.clock()))
            # Closed months follow at once, in every practice with the MBI: the other practice's
            # patient billed again after a release (flagged again after a reclaim).
            plan = await corrections.duplicate_plan(uow, [known.mbi], [str(mo)])
            await corrections.correct_duplicates(uow, plan, corrections.DUPLICATE_RELEASE,
                                                 runtime.clock())
            await uow.commit()
        return {"patient": f"Patient/{patient}", "month": str(mo), "decision": body.decision}

    @router.get("/v1/practices/{practice}/invoices", summary="The practice's invoices")
    async def list_invoices(
        practice: str, tenant: BillingReader,
        status: Annotated[Literal["issued", "partially-paid", "balanced", "cancelled", "overdue",
                                  "refund-due", "repayment-due"] | None,
                          Query(description=(
                              "Filter by status; refund-due: the invoices that owe the "
                              "practice money back (balance below 0: overpaid, or cancelled "
                              "without replacement after being paid), to refund; "
                              "repayment-due: the cancelled invoices the practice owes a "
                              "refund back (a payment voided after its refund)"))] = None,
    ) -> dict:
        tenant.require_practice(practice)
        i = orm.invoices
        stmt = (select(*invoicing.view_columns()).where(i.c.practice == practice)
                .order_by(i.c.month, i.c.revision))
        if status == "overdue":
            stmt = stmt.where(i.c.overdue.is_(True), i.c.status == "issued")
        elif status in ("partially-paid",):
            stmt = stmt.where(i.c.payment_status == status, i.c.status == "issued")
        elif status == "issued":
            stmt = stmt.where(i.c.status == "issued", i.c.payment_status == "issued")
        elif status == "repayment-due":
            stmt = stmt.where(i.c.status == "cancelled", i.c.replaced_by.is_(None))
        elif status not in (None, "refund-due"):
            stmt = stmt.where(i.c.status == status)
        async with db.unit_of_work() as uow:
            rows = (await uow.session.execute(stmt)).all()
        if status in ("refund-due", "repayment-due"):  # by the balance (a few a month)
            owed = {"refund-due": lambda b: b < 0, "repayment-due": lambda b: b > 0}[status]
            rows = [r for r in rows if owed(balance_of(r.total_net, r.paid, r.status,
                                                       r.replaced_by))]
        return {"practice": practice, "invoices": [invoicing.invoice_view(r) for r in rows]}

    @router.get("/v1/invoices/{invoice_id}", summary="One invoice with its payments")
    async def get_invoice(invoice_id: str, tenant: BillingReader) -> dict:
        async with db.unit_of_work() as uow:
            row = await invoicing.get_invoice_row(uow.session, invoice_id, tenant.practice_id,
                                                  resource=False)
            if row is None:
                raise NotFound(f"invoice {invoice_id!r} not found")
            p, r = orm.payments, orm.refunds
            pays = (await uow.session.execute(select(p).where(p.c.invoice_id == invoice_id)
                                              .order_by(p.c.recorded_at, p.c.id))).all()
            refunds = (await uow.session.execute(select(r).where(r.c.invoice_id == invoice_id)
                                                 .order_by(r.c.recorded_at, r.c.id))).all()
        return {**invoicing.invoice_view(row),
                "payments": [invoicing.payment_view(x) for x in pays],
                "refunds": [invoicing.refund_view(x) for x in refunds]}

    @router.post("/v1/invoices/{invoice_id}/payments", status_code=201,
                 summary="Record a payment against an invoice (idempotent with an "
                 "Idempotency-Key or a reference)", dependencies=JSON_BODY,
                 responses=money_responses("payment"))
    async def post_payment(invoice_id: str, tenant: BillingTenant, body: PaymentIn,
                           response: Response, key: IdempotencyKey = None) -> dict:
        return await record_money(
            db, response, invoicing.record_payment, tenant.practice_id, invoice_id,
            amount=invoicing.parse_amount(body.amount), paid_on=body.date,
            reference=body.reference, now=runtime.clock(), idempotency_key=idempotency_key(key))

    @router.post("/v1/practices/{practice}/billing-periods/{month}/recompute",
                 summary="Recompute a closed month now (cancel and reissue when lines changed)",
                 dependencies=JSON_BODY, responses=conflict("the month is not closed"))
    async def recompute_now(practice: str, month: str, tenant: BillingTenant,
                            reason: Annotated[str, Body(embed=True, max_length=500)]) -> dict:
        tenant.require_practice(practice)
        mo = parse_month(month)
        async with db.unit_of_work() as uow:
            if await invoicing.get_period(uow.session, practice, mo) is None:
                raise Conflict(f"{mo} is not closed")
            changed = await corrections.recompute(uow, practice, str(mo), reason,
                                                  runtime.clock())
            await uow.commit()
        return {"month": str(mo), "reissued": changed}

    # -- EHR push ------------------------------------------------------------------------------

    @router.put("/v1/practices/{practice}/ehr-endpoint",
                summary="Set the EHR FHIR endpoint Invoices and ChargeItems are pushed to",
                dependencies=JSON_BODY)
    async def put_ehr_endpoint(practice: str, tenant: BillingTenant, body: EhrEndpointIn) -> dict:
        tenant.require_practice(practice)
        url = ehr.validate_base_url(body.baseUrl)
        await refuse_unreachable(url, "baseUrl",
                                 allow_private=runtime.settings.outbound_private_allowed)
        if body.authorization is not None and not (body.authorization.isascii()
                                                   and body.authorization.isprintable()):
            # Sent as a header: a line break or control character would end or forge one.
            raise InvalidInput("authorization must be printable ASCII (a header value, e.g. "
                               "'Bearer …')", expression=["authorization"])
        e = orm.ehr_endpoints
        values = {"base_url": url, "authorization": body.authorization,
                  "updated_at": runtime.clock()}
        async with db.unit_of_work() as uow:
            # One statement: concurrent PUTs each replace the row (a delete, then an insert, let
            # two inserts meet on the key: 500), the last one's values stay.
            await uow.session.execute(
                dialect_insert(uow.session.bind.dialect.name)(e)
                .values(practice=practice, **values)
                .on_conflict_do_update(index_elements=["practice"], set_=values))
            await uow.commit()
        return {"baseUrl": url, "hasAuthorization": body.authorization is not None}

    @router.get("/v1/practices/{practice}/ehr-endpoint", summary="The practice's EHR endpoint")
    async def get_ehr_endpoint(practice: str, tenant: BillingReader) -> dict:
        tenant.require_practice(practice)
        e = orm.ehr_endpoints
        async with db.unit_of_work() as uow:
            row = (await uow.session.execute(select(e).where(e.c.practice == practice))).first()
        if row is None:
            raise NotFound("no EHR endpoint configured")
        return {"baseUrl": row.base_url, "hasAuthorization": row.authorization is not None}

    @router.delete("/v1/practices/{practice}/ehr-endpoint", status_code=204,
                   summary="Stop pushing to the EHR")
    async def delete_ehr_endpoint(practice: str, tenant: BillingTenant) -> Response:
        tenant.require_practice(practice)
        e = orm.ehr_endpoints
        async with db.unit_of_work() as uow:
            await uow.session.execute(e.delete().where(e.c.practice == practice))
            await uow.commit()
        return Response(status_code=204)

    @router.get("/v1/practices/{practice}/ehr-deliveries", summary="Delivery log of EHR pushes")
    async def list_deliveries(
        practice: str, tenant: BillingReader,
        status: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
    ) -> dict:
        tenant.require_practice(practice)
        d = orm.ehr_deliveries
        stmt = select(d).where(d.c.practice == practice).order_by(d.c.created_at, d.c.id)
        if status is not None:
            stmt = stmt.where(d.c.status == status)
        async with db.unit_of_work() as uow:
            rows = (await uow.session.execute(stmt)).all()
        return {"deliveries": [ehr.delivery_view(r) for r in rows]}

    @router.post("/v1/practices/{practice}/ehr-deliveries/{delivery_id}/retry",
                 summary="Send a failed push again",
                 responses=conflict("the delivery has not failed (only failed ones are retried)"))
    async def retry_delivery(practice: str, delivery_id: str, tenant: BillingTenant) -> dict:
        tenant.require_practice(practice)
        d = orm.ehr_deliveries
        async with db.unit_of_work() as uow:
            row = (await uow.session.execute(select(d).where(
                d.c.id == delivery_id, d.c.practice == practice))).first()
            if row is None:
                raise NotFound(f"delivery {delivery_id!r} not found")
            if row.status != "failed":
                raise Conflict(f"delivery is {row.status}; only failed deliveries are retried")
            await uow.session.execute(d.update().where(d.c.id == delivery_id).values(
                status="pending", attempts=0, next_attempt_at=runtime.clock()))
            await uow.commit()
            row = (await uow.session.execute(select(d).where(d.c.id == delivery_id))).first()
        return ehr.delivery_view(row)

    # -- FHIR reads ----------------------------------------------------------------------------

    def fhir_base(request: Request) -> str:
        """This server's /fhir, as the fullUrl of a searchset's entries has it: the configured
        ``CCM_BILLING_FHIR_BASE_URL``, else the one the request came to."""
        configured = settings().fhir_base_url
        return (configured or f"{str(request.base_url).rstrip('/')}/fhir").rstrip("/")

    def fhir_response(doc: dict) -> Response:
        return Response(json.dumps(doc), media_type=FHIR_JSON)

    @router.get("/fhir/Invoice/{resource_id}", tags=["fhir"], summary="FHIR R4 Invoice",
                responses=VERSIONED)
    async def fhir_invoice(resource_id: str, tenant: BillingReader) -> Response:
        async with db.unit_of_work() as uow:
            row = await invoicing.get_invoice_row(uow.session, resource_id, tenant.practice_id)
            if row is None:
                raise NotFound(f"Invoice/{resource_id} not found")
            return versioned_response(await filed.invoice_resource(uow.session, row), row)

    @router.get("/fhir/ChargeItem/{resource_id}", tags=["fhir"], summary="FHIR R4 ChargeItem",
                responses=VERSIONED)
    async def fhir_charge_item(resource_id: str, tenant: BillingReader) -> Response:
        ci = filed.charge_items
        async with db.unit_of_work() as uow:
            row = (await uow.session.execute(select(*SERVED_COLUMNS(ci)).where(
                ci.c.id == resource_id, ci.c.practice == tenant.practice_id))).first()
        if row is None:
            raise NotFound(f"ChargeItem/{resource_id} not found")
        return versioned_response(json.loads(row.resource), row)

    @router.get("/fhir/Invoice", tags=["fhir"],
                summary="Search Invoices: _id, identifier, status, recipient, date (paged: "
                        "_count, _offset)")
    async def search_invoices(request: Request, tenant: BillingReader,
                              ids: Ids = None, identifier: Identifiers = None,
                              status: Annotated[list[str] | None, Query(description=(
                                  "issued, balanced or cancelled (a comma: any of them)"))] = None,
                              recipient: Annotated[list[str] | None, Query(description=(
                                  "Organization/{practice}: the caller's practice"))] = None,
                              date: Annotated[list[str] | None, Query(description=(
                                  "Invoice.date, when it was issued (a date: the practice's day): "
                                  "2025-04, ge2025-04-01, lt2025-05, "
                                  "ge2025-04-01T12:00:00Z; prefixes eq, ne, gt, lt, ge, le, sa, "
                                  "eb (given twice: both); a value that is no date: 400"))] = None,
                              last_updated: LastUpdated = None,
                              count: PageCount = DEFAULT_PAGE,
                              offset: PageOffset = 0) -> Response:
        criteria = search_criteria(request, INVOICE_SEARCH)
        dates = [date_criterion(d) for d in date or []]
        updated = [date_criterion(v, "_lastUpdated") for v in last_updated or []]
        i = orm.invoices
        where = [i.c.practice == tenant.practice_id,
                 *(i.c.id.in_(any_of(v, "_id")) for v in ids or []),
                 *(i.c.status.in_(any_of(v, "status")) for v in status or [])]
        for value in identifier or []:
            values = identified(value, fhir.INVOICE_SYSTEM)
            if values is not None:  # None: any of ours (system|)
                where.append(i.c.id.in_([fhir.invoice_id_of(v) for v in values]))
        if any(r.removeprefix("Organization/") != tenant.practice_id for r in recipient or []):
            where.append(false())  # another recipient's Invoices are none of this practice's
        async with db.unit_of_work() as uow:
            # A date without a time is the practice's day.
            zone = await practice_zone(uow.session, tenant.practice_id) if (
                dates or updated) else UTC
            where += [instant_condition(i.c.last_updated, c, zone) for c in updated]
            found = [(r, json.loads(r.resource)) for r in (await uow.session.execute(
                select(i).where(*where).order_by(i.c.month, i.c.revision))).all()]
            if dates:
                found = [(r, d) for r, d in found
                         if all(date_matches(d["date"], c, zone) for c in dates)]
            page = found[offset:offset + count]  # a practice has a few Invoices a month
            invoices = [fhir.with_meta(doc, r.version_id, r.last_updated) for (r, _), doc in zip(
                page, await filed.invoice_resources(uow.session, [r for r, _ in page],
                                                    [d for _, d in page]), strict=True)]
        return fhir_response(fhir.search_bundle(invoices, request.url, criteria=criteria,
                                                total=len(found), count=count, offset=offset,
                                                max_offset=MAX_OFFSET, base=fhir_base(request)))

    @router.get("/fhir/ChargeItem", tags=["fhir"],
                summary="Search ChargeItems: _id, identifier, status, subject (paged: _count, "
                        "_offset)")
    async def search_charge_items(request: Request, tenant: BillingReader,
                                  ids: Ids = None, identifier: Identifiers = None,
                                  status: Annotated[list[str] | None, Query(description=(
                                      "billable or entered-in-error (a comma: either)"))] = None,
                                  subject: Annotated[list[str] | None, Query(description=(
                                      "Patient/{id}"))] = None,
                                  last_updated: LastUpdated = None,
                                  count: PageCount = DEFAULT_PAGE,
                                  offset: PageOffset = 0) -> Response:
        criteria = search_criteria(request, CHARGE_ITEM_SEARCH)
        updated = [date_criterion(v, "_lastUpdated") for v in last_updated or []]
        ci = filed.charge_items
        where = [ci.c.practice == tenant.practice_id,
                 *(ci.c.id.in_(any_of(v, "_id")) for v in ids or []),
                 *(ci.c.status.in_(any_of(v, "status")) for v in status or [])]
        for value in subject or []:
            if not value.startswith("Patient/"):
                raise SearchRefused("not-supported", "subject must be Patient/{id}", "subject")
            where.append(ci.c.patient == value.removeprefix("Patient/"))
        for value in identifier or []:
            values = identified(value, fhir.CHARGE_ITEM_SYSTEM)
            if values is not None:
                # {practice}:{patient}:{month}:{code}: each revision's ChargeItem has it
                where.append(or_(false(), *(
                    and_(ci.c.patient == patient, ci.c.month == month, ci.c.code == code)
                    for practice, patient, month, code in (
                        v.split(":") for v in values if v.count(":") == 3)
                    if practice == tenant.practice_id)))
        async with db.unit_of_work() as uow:
            if updated:  # a date without a time is the practice's day
                zone = await practice_zone(uow.session, tenant.practice_id)
                where += [instant_condition(ci.c.last_updated, c, zone) for c in updated]
            total = (await uow.session.execute(
                select(func.count()).select_from(ci).where(*where))).scalar_one()
            rows = [fhir.with_meta(json.loads(r.resource), r.version_id, r.last_updated)
                    for r in (await uow.session.execute(
                        select(*SERVED_COLUMNS(ci)).where(*where).order_by(ci.c.month, ci.c.id)
                        .limit(count).offset(offset))).all()] if count else []
        return fhir_response(fhir.search_bundle(rows, request.url, criteria=criteria,
                                                total=total, count=count, offset=offset,
                                                max_offset=MAX_OFFSET, base=fhir_base(request)))

    return router


DEFAULT_PAGE = 50
MAX_COUNT, MAX_OFFSET = 1000, 100_000
PageCount = Annotated[int, Query(alias="_count", ge=0, le=MAX_COUNT, description=(
    "Resources per page (at most 1,000; 0: the total only); the Bundle's next link gives "
    "the next page"))]
PageOffset = Annotated[int, Query(alias="_offset", ge=0, le=MAX_OFFSET, description=(
    "Resources to skip (the next and previous links carry it)"))]
Ids = Annotated[list[str] | None, Query(alias="_id", description=(
    "The resource's id (a comma: any of them; given twice: both)"))]
Identifiers = Annotated[list[str] | None, Query(description=(
    "The resource's identifier: value, or system|value"))]
LastUpdated = Annotated[list[str] | None, Query(alias="_lastUpdated", description=(
    "meta.lastUpdated, when what is served of the resource last changed (a date: the "
    "practice's day): 2025-04, ge2025-04-01, lt2025-04-02T12:00:00Z; prefixes eq, ne, gt, lt, "
    "ge, le, sa, eb (given twice: both); a time needs its zone; a value that is no date: 400"))]
# What a read of a resource answers besides its body: its version as headers.
VERSIONED = {200: {"description": "The resource, with meta.versionId and meta.lastUpdated",
                   "headers": {
                       "ETag": {"description": 'W/"<meta.versionId>"',
                                "schema": {"type": "string"}},
                       "Last-Modified": {"description": "meta.lastUpdated, as an HTTP date",
                                         "schema": {"type": "string"}}}}}


def SERVED_COLUMNS(table) -> list:  # noqa: ANN001, N802 - columns, named as a constant's use
    """The columns a ChargeItem is served from: its resource and version."""
    return [table.c.resource, table.c.version_id, table.c.last_updated]


def versioned_response(resource: dict, row) -> Response:  # noqa: ANN001
    """A read of one resource: with ``meta`` from its row (``version_id``, ``last_updated``),
    ``ETag: W/"<versionId>"`` and ``Last-Modified`` (FHIR http.html#read: "should")."""
    return Response(json.dumps(fhir.with_meta(resource, row.version_id, row.last_updated)),
                    media_type=FHIR_JSON, headers={
                        "ETag": f'W/"{row.version_id}"',
                        "Last-Modified": format_datetime(row.last_updated.astimezone(UTC),
                                                         usegmt=True)})

# The parameters each search takes; any other is refused (400), never ignored: FHIR's server
# SHALL NOT ignore one silently, and ``_id=does-not-exist`` answered every Invoice.
INVOICE_SEARCH = ("_id", "identifier", "status", "recipient", "date", "_lastUpdated", "_count",
                  "_offset")
CHARGE_ITEM_SEARCH = ("_id", "identifier", "status", "subject", "_lastUpdated", "_count",
                      "_offset")
# Parameters of how to answer, not what to find: the answer is JSON either way (as ingest's).
IGNORED = frozenset({"_format", "_pretty"})
PAGING = ("_count", "_offset")
# Ids or codes one parameter may list (each a database parameter), as ingest's _id.
MAX_VALUES = 1_000


class SearchRefused(AppError):
    """A search parameter refused: 400, FHIR's status for a search it cannot do (the other
    APIs answer InvalidInput's 422); ``code`` is the OperationOutcome's issue type."""

    status, title = 400, "Bad request"

    def __init__(self, code: str, detail: str, parameter: str) -> None:
        super().__init__(detail, expression=[parameter])
        self.code = code


def search_criteria(request: Request, supported: tuple[str, ...]) -> list[tuple[str, str]]:
    """A search's criteria as given, in order: its parameters less the paging and ``IGNORED``
    (its Bundle's links name these and the paging, nothing else). 400 for a parameter it does
    not take, and for paging given twice (which one counts would be a guess)."""
    given = [(k, v) for k, v in request.query_params.multi_items() if k not in IGNORED]
    for name, _ in given:
        if name not in supported:
            raise SearchRefused("not-supported", f"search parameter {name!r} is not supported; "
                                f"supported: {', '.join(supported)}", name)
    for name in PAGING:
        if sum(k == name for k, _ in given) > 1:
            raise SearchRefused("value", f"{name} is given more than once", name)
    return [(k, v) for k, v in given if k not in PAGING]


def any_of(value: str, name: str) -> list[str]:
    """The alternatives of a token parameter's value (``a,b``: either)."""
    values = value.split(",")
    if len(values) > MAX_VALUES:
        raise SearchRefused("too-costly", f"{name} takes at most {MAX_VALUES:,} values, not "
                            f"{len(values):,}", name)
    return values


def identified(value: str, system: str) -> list[str] | None:
    """The identifier values an ``identifier`` search asks for among ours, which all have
    ``system``: each alternative's value, or ``system|value``; None for ``system|`` (any of
    ours). ``|value`` (no system) and another system's value are none of ours."""
    values = []
    for alternative in any_of(value, "identifier"):
        if "|" not in alternative:
            values.append(alternative)
            continue
        named, _, code = alternative.partition("|")
        if named != system:
            continue
        if not code:
            return None
        values.append(code)
    return values


def date_criterion(query: str, name: str = "date") -> fhir_dates.DateCriterion:
    """The criterion of a date search parameter ``name`` (``ccm_shared.fhir_dates``; a time
    needs its zone, a date is the practice's day): 400 for a value that is no FHIR date or
    dateTime (2026-1, 2026-13, lt2026-11-99, a time without a zone), as FHIR refuses a search
    parameter."""
    try:
        return fhir_dates.parse(query, zone_required=True)
    except ValueError as exc:
        raise SearchRefused("value", f"unsupported {name} search {query!r}: {exc}; e.g. "
                            "2025-04, ge2025-04-01 or lt2025-05-01T00:00:00Z", name) from None


def date_matches(value: str, criterion: fhir_dates.DateCriterion, zone: tzinfo) -> bool:
    """FHIR date search on the Invoice date (an instant), a date taken in the practice's
    ``zone``."""
    return criterion.matches(datetime.fromisoformat(value), zone)


def instant_condition(column, criterion: fhir_dates.DateCriterion, zone: tzinfo):  # noqa: ANN001, ANN201
    """The SQL condition of a date search on an instant ``column`` (``_lastUpdated``), a date
    taken in the practice's ``zone``."""
    low, high, inside = criterion.interval(zone)
    bounds = [*([column >= low] if low is not None else []),
              *([column < high] if high is not None else [])]
    if inside:
        return and_(true(), *bounds)
    return or_(false(), *([column < low] if low is not None else []),
               *([column >= high] if high is not None else []))
