"""`ccm token create --scope …`: a token gets exactly the scopes asked for (an EHR connection need
not be able to change the practice's configuration); unknown scopes are refused and create
nothing; without --scope the token keeps every scope, as before."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from ccm_shared import cli
from ccm_shared.db import create_engine_for
from ccm_shared.migrate import upgrade_async, upgrade_platform
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tables import api_tokens
from ccm_shared.tenancy import DEFAULT_SCOPES, Pricing, Tenant, create_practice, resolve_token
from ccm_shared.transport import InProcessTransport

EHR_SCOPES = ["--scope", "fhir:read", "--scope", "fhir:write"]


@pytest.fixture
def platform_url(tmp_path, clean_ccm_env, monkeypatch) -> str:
    """A migrated platform database with practice 'alpha', and CCM_DATABASE_URL pointing at it."""
    url = f"sqlite+aiosqlite:///{tmp_path}/platform.db"
    upgrade_platform(url)

    async def practice() -> None:
        engine = create_engine_for(url, schema=None)
        try:
            await create_practice(engine, practice_id="alpha", name="Alpha",
                                  timezone="America/Chicago", pricing=Pricing())
        finally:
            await engine.dispose()

    asyncio.run(practice())
    monkeypatch.setenv("CCM_DATABASE_URL", url)
    return url


def ccm_token_create(*args: str):  # noqa: ANN201
    return CliRunner().invoke(cli.app, ["token", "create", "--practice", "alpha", *args])


def resolve(url: str, token: str) -> Tenant | None:
    async def run() -> Tenant | None:
        engine = create_engine_for(url, schema=None)
        try:
            return await resolve_token(engine, token)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def stored_tokens(url: str) -> int:
    async def run() -> int:
        engine = create_engine_for(url, schema=None)
        try:
            async with engine.connect() as conn:
                count = select(func.count()).select_from(api_tokens)
                return (await conn.execute(count)).scalar_one()
        finally:
            await engine.dispose()

    return asyncio.run(run())


def last_stdout_line(result) -> str:  # noqa: ANN001
    return result.stdout.strip().splitlines()[-1]


def test_scope_option_stores_exactly_the_scopes_given(platform_url):
    result = ccm_token_create("--label", "epic", *EHR_SCOPES)
    assert result.exit_code == 0, result.output
    tenant = resolve(platform_url, last_stdout_line(result))
    assert tenant is not None and tenant.label == "epic"
    assert tenant.scopes == {"fhir:read", "fhir:write"}
    assert "fhir:read fhir:write" in result.stderr


def test_a_repeated_scope_is_stored_once(platform_url):
    result = ccm_token_create("--scope", "careplan", "--scope", "careplan")
    assert result.exit_code == 0, result.output
    tenant = resolve(platform_url, last_stdout_line(result))
    assert tenant is not None and tenant.scopes == {"careplan"}


@pytest.mark.parametrize("scopes", [["--scope", "fhir:admin"],
                                    ["--scope", "fhir:read", "--scope", "Admin"],
                                    ["--scope", ""]])
def test_an_unknown_scope_is_a_usage_error_and_creates_no_token(platform_url, scopes):
    result = ccm_token_create(*scopes)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "unknown scope" in result.stderr
    for known in DEFAULT_SCOPES:
        assert known in result.stderr
    assert stored_tokens(platform_url) == 0


def test_without_scope_the_token_keeps_every_scope_and_says_so(platform_url):
    result = ccm_token_create("--label", "deploy")
    assert result.exit_code == 0, result.output
    token = last_stdout_line(result)
    assert token.startswith("ccm_") and result.stdout.strip() == token  # the token alone
    tenant = resolve(platform_url, token)
    assert tenant is not None and tenant.scopes == set(DEFAULT_SCOPES)
    assert " ".join(DEFAULT_SCOPES) in result.stderr and "default" in result.stderr


def test_help_names_every_scope_and_the_ehr_choice():
    result = CliRunner().invoke(cli.app, ["token", "create", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for known in DEFAULT_SCOPES:
        assert known in text
    assert "--scope fhir:read --scope fhir:write" in text


def test_an_ehr_token_cannot_change_the_ingest_configuration(platform_url):
    ehr = ccm_token_create("--label", "epic", *EHR_SCOPES)
    full = ccm_token_create("--label", "admin")
    assert ehr.exit_code == 0 and full.exit_code == 0, ehr.output + full.output
    ehr_token, full_token = last_stdout_line(ehr), last_stdout_line(full)

    async def run() -> None:
        ingest = discover_services()["ingest"]
        await upgrade_async(platform_url, ingest.schema, ingest.migrations_package)
        settings = load_settings(database_url=platform_url)
        runtime = ServiceRuntime.build(ingest, settings, transport=InProcessTransport())
        transport = httpx.ASGITransport(app=runtime.app())
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                def auth(token: str) -> dict:
                    return {"Authorization": f"Bearer {token}"}

                change = {"ccm_time_codes": ["urn:local|CCM"]}
                path = "/v1/practices/alpha/ingest-config"
                refused = await client.put(path, json=change, headers=auth(ehr_token))
                assert refused.status_code == 403, refused.text
                assert (await client.get(path, headers=auth(ehr_token))).json()["overrides"] == {}
                read = await client.get("/fhir/Patient", headers=auth(ehr_token))
                assert read.status_code == 200, read.text
                allowed = await client.put(path, json=change, headers=auth(full_token))
                assert allowed.status_code == 200, allowed.text
        finally:
            await runtime.db.dispose()

    asyncio.run(run())


def test_a_listed_token_can_be_revoked_and_then_resolves_to_nothing(platform_url):
    created = ccm_token_create("--label", "old-ehr", *EHR_SCOPES)
    token = created.stdout.strip().splitlines()[-1]
    listed = CliRunner().invoke(cli.app, ["token", "list", "--practice", "alpha"])
    assert listed.exit_code == 0, listed.output
    (line,) = listed.stdout.splitlines()
    token_id = line.split()[0]
    assert " active " in line and "label old-ehr" in line and "fhir:read,fhir:write" in line
    assert token not in listed.output  # only the hash is kept
    revoked = CliRunner().invoke(cli.app, ["token", "revoke", token_id, "--practice", "alpha"])
    assert revoked.exit_code == 0, revoked.output
    assert " revoked " in revoked.stdout
    assert resolve(platform_url, token) is None
    again = CliRunner().invoke(cli.app, ["token", "revoke", token_id, "--practice", "alpha"])
    assert again.exit_code == 0 and again.stdout == revoked.stdout  # unchanged
    for args in (["nope", "--practice", "alpha"], [token_id, "--practice", "beta"]):
        wrong = CliRunner().invoke(cli.app, ["token", "revoke", *args])
        assert wrong.exit_code == 2 and "error:" in wrong.output


def test_a_label_longer_than_kept_is_refused_before_anything_is_created(platform_url):
    """The label column holds 200 characters: a longer one crashed the command with a database
    traceback (on PostgreSQL)."""
    result = ccm_token_create("--label", "x" * 201)
    assert result.exit_code == 2 and "--label takes at most 200 characters" in result.output
    assert ccm_token_create("--label", "x" * 200).exit_code == 0
