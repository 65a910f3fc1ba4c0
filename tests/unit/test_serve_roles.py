"""`ccm serve` runs the roles it is asked for: each switch reaches the servers (the k8s API and
consumer deployments pass --no-background; their schedulers must not run there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccm_shared import cli


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"api": True, "consumers": True, "relay": True, "background": True}),
        (["--no-consumers", "--no-relay", "--no-background"],
         {"api": True, "consumers": False, "relay": False, "background": False}),
        (["--no-api", "--no-relay", "--no-background"],
         {"api": False, "consumers": True, "relay": False, "background": False}),
        (["--no-api", "--no-consumers"],
         {"api": False, "consumers": False, "relay": True, "background": True}),
    ],
)
def test_serve_passes_every_role_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        flags: list[str], expected: dict[str, bool]) -> None:
    monkeypatch.setenv("CCM_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/platform.db")
    seen: dict = {}

    async def fake_serve(settings, definitions, **kwargs) -> None:  # noqa: ANN001
        seen.update(kwargs, services=[d.name for d in definitions])

    monkeypatch.setattr(cli, "_serve", fake_serve)
    result = CliRunner().invoke(cli.app, ["serve", "ingest", *flags])
    assert result.exit_code == 0, result.output
    assert seen["services"] == ["ingest"]
    assert {k: seen[k] for k in expected} == expected


_IMPORTED = """
import sys
from ccm_shared import cli
cli._mount_service_commands(sys.argv[1:])
if sys.argv[1:2] == ["serve"]:
    cli._services(sys.argv[2])
print(sorted(m.split(".")[0] for m in sys.modules if m.startswith("ccm_") and "." not in m
             and m != "ccm_shared"))
"""


@pytest.mark.parametrize(
    ("argv", "imported"),
    [
        (["serve", "ingest"], ["ccm_ingest"]),
        (["serve", "billing"], ["ccm_billing"]),
        (["migrate", "--help"], []),
        (["billing", "--help"], ["ccm_billing"]),
        ([], ["ccm_billing", "ccm_careplan", "ccm_ingest", "ccm_notification"]),
        (["--help"], ["ccm_billing", "ccm_careplan", "ccm_ingest", "ccm_notification"]),
    ],
)
def test_a_command_imports_only_the_services_it_needs(argv: list[str],
                                                      imported: list[str]) -> None:
    """A process serving one service carries no other service's code (ingest without billing's
    PDF fonts and notification: ~34 MB less peak memory, ~1.5 s faster start)."""
    out = subprocess.run([sys.executable, "-c", _IMPORTED, *argv], capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == repr(imported)


def test_ccm_help_still_lists_every_services_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "ccm_shared.cli", "--help"], capture_output=True,
                         text=True, check=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    for name in ("billing", "careplan", "notification", "serve", "token"):
        assert f" {name} " in out.stdout, out.stdout
