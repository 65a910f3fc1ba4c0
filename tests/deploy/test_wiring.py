"""Every setting the services read (CCM_*) is provided to every process in Compose and in
the Kubernetes manifests, nothing set there is unknown to the services, and every pod of
the platform is hardened and probed as the issue requires."""

from __future__ import annotations

import pytest

from ccm_shared.service import discover_services
from ccm_shared.settings import Settings
from tests.deploy.conftest import OVERLAYS


def _env_names(model: type) -> set[str]:
    prefix = model.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in model.model_fields}


def known_settings(service: str) -> set[str]:
    names = _env_names(Settings)
    model = discover_services()[service].settings_model
    return names | (_env_names(model) if model else set())


def _ccm_containers(docs: list[dict]):
    """(object, container, service) for every container that runs `ccm` or its init check."""
    for doc in docs:
        if doc["kind"] == "Deployment" or doc["kind"] == "Job":
            spec = doc["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                image = c["image"]
                if "/ccm-" in image:
                    service = image.rsplit("/ccm-", 1)[1].split(":")[0]
                    yield doc, c, service


def _provided(container: dict, configmaps: dict[str, dict]) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        assert ref and ref["name"] in configmaps, f"envFrom {ref} is not rendered"
        names |= set(configmaps[ref["name"]].get("data", {}))
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_is_wired_in_kubernetes(overlay, rendered) -> None:
    configmaps = {d["metadata"]["name"]: d for d in rendered[overlay] if d["kind"] == "ConfigMap"}
    seen_services = set()
    for doc, container, service in _ccm_containers(rendered[overlay]):
        seen_services.add(service)
        provided = {n for n in _provided(container, configmaps) if n.startswith("CCM_")}
        known = known_settings(service)
        where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
        assert not known - provided, f"{where} lacks {sorted(known - provided)}"
        assert not provided - known, f"{where} sets unknown {sorted(provided - known)}"
    assert seen_services == set(discover_services())


def test_every_setting_is_wired_in_compose(compose_model) -> None:
    seen_services = set()
    for name, svc in compose_model["services"].items():
        command = svc.get("command") or []
        if command[:1] not in (["serve"], ["migrate"]):
            assert not [k for k in svc.get("environment") or {} if k.startswith("CCM_")], name
            continue
        service = command[1]
        seen_services.add(service)
        provided = {k for k in svc["environment"] if k.startswith("CCM_")}
        known = known_settings(service)
        assert not known - provided, f"{name} lacks {sorted(known - provided)}"
        assert not provided - known, f"{name} sets unknown {sorted(provided - known)}"
    assert seen_services == set(discover_services())


def test_no_secret_value_is_committed_in_the_manifests(rendered) -> None:
    for overlay in OVERLAYS:
        assert not [d for d in rendered[overlay] if d["kind"] == "Secret"]
        for _doc, container, _svc in _ccm_containers(rendered[overlay]):
            for e in container.get("env", []):
                if any(w in e["name"] for w in ("PASSWORD", "SECRET", "TOKEN")):
                    assert "valueFrom" in e, f"{e['name']} has a literal value"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_platform_pod_is_hardened_and_probed(overlay, rendered) -> None:
    for doc, container, _svc in _ccm_containers(rendered[overlay]):
        where = f"{doc['metadata']['name']}/{container['name']}"
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"], where
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert container["resources"]["requests"] and container["resources"]["limits"], where
        if doc["kind"] == "Deployment" and container["name"] != "await-migrations" \
                and doc["metadata"]["name"] != "ccm-admin":
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where


def test_each_process_has_a_deployment_pdb_and_the_apis_an_autoscaler(rendered) -> None:
    docs = rendered["prod"]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for name in discover_services():
        assert ("Deployment", f"{name}-api") in names
        assert ("Deployment", f"{name}-relay") in names
        assert ("Job", f"{name}-migrate") in names
        assert ("HorizontalPodAutoscaler", f"{name}-api") in names
        assert ("PodDisruptionBudget", f"{name}-api") in names
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "ScaledObject"}
    consumers = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
                 and d["metadata"]["labels"]["app.kubernetes.io/component"] == "consumers"}
    assert consumers and scaled == consumers


def test_kafka_topics_acls_and_replication(rendered) -> None:
    docs = rendered["prod"]
    topics = {d["spec"]["topicName"]: d["spec"] for d in docs if d["kind"] == "KafkaTopic"}
    for spec in topics.values():
        assert spec["replicas"] == 3 and spec["config"]["min.insync.replicas"] == "2"
    users = {d["metadata"]["name"]: d["spec"]["authorization"]["acls"]
             for d in docs if d["kind"] == "KafkaUser"}
    for name, definition in discover_services().items():
        acls = users[f"ccm-{name}"]
        granted = {(a["resource"].get("name"), op) for a in acls for op in a["operations"]}
        for topic in definition.produces:
            assert topic in topics and (topic, "Write") in granted
        for topic in definition.produces:
            assert (topic, "Read") not in granted or topic.startswith(name)
    kafka = next(d for d in docs if d["kind"] == "Kafka")
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    pools = [d for d in docs if d["kind"] == "KafkaNodePool"]
    assert {r for p in pools for r in p["spec"]["roles"]} == {"controller", "broker"}


def test_network_policies_start_from_default_deny(rendered) -> None:
    for overlay in OVERLAYS:
        deny = [d for d in rendered[overlay] if d["kind"] == "NetworkPolicy"
                and d["spec"]["podSelector"] == {} and "ingress" not in d["spec"]
                and "egress" not in d["spec"]]
        assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}


ROLES = ("api", "consumers", "relay", "background")


def _roles(args: list[str]) -> set[str]:
    """What `ccm serve <service> [--no-<role> …]` runs: every role not switched off."""
    return {r for r in ROLES if f"--no-{r}" not in args}


def _role_sets(processes: list[list[str]]) -> dict[str, list[set[str]]]:
    found: dict[str, list[set[str]]] = {}
    for args in processes:
        if args[:1] == ["serve"]:
            found.setdefault(args[1], []).append(_roles(args))
    return found


def _assert_one_scheduler_process_each(found: dict[str, list[set[str]]], where: str) -> None:
    # `--no-background` is honoured (it was once ignored): exactly one kind of process per
    # service runs the schedulers, audit sealer and retention, the one with the outbox relay,
    # and the API and the relay run somewhere.
    assert set(found) == set(discover_services()), where
    for service, role_sets in found.items():
        jobs = [roles for roles in role_sets if "background" in roles]
        assert len(jobs) == 1 and "relay" in jobs[0], f"{where}: {service} {role_sets}"
        assert any("api" in roles for roles in role_sets), f"{where}: {service} has no API"


def test_each_service_runs_its_schedulers_in_exactly_one_kind_of_process(
        rendered, compose_model) -> None:
    compose = [svc.get("command") or [] for svc in compose_model["services"].values()]
    _assert_one_scheduler_process_each(_role_sets(compose), "compose")
    for overlay in OVERLAYS:
        k8s = [c.get("args") or [] for doc in rendered[overlay] if doc["kind"] == "Deployment"
               for c in doc["spec"]["template"]["spec"]["containers"]]
        _assert_one_scheduler_process_each(_role_sets(k8s), overlay)
