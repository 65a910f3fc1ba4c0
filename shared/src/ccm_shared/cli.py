"""The ``ccm`` command: run services, migrate schemas, manage practices and API tokens."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import signal
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

import typer

from ccm_shared.errors import AppError
from ccm_shared.settings import (
    ConfigurationError,
    Settings,
    load_service_settings,
    load_settings,
    mask_url,
    masked,
)

app = typer.Typer(
    name="ccm",
    help="ccm-platform: the administrative layer of Chronic Care Management vendors.\n\n"
    "Configuration comes from CCM_* environment variables (see README, 'Configuration').",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
practice_app = typer.Typer(help="Manage client practices (the tenants).", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
token_app = typer.Typer(help="Manage API tokens of a practice.", no_args_is_help=True)
app.add_typer(practice_app, name="practice")
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# Exit codes of every command: 0 done, 1 the command's own failure (e.g. a broken audit chain),
# 2 refused usage or configuration, 3 the database cannot be reached.
EXIT_UNREACHABLE = 3


def _refused(exc: ConfigurationError) -> None:
    """Exit 2 naming each refused variable: one line for one, else one line each."""
    problems = str(exc)
    separator = "\n" if "\n" in problems else " "
    _fail(f"configuration refused:{separator}{problems}")


def _settings(require_db: bool = True, *, kafka: bool = True, **overrides: object) -> Settings:
    try:
        settings = load_settings(kafka=kafka, **overrides)
    except ConfigurationError as exc:
        _refused(exc)
    if require_db and not settings.database_url:
        _fail(
            "CCM_DATABASE_URL is not set. Start PostgreSQL with deploy/local/up.sh and "
            "`source .ccm-local/env`, or use sqlite+aiosqlite:///.ccm-data/platform.db"
        )
    return settings


def _services(name: str | None):  # noqa: ANN202
    from ccm_shared.service import discover_services, service_names

    if name in (None, "all"):
        return list(discover_services().values())
    found = discover_services(only=name)
    if name not in found:
        _fail(f"unknown service {name!r}; choose from: {', '.join(service_names())} or all")
    return [found[name]]


def _service_settings(definitions) -> list:  # noqa: ANN001
    """Each service's own settings, checked as the platform's are (exit 2 naming each refused
    variable), before anything reads them: the services read them when they need them."""
    loaded = []
    for d in definitions:
        if d.settings_model is not None:
            try:
                loaded.append((d, load_service_settings(d.settings_model)))
            except ConfigurationError as exc:
                _refused(exc)
    return loaded


class _Unreachable(Exception):
    """No connection to the database could be made (down, wrong address or credentials)."""


def _unreachable_reason(url: str, exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc  # a SQLAlchemy error: the driver's own
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    password = None
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    if password:
        text = text.replace(password, "***")
    return f"{mask_url(url)}: {text}"


async def _connected(url: str, *, migrated: bool = False):  # noqa: ANN202
    """An engine on the platform database once a connection to it has succeeded; _Unreachable
    (with the reason, never the password) if none can be made. ``migrated``: the platform's
    tables must be there too (a command that reads them; on SQLite the file must exist: a
    connection would create it, and a mistyped path gave empty files and a traceback)."""
    from sqlalchemy import select
    from sqlalchemy.engine import make_url

    from ccm_shared.db import create_engine_for, is_sqlite
    from ccm_shared.tables import practices

    if migrated and is_sqlite(url):
        path = make_url(url).database or ""
        if not Path(path).is_file():
            raise _Unreachable(f"{mask_url(url)}: no database file at {Path(path).resolve()} "
                               "(a relative path is taken from the current folder): check the "
                               "path, or run `ccm migrate` first")
    engine = None
    try:
        engine = create_engine_for(url, schema=None)
        async with engine.connect() as conn:
            if migrated:
                try:
                    await conn.execute(select(practices.c.id).limit(1))
                except Exception:  # noqa: BLE001 - no such table: never migrated here
                    raise _Unreachable(f"{mask_url(url)}: the platform's tables are not there: "
                                       "run `ccm migrate` first (or check the URL)") from None
    except Exception as exc:  # noqa: BLE001 - whatever stops the first connection
        if engine is not None:
            await engine.dispose()
        if isinstance(exc, _Unreachable):
            raise
        raise _Unreachable(_unreachable_reason(url, exc)) from None
    return engine


def _database(run):  # noqa: ANN001, ANN202
    """``asyncio.run(run)``: an unreachable database exits 3 and an AppError is the command's
    error (exit 2), each as one line."""
    try:
        return asyncio.run(run)
    except _Unreachable as exc:
        _fail(f"cannot reach the database: {exc}", code=EXIT_UNREACHABLE)
    except AppError as exc:
        _fail(exc.detail)


def _check_database(url: str) -> None:
    """Exit 3 unless the database answers (before migrations, which would fail half-way)."""

    async def probe() -> None:
        await (await _connected(url)).dispose()

    _database(probe())


@app.command()
def migrate(
    service: Annotated[
        str | None, typer.Argument(help="ingest, billing, careplan, notification; default all")
    ] = None,
) -> None:
    """Create or upgrade database schemas: the platform registry first, then the services.

    Exit codes: 0 up to date, 2 unknown service or refused configuration, 3 the database
    cannot be reached."""
    from ccm_shared.migrate import upgrade, upgrade_platform

    definitions = _services(service)  # an unknown name is refused before anything is migrated
    # Only the database: its Kubernetes Job runs before Strimzi has written the Kafka users'
    # Secrets and the cluster CA (deploy/README.md), so their settings are not checked here.
    settings = _settings(kafka=False)
    _service_settings(definitions)  # a Job that migrates must not succeed for pods that crash
    _check_database(settings.database_url)
    typer.echo("migrating platform …", err=True)
    upgrade_platform(settings.database_url)
    for definition in definitions:
        typer.echo(f"migrating {definition.name} …", err=True)
        upgrade(settings.database_url, definition.schema, definition.migrations_package)
    typer.echo("migrations are up to date", err=True)


# The codes a per-code contract may price: CCM's CPT codes and the initiating visit's G0506.
CCM_CODES = ("99490", "99439", "99491", "99437", "99487", "99489", "G0506")
PRICING_MODELS = ("per-code", "percent-of-medicare", "flat-per-patient")
MAX_PRACTICE_NAME = 200  # the practices.name column
_RULE_HELP = ("A billing rule option NAME=VALUE (repeatable): date_of_service=month-end|"
              "threshold-met, initiating_visit_missing=warning|blocker, "
              "consent_renewal_months=0..1200 (0: consents do not expire)")


def _money(amount: Decimal) -> bool:
    return amount.is_finite() and amount >= 0 and amount == amount.quantize(Decimal("0.01"))


def _pricing(model: str, rate: list[str], percent: str | None, flat_fee: str | None, due_days: int):  # noqa: ANN202
    from ccm_shared.tenancy import Pricing

    try:
        rates = {}
        for item in rate:
            code, _, amount = item.partition("=")
            if not code or not amount:
                _fail(f"--rate takes CODE=AMOUNT (e.g. 99490=42.00), got {item!r}")
            rates[code.strip()] = Decimal(amount)
        pct = Decimal(percent) if percent is not None else None
        flat = Decimal(flat_fee) if flat_fee is not None else None
    except InvalidOperation:
        _fail("amounts must be decimal numbers such as 42.50")
    # A negative rate, fee or percent made invoices negative (never payable); a rate for a code
    # billing never bills, or for another model, was kept and silently unused.
    for code, amount in rates.items():
        if code not in CCM_CODES:
            _fail(f"--rate {code}: not a code billing bills; one of {', '.join(CCM_CODES)}")
        if not _money(amount):
            _fail(f"--rate {code}={amount}: an amount of at least 0 with at most two decimals")
    if flat is not None and not _money(flat):
        _fail(f"--flat-fee {flat}: an amount of at least 0 with at most two decimals")
    if pct is not None and not (pct.is_finite() and 0 < pct <= 100):
        _fail(f"--percent {pct}: more than 0 and at most 100")
    if rates and model != "per-code":
        _fail("--rate is for --pricing per-code")
    if flat is not None and model != "flat-per-patient":
        _fail("--flat-fee is for --pricing flat-per-patient")
    if model == "per-code" and not rates:
        _fail("--pricing per-code needs at least one --rate CODE=AMOUNT")
    if model == "percent-of-medicare" and pct is None:
        _fail("--pricing percent-of-medicare needs --percent (e.g. 35)")
    if model == "flat-per-patient" and flat is None:
        _fail("--pricing flat-per-patient needs --flat-fee (e.g. 40.00)")
    return Pricing(model=model, rates=rates, percent=pct, flat_fee=flat, due_days=due_days)


@practice_app.command("create")
def practice_create(
    id: Annotated[str, typer.Option("--id", help="Practice id: lowercase letters, digits, -")],
    name: Annotated[str, typer.Option(help="Display name")],
    timezone: Annotated[str, typer.Option(help="IANA zone of the practice, e.g. America/Chicago")],
    pricing: Annotated[
        str, typer.Option(help="per-code | percent-of-medicare | flat-per-patient")
    ] = "percent-of-medicare",
    rate: Annotated[list[str], typer.Option(help="Per-code rate CODE=AMOUNT (repeatable)")] = [],  # noqa: B006 - typer reads the default, never mutates it
    percent: Annotated[
        str | None, typer.Option(help="Percent of the Medicare amount billed")
    ] = "35",
    flat_fee: Annotated[str | None, typer.Option(help="Flat fee per billable patient")] = None,
    due_days: Annotated[
        int, typer.Option(min=1, max=365, help="Invoice payment terms in days (1-365)")
    ] = 30,
    rule: Annotated[list[str], typer.Option(help=_RULE_HELP)] = [],  # noqa: B006 - read only
) -> None:
    """Register a client practice (a tenant)."""
    from dataclasses import replace

    from ccm_shared.tenancy import create_practice

    _check_name(name)
    terms = _pricing(
        _model(pricing), rate, percent if pricing == "percent-of-medicare" else None, flat_fee,
        due_days,
    )
    terms = replace(terms, rules=_rules(rule, []) or None)
    _with_engine(
        lambda engine: create_practice(
            engine, practice_id=id, name=name, timezone=timezone, pricing=terms
        )
    )
    typer.echo(f"practice {id} created ({timezone}, pricing {pricing})")


@practice_app.command("list")
def practice_list() -> None:
    """List the practices: id, time zone, pricing model and name, one per line."""
    from ccm_shared.tenancy import list_practices

    found = _with_engine(list_practices)
    if not found:
        typer.echo("no practices yet: `ccm practice create`", err=True)
    for p in found:
        typer.echo(f"{p['id']}\t{p['timezone']}\t{p['pricing'].get('model', '?')}\t{p['name']}")


@practice_app.command("show")
def practice_show(
    id: Annotated[str, typer.Option("--id", help="Practice id")],
) -> None:
    """Print a practice as JSON: name, time zone, contract (pricing) and rule options."""
    from ccm_shared.tenancy import get_practice

    typer.echo(json.dumps(_with_engine(lambda engine: get_practice(engine, id)), indent=2))


@practice_app.command("update")
def practice_update(
    id: Annotated[str, typer.Option("--id", help="Practice id")],
    name: Annotated[str | None, typer.Option(help="New display name")] = None,
    pricing: Annotated[str | None, typer.Option(
        help="A new contract: per-code | percent-of-medicare | flat-per-patient, with its "
             "--rate, --percent or --flat-fee (the whole contract is replaced; rules are kept)"
    )] = None,
    rate: Annotated[list[str], typer.Option(help="Per-code rate CODE=AMOUNT (repeatable)")] = [],  # noqa: B006 - read only
    percent: Annotated[str | None, typer.Option(help="Percent of the Medicare amount")] = None,
    flat_fee: Annotated[str | None, typer.Option(help="Flat fee per billable patient")] = None,
    due_days: Annotated[int | None, typer.Option(
        min=1, max=365, help="Invoice payment terms in days (1-365)")] = None,
    rule: Annotated[list[str], typer.Option(help=_RULE_HELP)] = [],  # noqa: B006 - read only
    unset_rule: Annotated[list[str], typer.Option(
        help="Remove a rule option, so its default applies (repeatable)")] = [],  # noqa: B006 - read only
) -> None:
    """Amend a practice: its name, contract, payment terms or billing rule options. Months
    still open are billed under the new terms when they close; a closed month keeps the terms
    it was closed under until it is recomputed (billing's `POST …/billing-periods/{month}/
    recompute`). The id and time zone never change."""
    from ccm_shared.tenancy import get_practice, update_practice

    if name is not None:
        _check_name(name)
    terms = None
    if pricing is not None:
        current = _with_engine(lambda engine: get_practice(engine, id))["pricing"]
        terms = _pricing(_model(pricing), rate, percent, flat_fee,
                         due_days or current.get("due_days") or 30)
    elif rate or percent is not None or flat_fee is not None:
        _fail("--rate, --percent and --flat-fee come with --pricing (the whole contract)")
    rules = _rules(rule, unset_rule)
    if name is None and terms is None and due_days is None and not rules:
        _fail("nothing to change: give --name, --pricing, --due-days, --rule or --unset-rule")
    found = _with_engine(lambda engine: update_practice(
        engine, id, name=name, pricing=terms, due_days=due_days, rules=rules))
    typer.echo(json.dumps(found, indent=2))
    typer.echo(f"practice {id} updated: open months close under these terms; recompute a "
               "closed month to bill it under them", err=True)


def _model(pricing: str) -> str:
    if pricing not in PRICING_MODELS:
        _fail(f"--pricing must be {', '.join(PRICING_MODELS[:-1])} or {PRICING_MODELS[-1]}")
    return pricing


def _check_name(name: str) -> None:
    if not name.strip() or len(name) > MAX_PRACTICE_NAME:
        _fail(f"--name: 1 to {MAX_PRACTICE_NAME} characters, not blank")


def _rules(given: list[str], removed: list[str]) -> dict[str, str | int | None]:
    """``--rule NAME=VALUE`` and ``--unset-rule NAME`` as the changes ``update_practice``
    takes (a removed rule: None); each refused with what it takes."""
    from ccm_shared.tenancy import PRACTICE_RULES, practice_rule

    changes: dict[str, str | int | None] = {}
    for item in given:
        rule_name, sep, value = item.partition("=")
        if not sep:
            _fail(f"--rule takes NAME=VALUE (e.g. date_of_service=threshold-met), got {item!r}")
        try:
            key, checked = practice_rule(rule_name.strip(), value.strip())
        except AppError as exc:
            _fail(f"--rule {item}: {exc.detail}")
        changes[key] = checked
    for rule_name in removed:
        if rule_name not in PRACTICE_RULES:
            _fail(f"--unset-rule {rule_name}: unknown rule; rules: {', '.join(PRACTICE_RULES)}")
        if rule_name in changes:
            _fail(f"--rule and --unset-rule both name {rule_name}")
        changes[rule_name] = None
    return changes


def _token_scopes(requested: list[str] | None) -> tuple[str, ...]:
    """The scopes a new token gets: the ones asked for (checked, duplicates dropped), else the
    default (every scope, as before ``--scope`` existed)."""
    from ccm_shared.tenancy import DEFAULT_SCOPES

    if not requested:
        return DEFAULT_SCOPES
    unknown = [s for s in requested if s not in DEFAULT_SCOPES]
    if unknown:
        _fail(
            f"unknown scope(s) {', '.join(repr(s) for s in unknown)}; "
            f"valid scopes: {', '.join(DEFAULT_SCOPES)}"
        )
    return tuple(dict.fromkeys(requested))


MAX_TOKEN_LABEL = 200  # the api_tokens column


@token_app.command("create")
def token_create(
    practice: Annotated[str, typer.Option(help="Practice id the token acts for")],
    label: Annotated[str | None, typer.Option(help="What the token is for")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help="A scope the token gets (repeatable): fhir:read, fhir:write, billing, "
            "billing:read, careplan, notification, admin. Default: all of them. An EHR "
            "connection should get only --scope fhir:read --scope fhir:write (admin may change "
            "the practice's ingest configuration); a practice's own system that reads its "
            "invoices --scope billing:read (billing also records payments and closes months: "
            "the CCM vendor's staff).",
        ),
    ] = None,
) -> None:
    """Create an API token; it is printed once, alone on the last line. Only its hash is kept.

    Without --scope the token gets every scope, admin included.

    An EHR connection should get only --scope fhir:read --scope fhir:write."""
    from ccm_shared.tenancy import create_token

    scopes = _token_scopes(scope)  # before anything is created
    if label is not None and len(label) > MAX_TOKEN_LABEL:
        _fail(f"--label takes at most {MAX_TOKEN_LABEL} characters, not {len(label)}")
    token = _with_engine(
        lambda engine: create_token(engine, practice_id=practice, scopes=scopes, label=label)
    )
    default = "" if scope else " (the default: every scope; choose fewer with --scope)"
    typer.echo(f"scopes: {' '.join(scopes)}{default}", err=True)
    typer.echo(f"token for practice {practice} (store it now; it cannot be shown again):", err=True)
    typer.echo(token)


def _with_engine(work):  # noqa: ANN001, ANN202
    """Run ``work(engine)`` on the platform database; an AppError is the command's error, an
    unreachable database exit 3 (see _database)."""
    settings = _settings()

    async def run():  # noqa: ANN202
        engine = await _connected(settings.database_url, migrated=True)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return _database(run())


def _token_line(t: dict) -> str:
    state = f"revoked {t['revoked_at']}" if t["revoked_at"] else "active"
    return (f"{t['id']}  {state:<40}  created {t['created_at']}  "
            f"scopes {','.join(t['scopes'])}  label {t['label'] or '-'}")


@token_app.command("list")
def token_list(
    practice: Annotated[str, typer.Option(help="Practice id whose tokens to list")],
) -> None:
    """List a practice's tokens: id, state, creation time, scopes, label (never the token:
    only its hash is kept). Revoke one with `ccm token revoke --practice P ID`."""
    from ccm_shared.tenancy import list_tokens

    tokens = _with_engine(lambda engine: list_tokens(engine, practice))
    if not tokens:
        typer.echo(f"practice {practice} has no tokens", err=True)
    for t in tokens:
        typer.echo(_token_line(t))


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (from `ccm token list`)")],
    practice: Annotated[str, typer.Option(help="Practice id the token belongs to")],
) -> None:
    """Revoke a token: the services stop accepting it within CCM_AUTH_CACHE_SECONDS (default
    10 s). Revoking a revoked token changes nothing."""
    from ccm_shared.tenancy import revoke_token

    t = _with_engine(lambda engine: revoke_token(engine, practice_id=practice, token_id=token_id))
    typer.echo(_token_line(t))


@audit_app.command("verify")
def audit_verify(
    practice: Annotated[str | None, typer.Option(help="Only this practice")] = None,
) -> None:
    """Recompute every practice's hash chain; report the first broken link.

    Exit codes: 0 every chain intact, 1 a chain is broken (the trail was altered), 2 refused
    configuration, 3 the database cannot be reached (nothing was verified)."""
    from ccm_shared.audit import seal_all, verify
    from ccm_shared.tenancy import get_practice

    async def check(engine):  # noqa: ANN001, ANN202
        if practice is not None:  # a practice that does not exist is no empty trail (exit 2)
            await get_practice(engine, practice)
        await seal_all(engine)  # seal what is pending so it is verified too
        return await verify(engine, practice)

    results = _with_engine(check)
    broken = [r for r in results if not r.ok]
    for r in results:
        state = "ok" if r.ok else f"BROKEN at entry {r.broken_at}: {r.reason}"
        typer.echo(f"{r.practice}: {r.entries} entries, {state}")
    if not results:
        typer.echo("no audit entries yet")
    if broken:
        typer.secho(f"audit trail altered in {len(broken)} practice(s)", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="ingest, billing, careplan, notification or all")],
    api: Annotated[
        bool, typer.Option(help="Serve the HTTP API (off: only /healthz, /readyz, /metrics)")
    ] = True,
    consumers: Annotated[bool, typer.Option(help="Run the Kafka consumers")] = True,
    relay: Annotated[bool, typer.Option(help="Run the outbox relay")] = True,
    background: Annotated[
        bool, typer.Option(help="Run the service's schedulers (safe on several replicas)")
    ] = True,
    host: Annotated[str | None, typer.Option(help="Bind address (CCM_HTTP_HOST)")] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port (CCM_HTTP_PORT); one service only"),
    ] = None,
) -> None:
    """Run a service: its HTTP API, its consumers and its outbox relay (each can be switched off
    to run them as separate processes)."""
    from ccm_shared.observability import configure_logging

    settings = _settings()
    definitions = _services(service)
    _service_settings(definitions)
    if port is not None and len(definitions) > 1:
        _fail("--port applies to one service; ports of `all` are the services' own")
    configure_logging(
        settings.log_level,
        json=settings.log_json,
        service=definitions[0].name if len(definitions) == 1 else "all",
    )
    try:
        _run_server(
            _serve(
                settings,
                definitions,
                api=api,
                consumers=consumers,
                relay=relay,
                background=background,
                host=host or settings.http_host,
                port=port or settings.http_port,
            )
        )
    except KeyboardInterrupt:
        pass


@app.command()
def up(
    data_dir: Annotated[
        str, typer.Option(help="Embedded mode: folder of the SQLite files")
    ] = ".ccm-data",
    practice: Annotated[str, typer.Option(help="Id of the demo practice")] = "demo",
    timezone: Annotated[str, typer.Option(help="Time zone of the demo practice")] = (
        "America/New_York"
    ),
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    ports: Annotated[
        str, typer.Option(help="Ports of ingest,billing,careplan,notification")
    ] = "8081,8082,8083,8084",
) -> None:
    """Run the whole platform in one process. Embedded by default (SQLite files in --data-dir
    and a durable embedded event log: nothing else to install); with CCM_DATABASE_URL and
    CCM_KAFKA_BOOTSTRAP_SERVERS set, on PostgreSQL and Kafka instead. Creates a demo practice,
    prints its API token and the URLs. Ctrl-C stops; a restart keeps the data."""
    import os

    from ccm_shared.migrate import upgrade, upgrade_platform
    from ccm_shared.observability import configure_logging
    from ccm_shared.service import discover_services

    given = [os.environ.get(name) for name in ("CCM_DATABASE_URL", "CCM_KAFKA_BOOTSTRAP_SERVERS")]
    external = all(given)
    if any(given) and not external:
        typer.echo("[ccm up] warning: only one of CCM_DATABASE_URL and "
                   "CCM_KAFKA_BOOTSTRAP_SERVERS is set; running embedded in --data-dir (set both "
                   "for PostgreSQL and Kafka)", err=True)
    folder = Path(data_dir).resolve()
    overrides = {} if external else {"database_url": f"sqlite+aiosqlite:///{folder}/platform.db"}
    settings = _settings(**overrides)
    try:
        port_list = [int(p) for p in ports.split(",")]
    except ValueError:
        port_list = []
    if not port_list or not all(1 <= p <= 65535 for p in port_list):
        _fail("--ports takes four port numbers (1-65535), e.g. 8081,8082,8083,8084")
    definitions = list(discover_services().values())
    _service_settings(definitions)
    if len(port_list) != len(definitions):
        names = ", ".join(d.name for d in definitions)
        _fail(f"--ports needs {len(definitions)} numbers ({names})")
    for port in port_list:  # before anything is migrated or printed as running
        if (problem := _port_taken(host, port)) is not None:
            _fail(f"cannot listen on {host}:{port}: {problem}; pass other --ports "
                  "(ingest,billing,careplan,notification)")
    folder.mkdir(parents=True, exist_ok=True)
    lock = _lock_data_dir(folder)  # held until the process ends  # noqa: F841
    mode = "PostgreSQL + Kafka" if external else f"embedded ({folder})"
    typer.echo(f"[ccm up] {mode}: migrating …", err=True)
    _check_database(settings.database_url)
    upgrade_platform(settings.database_url)
    for d in definitions:
        upgrade(settings.database_url, d.schema, d.migrations_package)
    token = _database(_ensure_demo_practice(settings, practice, timezone, folder))
    configure_logging(settings.log_level, json=settings.log_json, service="all")
    base = {d.name: f"http://{host}:{p}" for d, p in zip(definitions, port_list, strict=True)}
    token_path = folder / f"{practice}.token"
    typer.echo(
        "\n".join(
            [
                f"[ccm up] practice {practice!r}; API token (also in {token_path}):",
                token,
                f"[ccm up] FHIR base (ingest): {base.get('ingest', '?')}/fhir",
                *(f"[ccm up] {name:<12} {url}   docs: {url}/docs" for name, url in base.items()),
                "[ccm up] Ctrl-C stops; `ccm up` again resumes with the same data.",
            ]
        ),
        err=True,
    )
    try:
        _run_server(
            _serve(
                settings,
                definitions,
                api=True,
                consumers=True,
                relay=True,
                host=host,
                port=None,
                ports=dict(zip([d.name for d in definitions], port_list, strict=True)),
            )
        )
    except KeyboardInterrupt:
        pass


async def _ensure_demo_practice(settings, practice: str, timezone: str, folder) -> str:  # noqa: ANN001
    """The demo practice and a token for it; the token file lets a restart show it again."""
    from ccm_shared.db import create_engine_for
    from ccm_shared.errors import NotFound
    from ccm_shared.tenancy import (
        Pricing,
        create_practice,
        create_token,
        get_practice,
        resolve_token,
    )

    token_file = folder / f"{practice}.token"
    engine = create_engine_for(settings.database_url, schema=None)
    try:
        try:
            await get_practice(engine, practice)
        except NotFound:
            await create_practice(
                engine,
                practice_id=practice,
                name="Demo Family Practice",
                timezone=timezone,
                pricing=Pricing(model="percent-of-medicare", percent=Decimal("35")),
            )
        if token_file.exists():
            token = token_file.read_text().strip()
            if await resolve_token(engine, token) is not None:
                return token
        token = await create_token(engine, practice_id=practice, label="ccm up")
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        return token
    finally:
        await engine.dispose()


def _lock_data_dir(folder: Path):  # noqa: ANN202 - the open lock file
    """One ``ccm up`` per data folder: a second one (on other ports) would run every scheduler
    and consumer twice over the same files. Exit 2 when another holds it; the lock goes with
    the process (an ``flock`` on ``<folder>/.lock``)."""
    import fcntl
    import os

    handle = (folder / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        _fail(f"{folder} is in use by another `ccm up` (pid {holder}); stop it, or pass another "
              "--data-dir")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, not an address here), else None."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _run_server(main) -> None:  # noqa: ANN001
    """Run the servers' event loop: uvloop where installed (libuv; asyncpg and uvicorn do less
    work per request on it), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


# On SIGTERM, requests in flight get this long to finish before their connections are closed
# (uvicorn waits for them without a limit otherwise, and Kubernetes kills the pod at its
# terminationGracePeriodSeconds, 45 s for the APIs: the preStop sleep, these 30 s and the Kafka
# producer's flush; deploy/README.md).
GRACEFUL_SHUTDOWN_SECONDS = 30


def _server_config(app, *, host: str, port: int):  # noqa: ANN001, ANN202
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


async def _serve(  # noqa: ANN001
    settings, definitions, *, api, consumers, relay, host, port, ports=None, background=True
) -> None:
    import uvicorn

    from ccm_shared.service import ServiceRuntime, build_transport

    class _Server(uvicorn.Server):
        # One signal handler for all servers in this process (see below), not one each.
        @contextlib.contextmanager
        def capture_signals(self):  # noqa: ANN202
            yield

    transport = build_transport(settings)  # one shared transport: the in-process bus must be
    runtimes = [ServiceRuntime.build(d, settings, transport=transport) for d in definitions]
    for rt in runtimes[1:]:
        rt.run_audit_sealer = False  # one audit sealer per process
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    for rt in runtimes:
        await rt.start(consumers=consumers, relay=relay, background=background)
        # Without the API a process still serves /healthz, /readyz and /metrics.
        chosen = port or (ports or {}).get(rt.definition.name) or rt.definition.port
        config = _server_config(rt.app(operations_only=not api), host=host, port=chosen)
        servers.append(_Server(config))
        what = "API" if api else "operations endpoints"
        typer.echo(f"{rt.definition.name}: {what} on http://{host}:{config.port}", err=True)
    # Everything built at start-up lives as long as the process: move it out of the cyclic
    # garbage collector's reach, so its full collections stop walking the hundreds of thousands
    # of objects of the frameworks and models (about a fifth of ingest's CPU per stored
    # resource). Only start-up objects are frozen; what requests create is collected as before.
    gc.freeze()
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    typer.echo("stopping …", err=True)
    for s in servers:
        s.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for rt in runtimes:
        await rt.stop()
    waiter.cancel()


@app.command()
def demo(
    url: Annotated[str, typer.Option(help="Base URL of ingest")] = "http://127.0.0.1:8081",
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CCM_DEMO_TOKEN",
            help="API token of the practice (default: the token file of `ccm up` in "
            ".ccm-data/, else of deploy/local/run-platform.sh in .ccm-local/)",
        ),
    ] = None,
    practice: Annotated[str, typer.Option(help="The token's practice")] = "demo",
    patients: Annotated[int, typer.Option(min=21, max=5000, help="Synthetic patients")] = 200,
    month: Annotated[
        str | None,
        typer.Option(help="YYYY-MM; default the previous calendar month (it must have ended)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic practice")] = 1,
    out: Annotated[str, typer.Option(help="Folder of the output files")] = "./ccm-demo-output",
    billing_url: Annotated[str | None, typer.Option(help="Default: ingest's port + 1")] = None,
    careplan_url: Annotated[str | None, typer.Option(help="Default: ingest's port + 2")] = None,
    notification_url: Annotated[str | None, typer.Option(help="Default: ingest's port + 3")] = None,
    wait_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for billing to apply everything")
    ] = 600.0,
) -> None:
    """Run a month of a synthetic practice through a running platform (`ccm up` or any
    deployment): push FHIR transaction Bundles to ingest, wait for billing, close the month and
    write the billing report, Invoice and ChargeItems, care-plan tracker, notifications and an
    audit packet to --out, then print a summary. Uses only the services' HTTP APIs."""

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ccm_shared.demo.report import write_outputs
    from ccm_shared.demo.runner import DemoConfig, DemoError, Endpoints, run

    if token is None:
        for candidate in (
            Path(".ccm-data") / f"{practice}.token",
            Path(".ccm-local") / f"{practice}.token",
        ):
            if candidate.is_file():
                token = candidate.read_text().strip()
                break
    if not token:
        _fail("no API token: pass --token (or CCM_DEMO_TOKEN); `ccm up` prints one")
    console = Console(stderr=True)
    try:
        endpoints = Endpoints.derive(
            url, billing=billing_url, careplan=careplan_url, notification=notification_url
        )
        config = DemoConfig(
            endpoints,
            token,
            practice,
            patients=patients,
            month=month,
            seed=seed,
            wait_timeout=wait_timeout,
        )
        labels = {"push": "pushing FHIR Bundles to ingest", "billing": "billing applied"}
        with Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=False,
        ) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(labels.get(stage, stage), total=total)
                bar.update(tasks[stage], completed=done, total=total)

            outcome = run(config, progress, lambda m: bar.console.print(f"[ccm demo] {m}"))
    except DemoError as exc:
        _fail(str(exc), code=1)
    folder = Path(out)
    write_outputs(outcome, folder, Console())
    typer.echo(f"[ccm demo] output written to {folder.resolve()}", err=True)


@app.command("contracts")
def contracts(
    out: Annotated[str, typer.Option(help="Folder to write into")] = "contracts",
) -> None:
    """Write the AsyncAPI document and each service's OpenAPI document from the code."""

    from ccm_shared.service import discover_services

    _settings(require_db=False)
    _service_settings(discover_services().values())
    docs = generated_contracts()
    folder = Path(out)
    for relative, doc in docs.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        typer.echo(f"wrote {path}", err=True)


def generated_contracts() -> dict[str, dict]:
    """AsyncAPI and OpenAPI documents as the code describes them (relative path → document)."""
    from ccm_shared import asyncapi
    from ccm_shared.service import ServiceRuntime, discover_services
    from ccm_shared.settings import load_settings
    from ccm_shared.transport import InProcessTransport

    definitions = list(discover_services().values())
    settings = load_settings(database_url="sqlite+aiosqlite:///unused/platform.db")
    docs: dict[str, dict] = {}
    consumers: dict[str, list[tuple[str, tuple]]] = {}
    for d in definitions:
        runtime = ServiceRuntime.build(d, settings, transport=InProcessTransport())
        consumers[d.name] = [(c.name, tuple(c.topics)) for c in runtime.consumers]
        docs[f"openapi/{d.name}.json"] = runtime.app().openapi()
    docs["asyncapi.json"] = asyncapi.build(definitions, consumers)
    return docs


@app.command("events")
def events(
    topics: Annotated[list[str], typer.Argument(
        help="Topics, e.g. ingest.time-entry.logged.v1 (all of them: contracts/asyncapi.json)")],
    last: Annotated[int, typer.Option(min=1, help="Messages per partition, from the newest")] = 20,
    practice: Annotated[str | None, typer.Option(
        help="Only this practice's events among those --last reads (topics are shared by "
             "every practice: raise --last on a busy broker)")] = None,
    timeout: Annotated[float, typer.Option(
        min=0, help="Seconds to wait for the events; what has arrived by then is printed, with "
                    "a warning naming the partitions not read to their end")] = 10.0,
    data_dir: Annotated[str, typer.Option(
        help="Without Kafka: the data folder of the embedded mode (`ccm up --data-dir`), "
             "whose event log is read instead")] = ".ccm-data",
) -> None:
    """Print the newest events of topics as a subscriber reads them, one JSON object per line:
    topic, partition, offset, key and the CloudEvent (no consumer group: nothing is committed,
    no subscriber is disturbed). From Kafka when CCM_KAFKA_BOOTSTRAP_SERVERS is set, else from
    the embedded mode's event log (`ccm up` without Kafka: --data-dir, or a sqlite
    CCM_DATABASE_URL)."""

    from ccm_shared.db import is_sqlite
    from ccm_shared.embedded import EmbeddedLogTransport
    from ccm_shared.service import build_transport

    settings = _settings(require_db=False)
    if settings.kafka_bootstrap_servers:
        transport = build_transport(settings)  # Kafka, as the services connect to it
        where = "on the broker"
    else:
        url = settings.database_url
        if not (url and is_sqlite(url)):
            folder = Path(data_dir).resolve()
            if not (folder / "platform.db").is_file():
                _fail(f"no events to read: CCM_KAFKA_BOOTSTRAP_SERVERS is not set (`source "
                      f".ccm-local/env` after deploy/local/up.sh) and {folder} holds no "
                      "embedded mode data (`ccm up` makes it; --data-dir names another folder)")
            url = f"sqlite+aiosqlite:///{folder}/platform.db"
        transport = EmbeddedLogTransport(url)
        where = "in the embedded event log"
    unknown: list[str] = []
    incomplete: list[str] = []

    async def read() -> list:
        try:
            return await transport.newest(topics, last, timeout=timeout, unknown=unknown,
                                          incomplete=incomplete)
        finally:
            if isinstance(transport, EmbeddedLogTransport):
                await transport.stop()

    found = asyncio.run(read())
    for topic in unknown:
        typer.secho(f"warning: no topic {topic!r} {where} (the topics: "
                    "contracts/asyncapi.json; a service creates its topics when it starts, "
                    "the embedded log a topic with its first event)",
                    fg=typer.colors.YELLOW, err=True)
    if incomplete:
        typer.secho(f"warning: not all of the newest events arrived within {timeout:g} s "
                    f"(partitions {', '.join(incomplete)}): the list below is partial; "
                    "try a larger --timeout", fg=typer.colors.YELLOW, err=True)
    shown = 0
    for m in found:
        tenant = (m.header("ce_tenant") or b"").decode()
        if practice is not None and tenant != practice:
            continue
        try:
            value = json.loads(m.value) if m.value is not None else None  # None: a tombstone
        except ValueError:
            value = m.value.decode("utf-8", "replace")
        typer.echo(json.dumps({"topic": m.topic, "partition": m.partition, "offset": m.offset,
                               "key": m.key.decode() if m.key else None, "event": value}))
        shown += 1
    typer.secho(f"{shown} event(s) from {len(topics)} topic(s)", err=True)


