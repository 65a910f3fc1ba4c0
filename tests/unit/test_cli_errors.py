"""The `ccm` command's errors: a refused setting (platform's or a service's own) is one line naming
the variable with exit 2, an unreachable database one line with exit 3 (never the password),
`ccm config` masks every secret by one rule, and help paragraphs wrap where the terminal ends."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ccm_shared import cli

pytestmark = pytest.mark.usefixtures("clean_ccm_env")

# Nothing listens on port 1: connecting is refused at once, no infrastructure needed.
UNREACHABLE = "postgresql+asyncpg://ccm:s3cret-pw@127.0.0.1:1/ccm"

BAD_VALUES = [
    ("CCM_LOG_LEVEL", "LOUD"),
    ("CCM_DATABASE_URL", "not-a-url"),
    ("CCM_DATABASE_URL", "mysql://u:p@h/db"),
    ("CCM_KAFKA_SASL_MECHANISM", "FOO"),
    ("CCM_HTTP_PORT", "99999"),
    ("CCM_KAFKA_SSL_CAFILE", "/nonexistent"),
    ("CCM_DB_POOL_SIZE", "0"),
    ("CCM_BILLING_ALERT_DAYS", "7,x"),
    ("CCM_NOTIFICATION_SMTP_PORT", "-5"),
    ("CCM_CAREPLAN_SCHEDULER_BATCH_SIZE", "0"),
]


def ccm(*args: str):  # noqa: ANN201
    return CliRunner().invoke(cli.app, list(args))


def refused_line(result, variable: str) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no exception escaped: no traceback
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if variable in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: configuration refused: {variable}: ")
    return lines[0]


@pytest.mark.parametrize(("command", "variable", "value"), [
    (command, variable, value)
    for command in (["config"], ["serve", "all"], ["contracts"], ["migrate"])
    for variable, value in BAD_VALUES
    # `ccm migrate` uses only the database: it does not check that the CA file exists
    # (tests/unit/test_migrate_settings.py).
    if not (command == ["migrate"] and variable == "CCM_KAFKA_SSL_CAFILE")
])
def test_a_bad_value_is_one_line_naming_it(monkeypatch, tmp_path, command, variable, value):
    monkeypatch.chdir(tmp_path)  # `ccm contracts` would write here
    if variable != "CCM_DATABASE_URL":  # serve needs one; the services' settings come next
        monkeypatch.setenv("CCM_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/platform.db")
    monkeypatch.setenv(variable, value)
    refused_line(ccm(*command), variable)
    assert not (tmp_path / "contracts").exists()


def test_up_refuses_a_bad_service_setting_before_creating_anything(monkeypatch, tmp_path):
    monkeypatch.setenv("CCM_NOTIFICATION_SMTP_PORT", "-5")
    refused_line(ccm("up", "--data-dir", str(tmp_path / "data")), "CCM_NOTIFICATION_SMTP_PORT")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("args", [["serve", "all"], ["billing", "decide"]])
def test_the_installed_command_prints_no_traceback(tmp_path, args):
    """Through `main()`, as installed: also a service's own command (`ccm billing …`)."""
    env = {"PATH": "/usr/bin:/bin", "CCM_LOG_LEVEL": "info", "CCM_BILLING_ALERT_DAYS": "7,x",
           "CCM_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/platform.db"}
    proc = subprocess.run([sys.executable, "-m", "ccm_shared.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: configuration refused: CCM_BILLING_ALERT_DAYS: Input should be a valid integer, "
        "unable to parse string as an integer")


def test_several_bad_values_are_one_line_each(monkeypatch):
    monkeypatch.setenv("CCM_LOG_LEVEL", "LOUD")
    monkeypatch.setenv("CCM_HTTP_PORT", "-1")
    result = ccm("config")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: configuration refused:"
    assert [line.split(":")[0] for line in lines[1:]] == ["CCM_LOG_LEVEL", "CCM_HTTP_PORT"]


def test_config_masks_every_secret_by_one_rule(monkeypatch):
    secrets = {
        "CCM_DATABASE_URL": "postgresql+asyncpg://ccm:pw-userinfo@db:5432/ccm?password=pw-query",
        "CCM_KAFKA_SASL_PASSWORD": "pw-sasl",
        "CCM_SECRET_KEY": "pw-secret-key",
        "CCM_NOTIFICATION_SMTP_PASSWORD": "pw-smtp",
        "CCM_NOTIFICATION_PUBLIC_BASE_URL": "https://user:pw-link@notify.example.org",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    result = ccm("config")
    assert result.exit_code == 0, result.output
    assert "pw-" not in result.stdout
    shown = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert shown["CCM_DATABASE_URL"] == "postgresql+asyncpg://ccm:***@db:5432/ccm?password=***"
    assert shown["CCM_KAFKA_SASL_PASSWORD"] == shown["CCM_SECRET_KEY"] == "***"
    assert shown["CCM_NOTIFICATION_SMTP_PASSWORD"] == "***"
    assert shown["CCM_NOTIFICATION_PUBLIC_BASE_URL"] == "https://user:***@notify.example.org"
    assert shown["CCM_KAFKA_SASL_USERNAME"] == ""  # unset, as the environment has it


def test_config_shows_values_as_the_environment_takes_them(monkeypatch):
    """A list was shown as a Python tuple, and an unset value whose default depends on
    CCM_ENV as None."""
    monkeypatch.setenv("CCM_ENV", "development")
    result = ccm("config")
    assert result.exit_code == 0, result.output
    shown = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert shown["CCM_BILLING_ALERT_DAYS"] == "[7, 3]"
    assert shown["CCM_LOG_JSON"] == "true"
    assert shown["CCM_OUTBOUND_ALLOW_PRIVATE"] == "  # unset: true (CCM_ENV=development)"


@pytest.mark.parametrize(
    "args",
    [
        ["migrate"],
        ["migrate", "ingest"],
        ["token", "list", "--practice", "alpha"],
        ["token", "create", "--practice", "alpha"],
        ["token", "revoke", "--practice", "alpha", "some-id"],
        ["practice", "create", "--id", "alpha", "--name", "A", "--timezone", "UTC"],
        ["audit", "verify"],
    ],
)
def test_an_unreachable_database_is_exit_3_without_the_password(monkeypatch, args):
    monkeypatch.setenv("CCM_DATABASE_URL", UNREACHABLE)
    result = ccm(*args)
    assert result.exit_code == cli.EXIT_UNREACHABLE == 3, result.output
    assert isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert message.startswith("error: cannot reach the database: ") and "\n" not in message
    assert "127.0.0.1:1" in message and "s3cret-pw" not in result.output


def test_audit_verify_documents_its_exit_codes():
    result = CliRunner().invoke(cli.app, ["audit", "verify", "--help"], terminal_width=200)
    text = " ".join(result.stdout.split())
    assert "1 a chain is broken" in text and "3 the database cannot be reached" in text


def test_an_unknown_service_is_refused_before_anything_is_migrated(monkeypatch):
    """Exit 2 although the database is unreachable: the name is checked first."""
    monkeypatch.setenv("CCM_DATABASE_URL", UNREACHABLE)
    result = ccm("migrate", "bogus")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown service 'bogus'")
    assert "migrating" not in result.stderr


def test_help_paragraphs_have_no_hard_line_breaks():
    result = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    # each command's summary is one line on a wide terminal, not broken where the source was
    serve = [line for line in lines if "│ serve " in line]
    assert len(serve) == 1 and "switched off to run them as separate processes" in serve[0]

    def helps(typer_app):  # noqa: ANN001, ANN202
        yield from (c.help for c in typer_app.registered_commands)
        for group in typer_app.registered_groups:
            yield from helps(group.typer_instance)

    for text in helps(cli.app):
        for paragraph in (text or "").split("\n\n"):
            assert "\n" not in paragraph or paragraph.startswith("\b"), paragraph


@pytest.mark.parametrize("args", [["token", "list", "--practice", "demo"],
                                  ["practice", "create", "--id", "x", "--name", "X",
                                   "--timezone", "UTC"],
                                  ["audit", "verify"]])
@pytest.mark.parametrize("where", ["missing-file", "not-migrated"])
def test_a_database_never_migrated_is_one_line_and_creates_nothing(monkeypatch, tmp_path, args,
                                                                   where):
    """A mistyped SQLite path made empty database files and a 100-line traceback (no such
    table), and `ccm audit verify` said all was well."""
    path = tmp_path / "nowhere" / "platform.db"
    if where == "not-migrated":
        path.parent.mkdir()
        path.touch()
    monkeypatch.setenv("CCM_DATABASE_URL", f"sqlite+aiosqlite:///{path}")
    result = ccm(*args)
    assert result.exit_code == cli.EXIT_UNREACHABLE, result.output
    assert "Traceback" not in result.output and "run `ccm migrate`" in result.stderr
    if where == "missing-file":
        assert not path.parent.exists()


def test_up_refuses_ports_in_use_before_anything_runs(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = ccm("up", "--data-dir", str(tmp_path / "data"),
                     "--ports", f"{port},{port + 1},{port + 2},{port + 3}")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--pricing", "percent-of-medicare", "--percent", "-5"], "--percent -5: more than 0"),
    (["--pricing", "percent-of-medicare", "--percent", "150"], "at most 100"),
    (["--pricing", "per-code", "--rate", "99490=-5"], "an amount of at least 0"),
    (["--pricing", "per-code", "--rate", "99490=1.005"], "at most two decimals"),
    (["--pricing", "per-code", "--rate", "99999=1"], "--rate 99999: not a code billing bills"),
    (["--pricing", "flat-per-patient", "--flat-fee", "-40"], "--flat-fee -40"),
    (["--pricing", "percent-of-medicare", "--flat-fee", "40"], "--flat-fee is for"),
    (["--pricing", "percent-of-medicare", "--rate", "99490=42"], "--rate is for"),
    (["--due-days", "-3"], "greater than or equal to 1"),
])
def test_impossible_pricing_is_refused(monkeypatch, tmp_path, options, message):
    """A negative percent gave a negative invoice that could never be paid."""
    monkeypatch.setenv("CCM_DATABASE_URL", UNREACHABLE)  # refused before connecting
    result = ccm("practice", "create", "--id", "x", "--name", "X", "--timezone", "UTC",
                 *options)
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize("args", [["audit", "verify", "--practice", "nosuch"],
                                  ["careplan", "rules", "nosuch"]])
def test_a_practice_that_does_not_exist_is_not_an_empty_one(monkeypatch, tmp_path, args):
    """`audit verify --practice nosuch` said 'no audit entries yet' (exit 0) and `careplan
    rules nosuch` printed the defaults, where `token list` says the practice is not found."""
    url = f"sqlite+aiosqlite:///{tmp_path}/platform.db"
    monkeypatch.setenv("CCM_DATABASE_URL", url)
    assert ccm("migrate").exit_code == 0
    proc = subprocess.run([sys.executable, "-m", "ccm_shared.cli", *args],  # as installed
                          env={"PATH": "/usr/bin:/bin", "CCM_DATABASE_URL": url},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "practice 'nosuch' not found" in proc.stderr and "Traceback" not in proc.stderr


def test_the_smtp_port_is_a_port():
    from ccm_notification.config import NotificationSettings
    from ccm_shared.settings import ConfigurationError, load_service_settings

    with pytest.raises(ConfigurationError, match="CCM_NOTIFICATION_SMTP_PORT"):
        load_service_settings(NotificationSettings, smtp_port=70000)


def test_a_second_ccm_up_on_the_same_data_folder_is_refused(tmp_path):
    """Two `ccm up` on one folder (other ports) ran every scheduler and consumer twice over
    the same files."""
    import fcntl

    folder = tmp_path / "data"
    folder.mkdir()
    with (folder / ".lock").open("a+") as held:  # the first one's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        result = ccm("up", "--data-dir", str(folder), "--ports", "18971,18972,18973,18974")
    assert result.exit_code == 2, result.output
    assert "is in use by another `ccm up` (pid 4242)" in result.stderr
    assert not (folder / "platform.db").exists()
