"""What the platform needs at run time beyond its wiring: the network paths its documented
features use (billing's EHR push, notification's signed links), ports that cannot drift from
the objects that use them, graceful API shutdown, autoscalers that own their replica counts,
migrations that cannot hang, and KEDA reading Kafka as a describe-only user."""

from __future__ import annotations

import ipaddress
import json
import re
from urllib.parse import urlsplit

import pytest

from ccm_shared.service import discover_services
from tests.deploy.conftest import OVERLAYS, ROOT, run
from tests.deploy.test_wiring import _ccm_containers, _roles


def _kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions In/NotIn/Exists) matches."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value = labels.get(e["key"])
        if e["operator"] == "In" and value not in e["values"]:
            return False
        if e["operator"] == "NotIn" and value in e["values"]:
            return False
        if e["operator"] == "Exists" and value is None:
            return False
        if e["operator"] == "DoesNotExist" and value is not None:
            return False
    return True


def _pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _policies_for(docs: list[dict], labels: dict[str, str], direction: str) -> list[dict]:
    kind = {"egress": "Egress", "ingress": "Ingress"}[direction]
    return [p for p in _kind(docs, "NetworkPolicy")
            if kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], labels)]


def _public_egress_ports(policy: dict) -> set[int]:
    """TCP ports a policy opens to addresses outside the cluster (a public ipBlock)."""
    ports = set()
    for rule in policy["spec"].get("egress", []):
        public = any(
            "ipBlock" in peer
            and ipaddress.ip_address("8.8.8.8") in ipaddress.ip_network(peer["ipBlock"]["cidr"])
            for peer in rule.get("to", [])
        )
        if public:
            ports |= {p["port"] for p in rule.get("ports", []) if p.get("protocol") == "TCP"}
    return ports


def _args(deployment: dict) -> list[str]:
    return deployment["spec"]["template"]["spec"]["containers"][0].get("args") or []


# -- H3: billing's EHR push --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_billing_process_that_pushes_to_ehrs_may_reach_https_and_only_it(
        overlay, rendered) -> None:
    docs = rendered[overlay]
    billing = [d for d in _kind(docs, "Deployment")
               if _args(d)[:2] == ["serve", "billing"]]
    pushers = [d for d in billing if "background" in _roles(_args(d))]
    assert len(pushers) == 1, "exactly one billing Deployment runs the background jobs"
    for deployment in billing:
        ports = set().union(*(_public_egress_ports(p) for p in
                              _policies_for(docs, _pod_labels(deployment), "egress")))
        name = deployment["metadata"]["name"]
        if deployment is pushers[0]:
            assert 443 in ports, f"{name} runs the EHR push but may not reach HTTPS"
        else:
            assert not ports, f"{name} does not push to EHRs yet may reach {sorted(ports)}"


def test_every_network_policy_is_listed_in_the_deploy_readme(rendered) -> None:
    text = (ROOT / "deploy/README.md").read_text()
    section = text.split("### NetworkPolicies", 1)[1].split("\n## ", 1)[0]
    names = {p["metadata"]["name"] for o in OVERLAYS for p in _kind(rendered[o], "NetworkPolicy")}
    missing = sorted(n for n in names if f"`{n}`" not in section)
    assert not missing, f"deploy/README.md's NetworkPolicies section lacks {missing}"


# -- M1: notification in production and its public links ---------------------------------------


def _signed_link_routes() -> set[str]:
    """The routes the signed links in notification's e-mails point at: the ones that take a
    `{token}` and no bearer token (their prefix before `{token}`)."""
    spec = json.loads((ROOT / "contracts/openapi/notification.json").read_text())
    return {path.split("{token}")[0] for path in spec["paths"] if path.endswith("/{token}")}


