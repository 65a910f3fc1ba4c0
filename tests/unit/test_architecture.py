"""Layering rules from the house style, checked on the source text."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if p.is_dir())
FRAMEWORKS = {"fastapi", "starlette", "sqlmodel", "sqlalchemy", "aiokafka", "httpx", "fhir",
              "pydantic", "alembic", "uvicorn"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_there_are_four_services():
    assert SERVICES == ["billing", "careplan", "ingest", "notification"]


@pytest.mark.parametrize("service", SERVICES)
def test_domain_layer_imports_no_framework(service):
    domain = ROOT / "services" / service / "src" / f"ccm_{service}" / "domain"
    for path in domain.rglob("*.py"):
        assert not imports(path) & FRAMEWORKS, f"{path} imports a framework"


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_import_each_other(service):
    others = {f"ccm_{s}" for s in SERVICES if s != service}
    for path in (ROOT / "services" / service).rglob("*.py"):
        assert not imports(path) & others, f"{path} imports another service"


def test_platform_library_imports_no_service():
    services = {f"ccm_{s}" for s in SERVICES}
    for path in (ROOT / "shared").rglob("*.py"):
        assert not imports(path) & services, f"{path} imports a service"


def test_services_have_the_same_shape():
    for service in SERVICES:
        pkg = ROOT / "services" / service / "src" / f"ccm_{service}"
        for part in ("domain", "service_layer", "adapters", "entrypoints", "migrations",
                     "bootstrap.py"):
            assert (pkg / part).exists(), f"{service} lacks {part}"
