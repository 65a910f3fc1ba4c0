"""What a first install, an upgrade, a rollback and the operators' runbooks need of the
manifests: init containers that can start, Argo CD sync waves that cannot deadlock, Kafka
identities for the runbooks, a PostgreSQL connection budget that fits, and documentation that
names the operator versions the manifests need."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from ccm_shared.db import create_engine_for
from ccm_shared.redrive import group_id
from ccm_shared.service import discover_services
from tests.deploy.conftest import OVERLAYS, ROOT
from tests.deploy.test_operations import _acl_covers, _kind, _one
from tests.deploy.test_wiring import _ccm_containers


def _configmaps(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in _kind(docs, "ConfigMap")}


def _setting_values(container: dict, configmaps: dict[str, dict[str, str]]) -> dict[str, str]:
    """The literal CCM_* values a container gets (env wins over envFrom, as in Kubernetes)."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        values.update(configmaps[source["configMapRef"]["name"]])
    for e in container.get("env", []):
        if "value" in e:
            values[e["name"]] = e["value"]
    return {k: v for k, v in values.items() if k.startswith("CCM_")}


# -- finding 1: the init container crashed on a CA file it did not mount ---------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_file_a_containers_settings_name_is_mounted_in_that_container(
        overlay, rendered) -> None:
    """A setting naming a file (CCM_KAFKA_SSL_CAFILE) is checked at start-up: a container that
    gets the setting but not the volume exits (the await-migrations init container did, so no
    pod ever started)."""
    docs = rendered[overlay]
    configmaps = _configmaps(docs)
    checked = 0
    for doc, container, _svc in _ccm_containers(docs):
        where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
        mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
        for name, value in _setting_values(container, configmaps).items():
            if not value.startswith("/"):
                continue
            checked += 1
            assert any(value.startswith(m) for m in mounts), \
                f"{where}: {name}={value} is not in a mounted volume ({mounts})"
    assert checked


# -- finding 4: Argo CD sync waves ---------------------------------------------------------


def _wave(doc: dict) -> int:
    return int((doc["metadata"].get("annotations") or {}).get("argocd.argoproj.io/sync-wave", 0))


