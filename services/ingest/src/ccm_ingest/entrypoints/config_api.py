"""GET/PUT /v1/practices/{practice}/ingest-config: the practice's mapping code sets."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from ccm_ingest.adapters.repository import SqlResourceRepository
from ccm_ingest.domain.config import DEFAULT_CONFIG, ConfigInvalid
from ccm_shared.errors import Forbidden, InvalidInput, NotFound
from ccm_shared.http import JsonObject, TenantDep
from ccm_shared.service import ServiceRuntime
from ccm_shared.tenancy import Tenant

CHANGE_SCOPE = "admin"


async def config_admin(tenant: TenantDep) -> Tenant:
    """The caller, when its token may change the configuration; else 403. A dependency, ahead of
    the body's (checked in the handler, after the body, a token without the scope was answered
    415 or 400, not 403)."""
    if CHANGE_SCOPE not in tenant.scopes:
        raise Forbidden(f"changing the ingest configuration needs the {CHANGE_SCOPE!r} scope")
    return tenant


ConfigAdmin = Annotated[Tenant, Depends(config_admin)]


def build_router(runtime: ServiceRuntime) -> APIRouter:
    router = APIRouter(prefix="/v1/practices/{practice}/ingest-config", tags=["ingest config"])

    async def _load(practice: str) -> dict[str, Any]:
        async with runtime.db.unit_of_work() as uow:
            found = await SqlResourceRepository(uow.session, practice).practice()
        if found is None:
            raise NotFound(f"practice {practice!r} not found")
        return found[1]

    @router.get("", summary="Effective mapping configuration (defaults + this practice's "
                "overrides)")
    async def read_config(practice: str, tenant: TenantDep) -> dict:
        tenant.require_practice(practice)
        overrides = await _load(practice)
        # What ingest does with a key it cannot use: its default, the other keys applying.
        effective, problems = DEFAULT_CONFIG.stored(overrides)
        problem = (f"{'; '.join(problems)}: ingest uses the default for "
                   f"{'this key' if len(problems) == 1 else 'these keys'} until fixed"
                   if problems else None)
        found = {"effective": effective.to_dict(), "overrides": overrides,
                 "defaults": DEFAULT_CONFIG.to_dict()}
        try:
            DEFAULT_CONFIG.merged(overrides)
        except ConfigInvalid as exc:
            problem = problem or f"{exc}: saving these overrides again would be refused"
        return {**found, **({"problem": problem} if problem else {})}

    # The body is read by JsonObject (415 for another media type, 400 for a key twice, which
    # FastAPI's own reading let pass with the last value); documented as FastAPI did.
    @router.put("", summary="Replace this practice's overrides (keys left out use the defaults)",
                openapi_extra={"requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"type": "object",
                                                     "additionalProperties": True,
                                                     "title": "Overrides"}}}}})
    async def write_config(practice: str, tenant: ConfigAdmin, overrides: JsonObject) -> dict:
        tenant.require_practice(practice)
        try:
            effective = DEFAULT_CONFIG.merged(overrides)
        except ConfigInvalid as exc:
            raise InvalidInput(str(exc)) from None
        await _load(practice)
        async with runtime.db.unit_of_work() as uow:
            await SqlResourceRepository(uow.session, practice).save_config(overrides,
                                                                           runtime.clock())
            await uow.commit()
        runtime.state["practice_cache"].forget(practice)
        return {"effective": effective.to_dict(), "overrides": overrides,
                "defaults": DEFAULT_CONFIG.to_dict()}

    return router
