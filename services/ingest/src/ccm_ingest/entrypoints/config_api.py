"""GET/PUT /v1/practices/{practice}/ingest-config: the practice's mapping code sets."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request

from ccm_ingest.adapters.repository import SqlResourceRepository
from ccm_ingest.domain.config import DEFAULT_CONFIG, ConfigInvalid, IngestConfig
from ccm_ingest.entrypoints.bases import FhirBases
from ccm_ingest.service_layer import remapping
from ccm_shared.db import giving_way
from ccm_shared.errors import Forbidden, InvalidInput, NotFound
from ccm_shared.http import JsonObject, TenantDep
from ccm_shared.service import ServiceRuntime
from ccm_shared.tenancy import Tenant

CHANGE_SCOPE = "admin"
# Runs of a change that a deadlock with concurrent writes (of the resources it maps again)
# rolls back, before the client is answered 503 (Retry-After) instead.
CHANGE_ATTEMPTS = 3


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
    settings = runtime.service_settings()
    bases = FhirBases(settings.fhir_base_url)  # type: ignore[attr-defined]

    async def _load(practice: str) -> tuple[dict[str, Any], int]:
        async with runtime.db.unit_of_work() as uow:
            found = await SqlResourceRepository(uow.session, practice).practice()
        if found is None:
            raise NotFound(f"practice {practice!r} not found")
        return found[1], found[2]

    @router.get("", summary="Effective mapping configuration (defaults + this practice's "
                "overrides)")
    async def read_config(practice: str, tenant: TenantDep) -> dict:
        tenant.require_practice(practice)
        overrides, revision = await _load(practice)
        # What ingest does with a key it cannot use: its default, the other keys applying.
        effective, problems = DEFAULT_CONFIG.stored(overrides)
        problem = (f"{'; '.join(problems)}: ingest uses the default for "
                   f"{'this key' if len(problems) == 1 else 'these keys'} until fixed"
                   if problems else None)
        found = {"effective": effective.to_dict(), "overrides": overrides,
                 "defaults": DEFAULT_CONFIG.to_dict(), "revision": revision}
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
    async def write_config(practice: str, tenant: ConfigAdmin, overrides: JsonObject,
                           request: Request) -> dict:
        tenant.require_practice(practice)
        try:
            effective = DEFAULT_CONFIG.merged(overrides)
        except ConfigInvalid as exc:
            raise InvalidInput(str(exc)) from None
        async for attempt in giving_way(CHANGE_ATTEMPTS, what="ingest config change",
                                        practice=practice):
            with attempt:
                remapped = await _change(practice, overrides, effective, request)
        runtime.state["practice_cache"].forget(practice)
        if remapped.events and runtime.relay is not None:
            runtime.relay.notify()
        return {"effective": effective.to_dict(), "overrides": overrides,
                "defaults": DEFAULT_CONFIG.to_dict(), "revision": remapped.revision,
                "remapped": remapped.to_dict()}

    async def _change(practice: str, overrides: dict[str, Any], effective: IngestConfig,
                      request: Request) -> remapping.Remapped:
        """Save the overrides and map the stored resources they concern again, with their
        events, in one unit of work (``remapping``): the change and what it changes commit
        together, or neither does."""
        async with runtime.db.unit_of_work() as uow:
            repo = SqlResourceRepository(uow.session, practice)
            # Held exclusively: the writes under way commit first (each with the config it
            # held), later ones wait for this change, and one change maps from the one before.
            await repo.hold_config(change=True)
            found = await repo.practice()
            if found is None:
                raise NotFound(f"practice {practice!r} not found")
            zone, stored, _ = found
            before, _ = DEFAULT_CONFIG.stored(stored)  # what its writes were mapped with
            revision = await repo.save_config(overrides, runtime.clock())
            at = remapping.Practice(
                practice, ZoneInfo(zone), runtime.clock(),
                timedelta(seconds=settings.max_clock_skew_seconds),  # type: ignore[attr-defined]
                bases.local(request))
            remapped = await remapping.remap(uow, at, before, effective, revision)
            await uow.commit()
        return remapped

    return router