INFRASTRUCTURE = ("Kafka", "KafkaNodePool", "KafkaUser", "KafkaTopic", "Cluster", "ConfigMap",
                  "ServiceAccount", "NetworkPolicy")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_argo_cd_applies_infrastructure_then_migrations_then_workloads(overlay, rendered) -> None:
    """PreSync hooks run before anything of the sync is applied: on a first install the
    migration Jobs waited for a PostgreSQL Cluster and a KafkaUser Secret that only the sync
    creates. Sync waves order them instead."""
    docs = rendered[overlay]
    hooks = [d for d in docs
             if (d["metadata"].get("annotations") or {}).get("argocd.argoproj.io/hook")]
    assert all(d["metadata"]["annotations"]["argocd.argoproj.io/hook"] not in
               ("PreSync", "PostSync") for d in hooks)
    jobs = _kind(docs, "Job")
    assert jobs
    for job in jobs:
        annotations = job["metadata"]["annotations"]
        assert annotations["argocd.argoproj.io/hook"] == "Sync", job["metadata"]["name"]
        assert annotations["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
    infra = max(_wave(d) for d in docs if d["kind"] in INFRASTRUCTURE)
    migrations = {_wave(j) for j in jobs}
    assert len(migrations) == 1 and infra < min(migrations)
    for kind in ("Deployment", "HorizontalPodAutoscaler", "ScaledObject"):
        for doc in _kind(docs, kind):
            assert _wave(doc) > max(migrations), f"{kind}/{doc['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_jobs_do_not_wait_for_kafka(overlay, rendered) -> None:
    """`ccm migrate` uses only the database: its Job must not be held by a KafkaUser Secret or
    the cluster CA that Strimzi has not written yet."""
    for job in _kind(rendered[overlay], "Job"):
        spec = job["spec"]["template"]["spec"]
        for volume in spec["volumes"]:
            if "secret" in volume:
                assert volume["secret"].get("optional") is True, volume
        for container in spec["containers"]:
            for e in container["env"]:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if e["name"].startswith("CCM_KAFKA_") and ref:
                    assert ref.get("optional") is True, e


# -- finding 8: Compose's Kafka data -------------------------------------------------------


def test_compose_keeps_kafkas_data_in_its_volume(compose_model) -> None:
    kafka = compose_model["services"]["kafka"]
    (volume,) = [v for v in kafka["volumes"] if v["type"] == "volume"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"].split(",")
    assert all(d.rstrip("/").startswith(volume["target"].rstrip("/")) for d in log_dirs), \
        (log_dirs, volume)


# -- finding 3: the Strimzi release the manifests need --------------------------------------

# The first Strimzi release that supports each Kafka minor (Strimzi's release notes).
STRIMZI_FOR_KAFKA = {"3.9": (0, 45), "4.0": (0, 46), "4.1": (0, 48)}


def test_the_documented_strimzi_release_supports_the_kafka_version() -> None:
    text = (ROOT / "k8s/base/kafka/kafka.yaml").read_text()
    kafka = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Kafka")
    version = kafka["spec"]["kafka"]["version"]
    needed = STRIMZI_FOR_KAFKA[".".join(version.split(".")[:2])]
    assert kafka["spec"]["kafka"]["metadataVersion"].startswith(version.rsplit(".", 1)[0])
    readme = (ROOT / "deploy/README.md").read_text()
    for where, found in (("deploy/README.md", re.search(r"\[Strimzi\]\([^)]*\) (\d+)\.(\d+)\+",
                                                        readme)),
                         ("kafka.yaml", re.search(r"Strimzi \((\d+)\.(\d+)\+", text))):
        assert found, f"{where} does not name a Strimzi release"
        stated = (int(found.group(1)), int(found.group(2)))
        assert stated >= needed, f"{where} says Strimzi {stated}+, Kafka {version} needs {needed}"


# -- finding 5: a Kafka identity for the dead-letter runbook -------------------------------


def test_the_admin_pod_can_redrive_dead_letters_as_its_own_kafka_user(rendered) -> None:
    docs = rendered["prod"]
    users = {d["metadata"]["name"]: d["spec"] for d in _kind(docs, "KafkaUser")}
    admin = _one(docs, "Deployment", "ccm-admin")
    (container,) = admin["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    user = env["CCM_KAFKA_SASL_USERNAME"]["value"]
    assert user == "ccm-admin" and user in users
    assert env["CCM_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == user
    acls = users[user]["authorization"]["acls"]

    def allowed(kind: str, name: str, op: str) -> bool:
        return any(_acl_covers(a, kind, name) and op in a["operations"] for a in acls)

    topics = sorted(p.name.removesuffix(".schema.json")
                    for p in (ROOT / "contracts/events").glob("*.v1.schema.json"))
    assert topics
    for topic in topics:
        assert allowed("topic", f"{topic}.dlq", "Read"), topic
        assert allowed("topic", topic, "Write"), topic  # sent back where it came from
        assert allowed("topic", topic, "Read"), topic  # ccm events
        assert not allowed("topic", f"{topic}.dlq", "Write")
    for consumer in (None, "billing-projections"):
        for practice in (None, "acme"):
            assert allowed("group", group_id(consumer, practice), "Read")
    for name in discover_services():  # no service's own consumer groups
        assert not any(_acl_covers(a, "group", f"{name}-projections") for a in acls)
    assert [a["resource"] for a in acls if a["resource"]["type"] == "group"] == [
        {"type": "group", "name": "ccm-redrive:", "patternType": "prefix"}]
    assert not any(op in a["operations"] for a in acls
                   for op in ("Create", "Alter", "AlterConfigs", "Delete", "All"))
    runbook = (ROOT / "deploy/README.md").read_text()
    assert "kubectl -n ccm exec deploy/ccm-admin -- ccm redrive" in runbook


# -- finding 6: the PostgreSQL connection budget ---------------------------------------------

# superuser_reserved_connections (3), and CloudNativePG's own sessions (instance manager,
# monitoring, the operator's checks): left out of what the services may use.
RESERVED_CONNECTIONS = 3 + 10


def _connections_per_process(pool_size: int) -> int:
    """What ccm_shared.db keeps open at most for one process with CCM_DB_POOL_SIZE=pool_size."""
    engine = create_engine_for("postgresql+asyncpg://u:p@localhost/db", schema="x",
                               pool_size=pool_size)
    pool = engine.sync_engine.pool
    return pool.size() + max(0, pool._max_overflow)  # noqa: SLF001


def connection_budget(docs: list[dict]) -> tuple[dict[str, int], int]:
    """Role → the most connections its processes may hold at once (every Deployment at its
    autoscaler's ceiling plus its rolling update's surge pod, every migration Job running, the
    admin pod scaled up), and the sum over every role."""
    configmaps = _configmaps(docs)
    ceilings = {d["spec"]["scaleTargetRef"]["name"]: d["spec"]["maxReplicas"]
                for d in _kind(docs, "HorizontalPodAutoscaler")}
    ceilings |= {d["spec"]["scaleTargetRef"]["name"]: d["spec"]["maxReplicaCount"]
                 for d in _kind(docs, "ScaledObject")}
    roles: dict[str, int] = {}
    for doc in _kind(docs, "Deployment") + _kind(docs, "Job"):
        spec = doc["spec"]["template"]["spec"]
        name = doc["metadata"]["name"]
        if doc["kind"] == "Job":
            pods = doc["spec"].get("parallelism", 1)
        else:
            # An admin pod is scaled to 1 while an operator uses it.
            replicas = max(ceilings.get(name, doc["spec"].get("replicas", 1)), 1)
            strategy = doc["spec"].get("strategy", {})
            assert strategy.get("type", "RollingUpdate") == "RollingUpdate", name
            surge = strategy.get("rollingUpdate", {}).get("maxSurge", "25%")  # the default
            if isinstance(surge, str):  # a percentage, rounded up
                surge = math.ceil(replicas * int(surge.rstrip("%")) / 100)
            pods = replicas + surge
        for container in spec["containers"]:  # init containers end before these start
            env = {e["name"]: e for e in container["env"]}
            if "PGUSER" not in env:
                continue
            secret = env["PGUSER"]["valueFrom"]["secretKeyRef"]["name"]
            role = "ccm_" + secret.removeprefix("ccm-db-")
            pool = int(_setting_values(container, configmaps)["CCM_DB_POOL_SIZE"])
            roles[role] = roles.get(role, 0) + pods * _connections_per_process(pool)
    return roles, sum(roles.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_connection_budget_fits_postgresqls_limits(overlay, rendered) -> None:
    docs = rendered[overlay]
    cluster = _one(docs, "Cluster", "ccm-postgres")["spec"]
    max_connections = int(cluster["postgresql"]["parameters"]["max_connections"])
    limits = {r["name"]: r["connectionLimit"] for r in cluster["managed"]["roles"]}
    roles, total = connection_budget(docs)
    assert set(limits) <= set(roles), "a service role without processes?"
    for role, limit in limits.items():
        assert roles[role] <= limit, f"{role}: up to {roles[role]} connections, limit {limit}"
    assert total <= max_connections - RESERVED_CONNECTIONS, \
        f"up to {total} connections, max_connections {max_connections}"


def test_the_deploy_readme_states_the_budget_as_rendered(rendered) -> None:
    """The arithmetic in deploy/README.md is the rendered prod overlay's."""
    roles, total = connection_budget(rendered["prod"])
    section = (ROOT / "deploy/README.md").read_text().split("**Connection budget.**", 1)[1]
    section = section.split("\n### ", 1)[0]
    cluster = _one(rendered["prod"], "Cluster", "ccm-postgres")["spec"]
    assert f"max_connections: {cluster['postgresql']['parameters']['max_connections']}" \
        in section
    assert f"**{total}**" in section, f"the README's total is not {total}"
    for role, used in roles.items():
        assert re.search(rf"`{role}`[^\n]*\| {used} \|", section), f"{role}: {used}"


# -- finding 10 (b): the readiness probe waits for /readyz's own checks -----------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_readiness_probe_outwaits_the_readiness_checks(overlay, rendered) -> None:
    # /readyz: the database and Kafka at once, each for up to READINESS_PING_SECONDS.
    from ccm_shared.service import READINESS_PING_SECONDS

    for doc, container, _svc in _ccm_containers(rendered[overlay]):
        probe = container.get("readinessProbe")
        if probe:
            assert probe["timeoutSeconds"] > READINESS_PING_SECONDS + 1, (
                f"{doc['metadata']['name']}: {probe}")


# -- finding 10 (c): the API's shutdown fits its grace period --------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_pods_grace_period_covers_the_servers_own_shutdown(overlay, rendered) -> None:
    from ccm_shared.cli import GRACEFUL_SHUTDOWN_SECONDS

    producer_flush = 10  # KafkaTransport.stop
    the_rest = 5  # the runtime's other tasks and the database pool, after the server
    for deployment in _kind(rendered[overlay], "Deployment"):
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] != "api":
            continue
        spec = deployment["spec"]["template"]["spec"]
        pre_stop = int(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
        assert spec["terminationGracePeriodSeconds"] >= (
            pre_stop + GRACEFUL_SHUTDOWN_SECONDS + producer_flush + the_rest), (
            deployment["metadata"]["name"])


def test_a_practice_subscribers_prefixes_match_only_its_own_topics_and_groups() -> None:
    """Prefixed ACLs grant a practice everything that starts with its id: the prefix must end in
    a character no practice id contains. ``practice-<id>-`` granted practice ``acme`` the
    groups of ``acme-clinic`` (``practice-acme-clinic-erp``)."""
    from ccm_shared.tenancy import PRACTICE_ID

    example = (ROOT / "k8s" / "examples" / "practice-subscriber.yaml").read_text()
    user = yaml.safe_load(example.replace("<practice-id>", "acme"))
    prefixes = [acl["resource"]["name"] for acl in user["spec"]["authorization"]["acls"]
                if acl["resource"].get("patternType") == "prefix"]
    assert prefixes == ["ccm.practice.acme.", "practice.acme."]
    for prefix in prefixes:
        end = prefix[-1]
        assert not PRACTICE_ID.match(f"acme{end}clinic"), prefix  # no id holds the prefix's end
        assert not re.match(re.escape(prefix), f"{prefix[:-len('acme.')]}acme-clinic.erp")