def _notification_ingress_paths(docs: list[dict]) -> dict[str, set[str]]:
    """host → paths routed to the notification Service."""
    out: dict[str, set[str]] = {}
    for ingress in _kind(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                if path["backend"]["service"]["name"] == "notification":
                    out.setdefault(rule["host"], set()).add(path["path"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_notifications_links_are_public_and_nothing_else_of_its_api(overlay, rendered) -> None:
    docs = rendered[overlay]
    routes = _signed_link_routes()
    assert routes == {"/v1/ack/", "/v1/calls/choose/"}, routes
    hosts = _notification_ingress_paths(docs)
    assert len(hosts) == 1, hosts
    (host, paths), = hosts.items()
    # Prefix paths match whole path elements: /v1/ack serves /v1/ack/<token> and nothing else.
    assert {p.rstrip("/") + "/" for p in paths} == routes
    for ingress in _kind(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                if path["backend"]["service"]["name"] == "notification":
                    assert path["pathType"] == "Prefix"
                    assert host in [h for t in ingress["spec"]["tls"] for h in t["hosts"]]
    config = _one(docs, "ConfigMap", "notification-config")["data"]
    base = urlsplit(config["CCM_NOTIFICATION_PUBLIC_BASE_URL"])
    assert base.scheme == "https" and base.hostname == host and base.path in ("", "/"), \
        "the links in e-mails must point at notification's Ingress"
    api = _one(docs, "Deployment", "notification-api")
    allowed = [p for p in _policies_for(docs, _pod_labels(api), "ingress")
               for rule in p["spec"].get("ingress", []) for peer in rule.get("from", [])
               if peer.get("namespaceSelector", {}).get("matchLabels", {})
               .get("kubernetes.io/metadata.name") == "ingress-nginx"
               and {"protocol": "TCP", "port": 8084} in rule["ports"]]
    assert allowed, "no NetworkPolicy lets the ingress controller reach notification's API"


def test_prod_notification_settings_are_the_operators_not_the_code_defaults(rendered) -> None:
    config = _one(rendered["prod"], "ConfigMap", "notification-config")["data"]
    assert config["CCM_NOTIFICATION_PRACTICE_TOPIC_REPLICATION"] == "3"
    smtp = config["CCM_NOTIFICATION_SMTP_HOST"]
    assert smtp != "localhost" and smtp.endswith(".example.com"), smtp
    assert "localhost" not in config["CCM_NOTIFICATION_MAIL_FROM"]
    checklist = (ROOT / "deploy/README.md").read_text().split("### First install", 1)[1]
    checklist = checklist.split("\n### ", 1)[0]
    for setting in ("CCM_NOTIFICATION_SMTP_HOST", "CCM_NOTIFICATION_PUBLIC_BASE_URL"):
        assert setting in checklist, f"the first-install checklist does not name {setting}"


def test_prod_fhir_urls_name_the_public_https_base(rendered) -> None:
    """TLS ends at the ingress: without CCM_INGEST_FHIR_BASE_URL, Location and fullUrl were
    built from the request the pod saw (http://)."""
    docs = rendered["prod"]
    (ingress,) = [i for i in _kind(docs, "Ingress") if i["metadata"]["name"] == "ingest-fhir"]
    host = ingress["spec"]["rules"][0]["host"]
    base = _one(docs, "ConfigMap", "ingest-overrides")["data"]["CCM_INGEST_FHIR_BASE_URL"]
    assert base == f"https://{host}/fhir"
    checklist = (ROOT / "deploy/README.md").read_text().split("### First install", 1)[1]
    assert "CCM_INGEST_FHIR_BASE_URL" in checklist.split("\n### ", 1)[0]


# -- M4: session-level advisory locks ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_relays_and_migrations_hold_session_locks_on_direct_connections(
        overlay, rendered) -> None:
    """The relay's leader election and `ccm migrate` take session-level advisory locks: their
    database URL must not go through a transaction-mode pooler, and a migration cannot hang
    forever on its lock."""
    for doc, container, _svc in _ccm_containers(rendered[overlay]):
        component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        if component not in ("relay", "migrate") or container["name"] == "await-migrations":
            continue
        url = next(e["value"] for e in container["env"] if e["name"] == "CCM_DATABASE_URL")
        assert "@ccm-postgres-rw:5432/" in url, f"{doc['metadata']['name']}: {url}"
        assert "prepared_statement_cache_size=0" not in url, doc["metadata"]["name"]
    for job in _kind(rendered[overlay], "Job"):
        deadline = job["spec"].get("activeDeadlineSeconds")
        assert deadline and 0 < deadline <= 3600, f"{job['metadata']['name']}: {deadline}"


# -- M5: graceful API shutdown -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_pods_drain_before_their_listener_closes(overlay, rendered) -> None:
    apis = [d for d in _kind(rendered[overlay], "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "api"]
    assert len(apis) == len(discover_services())
    for deployment in apis:
        spec = deployment["spec"]["template"]["spec"]
        command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "/bin/sleep", command  # the runtime image is Debian slim
        delay = int(command[1])
        assert 3 <= delay <= 15
        # The sleep, then the process's own shutdown: requests in flight and the producer flush.
        assert spec["terminationGracePeriodSeconds"] >= delay + 30


def test_the_runtime_image_has_the_sleep_the_pre_stop_hook_runs() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    image = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M).group(1)
    assert re.search(r"-slim-(bookworm|trixie)$", image), f"{image}: is /bin/sleep still there?"
    assert "FROM ${PYTHON_IMAGE} AS runtime" in text


def test_compose_gives_every_service_process_time_to_stop(compose_model) -> None:
    for name, svc in compose_model["services"].items():
        if (svc.get("command") or [])[:1] == ["serve"]:
            assert svc.get("stop_grace_period") == "30s", name


# -- M6: autoscalers own the replica count -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_deployments_leave_the_replica_count_to_the_autoscaler(
        overlay, rendered) -> None:
    docs = rendered[overlay]
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs
              if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")}
    assert {f"{name}-api" for name in discover_services()} <= scaled
    for deployment in _kind(docs, "Deployment"):
        if deployment["metadata"]["name"] in scaled:
            assert "replicas" not in deployment["spec"], deployment["metadata"]["name"]


# -- L2: the HTTP port cannot drift ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_http_port_is_pinned_where_every_object_expects_it(overlay, rendered) -> None:
    docs = rendered[overlay]
    ports = {name: d.port for name, d in discover_services().items()}
    for doc, container, svc in _ccm_containers(docs):
        where = f"{doc['metadata']['name']}/{container['name']}"
        env = [e for e in container["env"] if e["name"] == "CCM_HTTP_PORT"]
        assert env == [{"name": "CCM_HTTP_PORT", "value": str(ports[svc])}], f"{where}: {env}"
    metrics_ports = {p["port"] for p in _one(docs, "NetworkPolicy", "api-clients-and-metrics")
                     ["spec"]["ingress"][0]["ports"]}
    for deployment in _kind(docs, "Deployment"):
        args = _args(deployment)
        if args[:1] != ["serve"]:
            continue
        port = ports[args[1]]
        template = deployment["spec"]["template"]
        assert template["spec"]["containers"][0]["ports"] == [{"name": "http",
                                                                "containerPort": port}]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert port in metrics_ports
    for name, port in ports.items():
        service = _one(docs, "Service", name)
        assert [p["port"] for p in service["spec"]["ports"]] == [port]


# -- L3: KEDA on the authenticated listener ----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_has_no_unauthenticated_listener_and_no_super_user(overlay, rendered) -> None:
    kafka = next(d for d in rendered[overlay] if d["kind"] == "Kafka")["spec"]["kafka"]
    for listener in kafka["listeners"]:
        assert listener["tls"] and listener["authentication"]["type"] == "scram-sha-512", \
            listener["name"]
    assert not kafka["authorization"].get("superUsers")


def _acl_covers(acl: dict, kind: str, name: str) -> bool:
    resource = acl["resource"]
    if resource["type"] != kind:
        return False
    if resource.get("patternType", "literal") == "prefix":
        return name.startswith(resource["name"])
    return resource["name"] in (name, "*")


def test_keda_reads_lag_as_a_describe_only_kafka_user(rendered, tools) -> None:
    docs = rendered["prod"]
    auths = {d["metadata"]["name"]: d for d in _kind(docs, "TriggerAuthentication")}
    configmaps = {d["metadata"]["name"]: d["data"] for d in _kind(docs, "ConfigMap")}
    users = {d["metadata"]["name"]: d["spec"] for d in _kind(docs, "KafkaUser")}
    checked = 0
    for scaled in _kind(docs, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert meta["bootstrapServers"] == "ccm-kafka-kafka-bootstrap.ccm.svc:9093"
            auth = auths[trigger["authenticationRef"]["name"]]["spec"]
            params = {r["parameter"]: configmaps[r["name"]][r["key"]]
                      for r in auth.get("configMapTargetRef", [])}
            secrets = {r["parameter"]: (r["name"], r["key"]) for r in auth["secretTargetRef"]}
            assert params["sasl"] == "scram_sha512" and params["tls"] == "enable"
            user = users[params["username"]]
            assert user["authentication"]["type"] == "scram-sha-512"
            assert secrets["password"] == (params["username"], "password")  # Strimzi's Secret
            assert secrets["ca"] == ("ccm-kafka-cluster-ca-cert", "ca.crt")
            acls = user["authorization"]["acls"]
            assert {op for a in acls for op in a["operations"]} == {"Describe"}
            assert any(_acl_covers(a, "topic", meta["topic"]) for a in acls), meta["topic"]
            assert any(_acl_covers(a, "group", meta["consumerGroup"]) for a in acls)
            assert not any(_acl_covers(a, "topic", "ccm.practice.acme.billing.invoice.paid.v1")
                           or _acl_covers(a, "group", "practice-acme-erp") for a in acls)
            checked += 1
    assert checked
    script = ("import { readFileSync } from 'node:fs';"
              "import { TriggerAuthentication } from '@kubernetes-models/keda/keda.sh/v1alpha1';"
              "let bad = 0;"
              "for (const o of JSON.parse(readFileSync(0, 'utf8'))) {"
              "  try { new TriggerAuthentication(o).validate(); }"
              "  catch (e) { bad += 1; console.log(`${o.metadata.name}: ${e.message}`); } }"
              "process.exit(bad ? 1 : 0);")
    result = run(["node", "--input-type=module", "-e", script], input=json.dumps(
        list(auths.values())), cwd=tools / "keda")
    assert result.returncode == 0, result.stdout + result.stderr


# -- L4: the Dockerfile's description of the processes -----------------------------------------


def test_the_dockerfile_header_names_the_processes_as_kubernetes_runs_them(rendered) -> None:
    header = []
    for line in (ROOT / "deploy/Dockerfile").read_text().splitlines():
        if line.startswith("# syntax"):
            continue
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    text = " ".join(header)
    for overlay in OVERLAYS:
        for deployment in _kind(rendered[overlay], "Deployment"):
            args = _args(deployment)
            if args[:1] == ["serve"]:
                flags = " ".join(args[2:])
                assert flags in text, f"deploy/Dockerfile's header lacks `{flags}`"
