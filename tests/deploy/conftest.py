"""Fixtures for the deployment checks: the validation tools (installed by
deploy/tools/install.sh), the rendered overlays and the resolved Compose model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "tools" / "install.sh"
OVERLAYS = ("dev", "prod")


def _missing(what: str) -> None:
    pytest.fail(f"{what} is not installed: run deploy/tools/install.sh", pytrace=False)


@pytest.fixture(scope="session")
def tools() -> Path:
    out = subprocess.run(
        ["bash", str(INSTALL), "--print"], capture_output=True, text=True, check=True
    )
    path = Path(out.stdout.strip())
    for binary in ("kustomize", "ccm-compose-check", "ccm-dockerfile-lint"):
        if not (path / "bin" / binary).is_file():
            _missing(binary)
    if not (path / "schemas" / "kubernetes").is_dir():
        _missing("the Kubernetes JSON schemas")
    if not (path / "keda" / "node_modules").is_dir():
        _missing("the KEDA schemas")
    return path


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def rendered(tools: Path) -> dict[str, list[dict]]:
    """Overlay name → every object `kustomize build` renders for it."""
    out = {}
    for overlay in OVERLAYS:
        result = run([str(tools / "bin" / "kustomize"), "build", str(ROOT / "k8s" / "overlays" /
                                                                     overlay)])
        assert result.returncode == 0, f"kustomize build {overlay} failed:\n{result.stderr}"
        out[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


@pytest.fixture(scope="session")
def compose_model(tools: Path) -> dict:
    result = run([str(tools / "bin" / "ccm-compose-check"), str(ROOT / "docker-compose.yml")])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
