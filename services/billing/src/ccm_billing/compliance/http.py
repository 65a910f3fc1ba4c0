"""HTTP API of the compliance records: consent tracker (+ CSV), time logs, audit packets.

Every route is a read: it needs a token with the ``billing:read`` or the ``billing`` scope
(``BillingReader``, the dependency of billing's main router's reads); without either → 403
(problem+json) before anything is read. The audit packet needs ``admin`` as well
(``PacketReader``): it holds the patient's audit trail (who read the patient, token ids and
labels), which ``GET …/audit-events`` gives only to ``admin``; a packet needs what its most
sensitive part needs. The patient is a
path parameter of every patient route, so the platform's HTTP edge records each read — a packet
included — in the audit trail with the patient it concerns.
"""

from __future__ import annotations

import csv
import io
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ccm_billing.compliance import domain, fhir_bundle, pdf, records
from ccm_billing.entrypoints.http import CSV, BillingReader, parse_month
from ccm_billing.service_layer.common import consent_renewal_months, practice_info
from ccm_shared.errors import Forbidden, InvalidInput
from ccm_shared.http import AUDIT_SCOPE
from ccm_shared.tenancy import Tenant

FHIR_JSON = "application/fhir+json"
PDF = "application/pdf"
STATES = (*domain.ATTENTION, "active")


async def packet_reader(tenant: BillingReader) -> Tenant:
    """The caller of an audit packet: a billing reader (``billing:read`` or ``billing``) whose
    token also carries ``admin``, the scope of the audit trail the packet holds; else 403."""
    if AUDIT_SCOPE not in tenant.scopes:
        raise Forbidden(f"the audit packet holds the patient's audit trail: it needs a token "
                        f"with the {AUDIT_SCOPE!r} scope (besides 'billing:read' or 'billing')")
    return tenant


PacketReader = Annotated[Tenant, Depends(packet_reader)]


def _states(values: list[str] | None) -> set[str]:
    wanted = {s.strip() for v in values or [] for s in v.split(",") if s.strip()}
    unknown = wanted - set(STATES) - {"all"}
    if unknown:
        raise InvalidInput(f"unknown consent state(s) {sorted(unknown)}; use {', '.join(STATES)} "
                           "or all", expression=["state"])
    if not wanted:
        return set(domain.ATTENTION)
    return set(STATES) if "all" in wanted else wanted


StateQuery = Annotated[list[str] | None, Query(
    description="missing, declined, revoked, voided, expired, expiring, active or all; "
                "repeat or comma-separate (default: every state that needs attention)")]
WithinQuery = Annotated[int | None, Query(
    ge=0, le=3650, description="expiring: consents that expire within this many days "
                               "(default CCM_BILLING_CONSENT_EXPIRING_DAYS)")]


def build_compliance_router(runtime) -> APIRouter:  # noqa: ANN001
    router = APIRouter(tags=["compliance"])
    db = runtime.db

    def settings():  # noqa: ANN202
        return runtime.service_settings()

    async def tracker(practice: str, tenant, state, within) -> list[dict]:  # noqa: ANN001
        tenant.require_practice(practice)
        states = _states(state)
        async with db.unit_of_work() as uow:
            info = await practice_info(uow.session, practice)
            return await records.consent_tracker(
                uow.session, info, states=states, today=info.today(runtime.clock()),
                renewal=consent_renewal_months(info),
                within_days=settings().consent_expiring_days if within is None else within)

    @router.get("/v1/practices/{practice}/consents",
                summary="Consent tracker: patients whose CCM consent is missing, declined, "
                        "revoked, voided, expired or expiring")
    async def consents(practice: str, tenant: BillingReader, state: StateQuery = None,
                       within: WithinQuery = None) -> dict:
        rows = await tracker(practice, tenant, state, within)
        return {"practice": practice, "count": len(rows), "patients": rows}

    @router.get("/v1/practices/{practice}/consents.csv", response_class=Response, responses=CSV,
                summary="Consent tracker as CSV (same filters)")
    async def consents_csv(practice: str, tenant: BillingReader, state: StateQuery = None,
                           within: WithinQuery = None) -> Response:
        rows = await tracker(practice, tenant, state, within)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(records.TRACKER_CSV_COLUMNS)
        writer.writerows(records.tracker_csv_rows(rows))
        return Response(out.getvalue(), media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="ccm-consents-{practice}.csv"'})

    @router.get("/v1/practices/{practice}/patients/{patient}/time-log",
                summary="A patient's time entries for a month: as locked at close, with corrections")
    async def time_log(practice: str, patient: str, tenant: BillingReader,
                       month: Annotated[str, Query(description="yyyy-mm")]) -> dict:
        tenant.require_practice(practice)
        mo = parse_month(month)
        async with db.unit_of_work() as uow:
            info = await practice_info(uow.session, practice)
            await records.require_patient(uow.session, practice, patient)
            return await records.time_log(uow.session, info, patient, mo)

    @router.get("/v1/practices/{practice}/patients/{patient}/audit-packet",
                response_class=Response,
                responses={200: {"content": {FHIR_JSON: {}, PDF: {}},
                                 "description": "FHIR collection Bundle, or the PDF"}},
                summary="Audit packet for a patient and a range of months (FHIR Bundle or PDF)")
    async def audit_packet(
        practice: str, patient: str, request: Request, tenant: PacketReader,
        from_: Annotated[str, Query(alias="from", description="First month, yyyy-mm")],
        to: Annotated[str | None, Query(description="Last month, yyyy-mm (default: from)")] = None,
        format: Annotated[Literal["fhir", "pdf"] | None, Query(  # noqa: A002
            description="fhir (default) or pdf; Accept: application/pdf also asks for the PDF")] = None,
    ) -> Response:
        tenant.require_practice(practice)
        first = parse_month(from_, "from")
        last = parse_month(to, "to") if to else first
        if last < first:
            raise InvalidInput("'to' is before 'from'", expression=["to"])
        if len(records.months_between(first, last)) > records.MAX_MONTHS:
            raise InvalidInput(f"at most {records.MAX_MONTHS} months per packet", expression=["to"])
        wants_pdf = format == "pdf" or (format is None and PDF in request.headers.get("accept", ""))
        now = runtime.clock()
        async with db.unit_of_work() as uow:
            info = await practice_info(uow.session, practice)
            packet = await records.audit_packet(
                uow.session, info, patient, first, last, now=now,
                renewal=consent_renewal_months(info))
        doc = fhir_bundle.bundle(packet, fhir_bundle.packet_id(packet))
        body = fhir_bundle.canonical(doc)
        digest = fhir_bundle.sha256_of(doc)
        name = f"ccm-packet-{practice}-{patient}-{first}-{last}"
        if wants_pdf:
            return Response(pdf.render(packet, digest), media_type=PDF, headers={
                "X-Packet-SHA256": digest,
                "Content-Disposition": f'attachment; filename="{name}.pdf"'})
        return Response(body, media_type=FHIR_JSON, headers={
            "X-Packet-SHA256": digest,
            "Content-Disposition": f'inline; filename="{name}.json"'})

    return router
