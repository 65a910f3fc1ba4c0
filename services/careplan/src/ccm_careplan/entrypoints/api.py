"""HTTP API of the care-plan tracker (problem+json errors; every route scoped to the caller's
practice — another practice's plan answers 404).

Every route needs a token with the ``careplan`` scope (``CareplanTenant``); without it → 403
before the body is looked at."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from ccm_careplan.domain.rules import DEFAULT_RULES, PRACTITIONER_REF, InvalidRules, ReviewRules
from ccm_careplan.service_layer import commands, queries
from ccm_careplan.service_layer.common import load_rules, practice_today
from ccm_shared.errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from ccm_shared.http import TenantDep, json_body_after
from ccm_shared.tenancy import Tenant
from ccm_shared.text import ascii_digits

SCOPE = "careplan"
REF_PATTERN = PRACTITIONER_REF.pattern
# Far beyond any practice's plans, far below the 64-bit OFFSET the databases take.
MAX_OFFSET = 1_000_000
# A rules revision is a database INTEGER; longer digit strings cannot name one.
MAX_REVISION_DIGITS = 10


async def careplan_tenant(tenant: TenantDep) -> Tenant:
    """The caller, when its token carries the ``careplan`` scope; else 403 (an EHR connection's
    fhir:read + fhir:write token must not record reviews or change the rules)."""
    tenant.require_scope(SCOPE)
    return tenant


CareplanTenant = Annotated[Tenant, Depends(careplan_tenant)]

# A route whose body is a model: the caller and its scope first, then the body as the
# platform's JSON APIs take it (the scope was checked in the handler, after the body: a token
# without it was answered 415 or 422, not 403).
JSON_BODY = json_body_after(careplan_tenant)


class ReviewIn(BaseModel):
    """A completed review (approved or approved-with-changes: signed off) or a declined sign-off."""

    model_config = ConfigDict(extra="forbid")
    reviewer: str = Field(pattern=REF_PATTERN, examples=["Practitioner/dr-lee"],
                          description="Practitioner/{id} or PractitionerRole/{id}")
    review_date: date | None = Field(
        None, alias="date", description="Review date; default: today in the practice's zone")
    outcome: Literal["approved", "approved-with-changes", "declined"]
    notes: str | None = Field(None, max_length=4000)


class AcknowledgementIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipient: str = Field(pattern=r"^[A-Za-z]+/[A-Za-z0-9\-\.]{1,64}$",
                           description="The care-team member, e.g. Practitioner/rn-diaz")
    version_id: str | None = Field(None, max_length=64, description="Default: the current version")


class RulesIn(BaseModel):
    """Per-practice review rules; omitted fields take the documented defaults."""

    # strict: "3" or true is not the integer 3 or 1, nor 1 or "yes" the boolean true
    model_config = ConfigDict(extra="forbid", strict=True)
    review_interval_months: int = DEFAULT_RULES.review_interval_months
    reminder_days_before_due: list[int] = Field(
        default_factory=lambda: list(DEFAULT_RULES.reminder_days_before_due), max_length=10)
    overdue_reminder_every_days: int = DEFAULT_RULES.overdue_reminder_every_days
    escalate_after_days_overdue: int = DEFAULT_RULES.escalate_after_days_overdue
    escalate_after_reminders: int = DEFAULT_RULES.escalate_after_reminders
    escalation_repeat_days: int = DEFAULT_RULES.escalation_repeat_days
    early_review_within_days: int = DEFAULT_RULES.early_review_within_days
    clinical_supervisor: str | None = Field(None, pattern=REF_PATTERN)
    early_review_on_plan_revision: bool = DEFAULT_RULES.early_review_on_plan_revision
    early_review_on_new_chronic_condition: bool = (
        DEFAULT_RULES.early_review_on_new_chronic_condition)

    def to_rules(self) -> ReviewRules:
        data = self.model_dump()
        data["reminder_days_before_due"] = tuple(sorted(data["reminder_days_before_due"],
                                                        reverse=True))
        return ReviewRules(**data)


async def _context(uow, practice: str, now) -> tuple[ReviewRules, date]:  # noqa: ANN001
    """The practice's rules and its calendar day now (review dates are local days)."""
    return await load_rules(uow.session, practice), await practice_today(uow.session, practice,
                                                                        now)


def _rules_body(practice: str, rules: ReviewRules, revision: int) -> dict:
    warnings = []
    if rules.clinical_supervisor is None:
        warnings.append("no clinical_supervisor set: escalation events carry supervisor null, "
                        "so notification can only alert the practice's coordinators")
    return {"practice": practice, "revision": revision, "is_default": revision == 0,
            "rules": rules.to_dict(), "defaults": DEFAULT_RULES.to_dict(), "warnings": warnings}


