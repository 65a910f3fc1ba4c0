"""The deployment is valid as far as this machine can prove it: every overlay renders, every
object matches its schema, the Compose file meets the Compose specification, the Dockerfile
passes BuildKit's checks, and the rendered files are current with the services' code."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from functools import cache
from pathlib import Path

import pytest
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from tests.deploy.conftest import OVERLAYS, ROOT, run

K8S_VERSION = "1.33.0"
# Custom resources checked elsewhere or (Strimzi, CloudNativePG) without a schema from the
# registries here; deploy/README.md says how each kind is checked.
CUSTOM_GROUPS = ("kafka.strimzi.io/", "postgresql.cnpg.io/", "keda.sh/")


def _load_render():
    if "ccm_deploy_render" in sys.modules:
        return sys.modules["ccm_deploy_render"]
    path = ROOT / "deploy/tools/render.py"
    spec = importlib.util.spec_from_file_location("ccm_deploy_render", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def test_rendered_files_are_current_with_the_services_code() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in _load_render().rendered().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"run `uv run python deploy/tools/render.py`; stale: {stale}"


@cache
def _schema_dir(tools: Path) -> Path:
    return tools / "schemas" / "kubernetes" / f"v{K8S_VERSION}-local-strict"


def _validator(tools: Path, api_version: str, kind: str) -> Draft7Validator:
    folder = _schema_dir(tools)
    group, _, version = api_version.rpartition("/")
    group = group.split(".")[0]
    name = f"{kind}-{group}-{version}" if group else f"{kind}-{version}"
    path = folder / f"{name.lower()}.json"
    assert path.is_file(), f"no Kubernetes {K8S_VERSION} schema for {api_version} {kind}"

    return Draft7Validator(json.loads(path.read_text()), registry=_registry(folder))


@cache
def _registry(folder: Path) -> Registry:
    # The schemas refer to their shared definitions as /api/_definitions.json.
    definitions = Resource.from_contents(
        json.loads((folder / "_definitions.json").read_text()), default_specification=DRAFT7
    )
    return Registry().with_resource("/api/_definitions.json", definitions)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_builtin_object_matches_the_kubernetes_schema(overlay, rendered, tools) -> None:
    problems = []
    checked = 0
    for doc in rendered[overlay]:
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        checked += 1
        for error in _validator(tools, doc["apiVersion"], doc["kind"]).iter_errors(doc):
            where = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} {where}: {error.message}")
    assert checked > 30
    assert not problems, "\n".join(problems)


def test_the_schema_check_rejects_a_misspelt_field(tools) -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {}, "template": {"spec": {
               "containers": [{"name": "c", "image": "i", "readinessprobe": {}}]}}}}
    messages = [e.message for e in _validator(tools, "apps/v1", "Deployment").iter_errors(bad)]
    assert any("readinessprobe" in m for m in messages), messages
    assert any("'two'" in m for m in messages), messages


def test_keda_scaled_objects_match_the_keda_crd_schema(rendered, tools) -> None:
    objects = [d for d in rendered["prod"] if d["kind"] == "ScaledObject"]
    assert objects, "the prod overlay has no ScaledObject"
    script = tools / "keda" / "keda-validate.mjs"
    ok = run(["node", str(script)], input=json.dumps(objects))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = [{**objects[0], "spec": {**objects[0]["spec"], "minReplicaCount": "two"}}]
    rejected = run(["node", str(script)], input=json.dumps(broken))
    assert rejected.returncode == 1 and "minReplicaCount" in rejected.stdout


def test_docker_compose_meets_the_compose_specification(compose_model) -> None:
    services = compose_model["services"]
    for name in ("kafka", "kafka-topics", "postgres", "ingest-api", "ingest-migrate"):
        assert name in services


def test_the_compose_check_rejects_an_invalid_file(tools, tmp_path) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("    restart: unless-stopped\n",
                                   "    restart: unless-stopped\n    restrat: always\n", 1))
    result = run([str(tools / "bin" / "ccm-compose-check"), str(broken)])
    assert result.returncode == 1 and "restrat" in result.stderr


def test_compose_dependencies_start_in_order(compose_model) -> None:
    services = compose_model["services"]
    for svc in services.values():
        command = svc.get("command") or []
        if command[:1] == ["serve"]:
            deps = svc["depends_on"]
            assert deps[f"{command[1]}-migrate"]["condition"] == "service_completed_successfully"
            assert deps["kafka-topics"]["condition"] == "service_completed_successfully"
        if command[:1] == ["migrate"]:
            assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    for infra in ("kafka", "postgres"):
        assert services[infra]["healthcheck"]["test"]


def test_the_dockerfile_passes_buildkit_checks(tools) -> None:
    result = run([str(tools / "bin" / "ccm-dockerfile-lint"), str(ROOT / "deploy/Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_lint_reports_findings(tools, tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim as build\nENV A 1\nCMD python -V\n")
    result = run([str(tools / "bin" / "ccm-dockerfile-lint"), str(bad)])
    assert result.returncode == 1
    for rule in ("FromAsCasing", "LegacyKeyValueFormat", "JSONArgsRecommended"):
        assert rule in result.stdout


def _stages(dockerfile: str) -> dict[str, str]:
    parts = re.split(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?\s*$", dockerfile, flags=re.M | re.I)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_the_image_is_built_as_the_house_rules_require() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    stages = _stages(text)
    runtime = stages["runtime"]
    assert list(stages)[-1] == "runtime", "the runtime stage must be the last (default target)"
    user = re.search(r"^USER\s+(\d+)", runtime, flags=re.M)
    assert user and int(user.group(1)) > 0, "the runtime runs as a numeric non-root user"
    assert re.search(r"^HEALTHCHECK\s", runtime, flags=re.M)
    assert "uv" not in re.findall(r"/(\w+)\s", runtime) and "COPY --from=uv" not in runtime
    assert not re.search(r"apt-get install|gcc|build-essential", runtime)
    syncs = re.findall(r"uv sync[^\n]*", text)
    assert syncs and all("--frozen" in s and "--package" in s and "--no-dev" in s for s in syncs)
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)", text, flags=re.M):
        assert re.search(r":\d+\.\d+\.\d+", image), f"{image} is not pinned to a version"