@app.command("redrive")
def redrive_command(
    topics: Annotated[list[str] | None, typer.Argument(
        help="Dead-letter topics, e.g. ingest.time-entry.logged.v1.dlq (default: every "
             "topic ending in .dlq on the broker)", show_default=False)] = None,
    consumer: Annotated[str | None, typer.Option(
        help="Only what this consumer set aside (its dlq-consumer header, e.g. "
             "billing-projections)")] = None,
    practice: Annotated[str | None, typer.Option(
        help="Only this practice's dead letters")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List what would be sent back; send and commit nothing")] = False,
    timeout: Annotated[float, typer.Option(
        min=0, help="Seconds to read for; what is left is said and waits for the next run")] = 60.0,
    older_than_inboxes: Annotated[bool, typer.Option(
        "--older-than-inboxes", help="Also send back dead letters older than the inboxes keep "
        "event ids (CCM_INBOX_RETENTION_DAYS less a day): consumers that had applied such an "
        "event may apply it again")] = False,
) -> None:
    """Send dead letters back to the topics they came from, once their cause is fixed: the
    consumer that set an event aside applies it then (or sets it aside again), the others
    already have it in their inbox and take it as a duplicate. Each dead letter read is printed
    as one JSON line (where it is, where it goes, its event id, type, practice and the dlq
    headers: never the event's data). Each run reads up to where the topics ended when it
    began, from where the last run with the same --consumer and --practice stopped (its own
    consumer group): a dead letter is sent back once per choice. One older than the inboxes
    keep event ids (CCM_INBOX_RETENTION_DAYS) is listed, not sent. Needs Kafka
    (CCM_KAFKA_BOOTSTRAP_SERVERS)."""

    from ccm_shared.redrive import redrive
    from ccm_shared.service import build_transport
    from ccm_shared.transport import KafkaTransport

    settings = _settings(require_db=False)
    if not settings.kafka_bootstrap_servers:
        _fail("redrive needs Kafka: CCM_KAFKA_BOOTSTRAP_SERVERS is not set (`source "
              ".ccm-local/env` after deploy/local/up.sh). The embedded mode's event log is "
              "`ccm up`'s own")
    transport = build_transport(settings)
    assert isinstance(transport, KafkaTransport)

    def seen(letter) -> None:  # noqa: ANN001
        typer.echo(json.dumps({**letter.view(),
                               "sent": letter.chosen and not letter.too_old and not dry_run,
                               "chosen": letter.chosen}))

    async def run():  # noqa: ANN202
        try:
            return await redrive(transport, topics, consumer=consumer, practice=practice,
                                 dry_run=dry_run, timeout=timeout, seen=seen,
                                 # 0: the inboxes keep every id, however old
                                 remembered_seconds=settings.inbox_retention_days * 86400
                                 or None,
                                 older_than=older_than_inboxes)
        finally:
            await transport.stop()

    try:
        result = asyncio.run(run())
    except ValueError as exc:  # a topic that is not a dead-letter topic
        _fail(str(exc))
    for topic in result.unknown:
        typer.secho(f"warning: no topic {topic!r} on the broker", fg=typer.colors.YELLOW,
                    err=True)
    if result.incomplete:
        typer.secho(f"warning: partitions {', '.join(result.incomplete)} were not read to their "
                    f"end within {timeout:g} s; run again (or with a larger --timeout) for the "
                    "rest", fg=typer.colors.YELLOW, err=True)
    if result.too_old:
        typer.secho(f"warning: a chosen dead letter's event is older than the inboxes keep "
                    "event ids (CCM_INBOX_RETENTION_DAYS): not sent back, as consumers that "
                    "applied it could apply it again; the reading of its partition stopped "
                    f"there ({', '.join(result.held)}), uncommitted: --older-than-inboxes sends "
                    "it and what follows", fg=typer.colors.YELLOW, err=True)
    what = "would be sent back" if dry_run else "sent back"
    typer.secho(f"{result.read} dead letter(s) read, {result.chosen} chosen, "
                f"{result.chosen - result.too_old if dry_run else result.sent} {what}",
                err=True)


@app.command("config")
def show_config() -> None:
    """Check the configuration and print it (secrets masked)."""
    from ccm_shared.service import discover_services

    settings = _settings(require_db=False)
    own = _service_settings(discover_services().values())
    effective = {"outbound_allow_private": settings.outbound_private_allowed}  # unset: by CCM_ENV
    for name, value in settings.model_dump(mode="json").items():
        note = ""
        if value is None and name in effective:
            note = f"  # unset: {_shown(effective[name])} (CCM_ENV={settings.env})"
        typer.echo(f"CCM_{name.upper()}={_shown(masked(name, value))}{note}")
    for definition, service_settings in own:  # secrets masked by the same rule
        prefix = definition.settings_model.model_config.get("env_prefix", "CCM_").upper()
        typer.echo(f"# {definition.name}")
        for name, value in service_settings.model_dump(mode="json").items():
            typer.echo(f"{prefix}{name.upper()}={_shown(masked(name, value))}")


def _shown(value: object) -> str:
    """A setting's value as the environment would give it: lists as JSON, booleans lowercase,
    an unset one empty."""

    if value is None:
        return ""
    if isinstance(value, bool | list | dict):
        return json.dumps(value)
    return str(value)


def _platform_commands() -> set[str]:
    commands = {
        info.name or info.callback.__name__.replace("_", "-")
        for info in app.registered_commands
        if info.callback is not None
    }
    return commands | {info.name for info in app.registered_groups if info.name}


def _mount_service_commands(argv: list[str]) -> None:
    """Each service may bring its own subcommands: ``ccm billing close …``. Only the services
    the command line needs are imported: none for a platform command (``ccm serve ingest``
    imports ingest alone, in _services), the one named (``ccm billing …``), all for ``--help``."""
    from ccm_shared.service import discover_services, service_names

    command = argv[0] if argv else None
    if command in _platform_commands():
        return
    try:
        services = discover_services(only=command if command in service_names() else None)
    except Exception as exc:  # noqa: BLE001 - a broken service must not break `ccm --help`
        typer.secho(f"warning: could not load services: {exc}", err=True)
        return
    for definition in services.values():
        if definition.cli is not None:
            _reflow_help(definition.cli)
            app.add_typer(definition.cli, name=definition.name)
    if command in services and len(argv) > 1 and "--help" not in argv:
        # `ccm billing close …`: the service's settings are checked as for `ccm serve`.
        try:
            _service_settings([services[command]])
        except typer.Exit as exc:
            sys.exit(exc.exit_code)


def _reflow(text: str | None) -> str | None:
    """Help written as a wrapped docstring, with each paragraph's lines joined: rich help keeps
    single line breaks, which broke `ccm --help` mid-sentence; the terminal wraps them now.
    A paragraph that starts with \\b keeps its lines."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    )


def _reflow_help(typer_app: typer.Typer) -> None:
    """_reflow the help of every command and group of ``typer_app``."""
    if isinstance(typer_app.info.help, str):
        typer_app.info.help = _reflow(typer_app.info.help)
    for info in typer_app.registered_commands:
        if info.callback is not None:
            info.help = _reflow(info.help if isinstance(info.help, str)
                                else inspect.getdoc(info.callback))
    for group in typer_app.registered_groups:
        if isinstance(group.help, str):
            group.help = _reflow(group.help)
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)


def main() -> None:
    _mount_service_commands(sys.argv[1:])
    app()


if __name__ == "__main__":
    sys.exit(main())
