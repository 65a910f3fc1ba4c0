"""ccm-shared's wheel carries the event contracts its consumers check events against, whether
it is built from the repository (the images: ``uv sync --no-editable``) or from its sdist
(``uv build``); the sdist build had failed on a path outside the project."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = sorted(p.name for p in (ROOT / "contracts" / "events").glob("*.json"))


def _build(out: Path, *args: str) -> None:
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH: it builds the packages (.ci/run installs it)"
    done = subprocess.run([uv, "build", "--package", "ccm-shared", "-o", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _in_wheel(out: Path) -> list[str]:
    (wheel,) = out.glob("*.whl")
    prefix = "ccm_shared/contracts/events/"
    return sorted(n.removeprefix(prefix) for n in zipfile.ZipFile(wheel).namelist()
                  if n.startswith(prefix))


def test_the_wheel_built_from_the_repository_carries_the_contracts(tmp_path):
    _build(tmp_path, "--wheel")
    assert _in_wheel(tmp_path) == CONTRACTS


def test_the_sdist_and_the_wheel_built_from_it_carry_the_contracts(tmp_path):
    _build(tmp_path)  # the sdist, then the wheel from it
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = tarfile.open(sdist).getnames()
    assert sorted(n.rsplit("/", 1)[-1] for n in names if "/contracts/events/" in n) == CONTRACTS
    assert _in_wheel(tmp_path) == CONTRACTS
