"""`ccm serve` runs the roles it is asked for: each switch reaches the servers (the k8s API and
consumer deployments pass --no-background; their schedulers must not run there)."""

from __future__ import annotations

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