def routers(runtime) -> list[APIRouter]:  # noqa: ANN001, C901 - one closure per route
    api = APIRouter(tags=["care plans"])
    db, clock = runtime.db, runtime.clock

    @api.get("/v1/practices/{practice}/care-plans", summary="The review tracker, filtered")
    async def list_care_plans(
        practice: str, tenant: CareplanTenant,
        review: Annotated[str | None, Query(
            description="due | due-within:{days} | overdue | escalated | awaiting-signoff")] = None,
        patient: Annotated[str | None, Query(max_length=140)] = None,
        sort: Annotated[str, Query(description="next_review_due, last_review, created, patient, "
                                               "escalation_level; prefix - for descending")]
        = "next_review_due",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            rules, today = await _context(uow, practice, clock())
            try:
                page = await queries.list_trackers(
                    uow, practice, queries.ListQuery(review, patient, sort, limit, offset),
                    today, rules)
            except queries.InvalidQuery as exc:
                raise InvalidInput(str(exc)) from None
            page["counts"] = await queries.counts(uow, practice, today, rules)
        return page

    @api.get("/v1/practices/{practice}/care-plans/overdue.csv",
             summary="Overdue reviews, most overdue first (compliance report)",
             response_class=Response, responses={200: {"content": {"text/csv": {}}}})
    async def overdue_report(practice: str, tenant: CareplanTenant) -> Response:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            rules, today = await _context(uow, practice, clock())
            body = await queries.overdue_csv(uow, practice, today, rules)
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition":
                f'attachment; filename="care-plans-overdue-{practice}-{today}.csv"'})

    @api.get("/v1/care-plans/{tracker}", summary="One tracked plan with its full history")
    async def get_care_plan(tracker: str, tenant: CareplanTenant) -> dict:
        return await _detail(tenant.practice_id, tracker)

    async def _detail(practice: str, tracker: str) -> dict:
        async with db.unit_of_work() as uow:
            rules, today = await _context(uow, practice, clock())
            detail = await queries.tracker_detail(uow, practice, tracker, today, rules)
        if detail is None:
            raise NotFound(f"care plan {tracker!r} not found")
        return detail

    @api.post("/v1/care-plans/{tracker}/reviews", status_code=201,
              summary="Record a review: approved restarts the clock; declined records a refusal",
              dependencies=JSON_BODY)
    async def post_review(tracker: str, body: ReviewIn, tenant: CareplanTenant) -> dict:
        cmd = commands.RecordReview(tenant.practice_id, tracker, body.reviewer, body.review_date,
                                    body.outcome, body.notes)
        async with db.unit_of_work() as uow:
            try:
                await commands.record_review(uow, cmd, clock())
            except commands.TrackerNotFound:
                raise NotFound(f"care plan {tracker!r} not found") from None
            except commands.PlanClosed as exc:
                raise Conflict(str(exc)) from None
            except commands.ReviewRejected as exc:
                raise InvalidInput(str(exc)) from None
            await uow.commit()
        _wake_relay(runtime)
        return await _detail(tenant.practice_id, tracker)

    @api.post("/v1/care-plans/{tracker}/acknowledgements", status_code=204,
              summary="A care-team member acknowledges the plan version they received",
              dependencies=JSON_BODY)
    async def post_acknowledgement(tracker: str, body: AcknowledgementIn,
                                   tenant: CareplanTenant) -> Response:
        async with db.unit_of_work() as uow:
            try:
                await commands.acknowledge(uow, practice=tenant.practice_id, tracker=tracker,
                                           recipient=body.recipient, version=body.version_id,
                                           now=clock())
            except commands.TrackerNotFound:
                raise NotFound(f"care plan {tracker!r} not found") from None
            except commands.RecipientNotFound as exc:
                raise NotFound(str(exc)) from None
            await uow.commit()
        return Response(status_code=204)

    @api.get("/v1/practices/{practice}/care-plan-rules", tags=["rules"],
             summary="The practice's review, reminder and escalation rules (defaults if unset)")
    async def get_rules(practice: str, tenant: CareplanTenant, response: Response) -> dict:
        tenant.require_practice(practice)
        async with db.unit_of_work() as uow:
            rules = await load_rules(uow.session, practice)
            revision = await commands.rules_revision(uow, practice)
        response.headers["ETag"] = f'"{revision}"'
        return _rules_body(practice, rules, revision)

    @api.put("/v1/practices/{practice}/care-plan-rules", tags=["rules"],
             summary="Replace the practice's rules; plans' due dates follow at once",
             dependencies=JSON_BODY)
    async def put_rules(practice: str, body: RulesIn, tenant: CareplanTenant, response: Response,
                        if_match: Annotated[str | None, Header()] = None) -> dict:
        tenant.require_practice(practice)
        expected = None
        if if_match is not None:
            raw = if_match.strip().removeprefix("W/").strip('"')
            if not ascii_digits(raw, MAX_REVISION_DIGITS):
                raise PreconditionFailed("If-Match must be an ETag from GET, e.g. \"3\"")
            expected = int(raw)
        rules = body.to_rules()
        async with db.unit_of_work() as uow:
            try:
                revision = await commands.replace_rules(uow, practice, rules,
                                                        if_match=expected, now=clock())
            except InvalidRules as exc:
                raise InvalidInput(str(exc)) from None
            except commands.RulesChanged as exc:
                raise PreconditionFailed(str(exc)) from None
            await uow.commit()
        _wake_relay(runtime)  # escalations re-announced to a newly set supervisor
        response.headers["ETag"] = f'"{revision}"'
        return _rules_body(practice, rules, revision)

    return [api]


def _wake_relay(runtime) -> None:  # noqa: ANN001
    if runtime.relay is not None:
        runtime.relay.notify()



