"""Render the parts of the deployment that follow from the code: docker-compose.yml and the
per-service Kubernetes manifests, Kafka topics and Kafka users.

Services, their ports, consumer groups, produced topics and settings are read from the installed
services (``ccm_shared.service.discover_services``) and the event contracts, so a new service,
consumer or setting shows up here by re-running:

    uv run python deploy/tools/render.py           # write the files
    uv run python deploy/tools/render.py --check   # exit 1 if a committed file is out of date

Hand-written (not rendered): k8s/base/{kafka/kafka.yaml,postgres,network-policies.yaml,
ingress.yaml,kustomization.yaml} and the overlays.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ccm_shared.events import PRACTICE_TOPIC_PREFIX
from ccm_shared.settings import SECRET_WORDS
from ccm_shared.transport import TOPIC_CONFIG

ROOT = Path(__file__).resolve().parents[2]
HEADER = "# Rendered by deploy/tools/render.py from the services' code: do not edit by hand.\n"
IMAGE_REPO = "ghcr.io/ccm-platform/ccm-{svc}"
KAFKA_CLUSTER = "ccm-kafka"
PG_CLUSTER = "ccm-postgres"
DATABASE = "ccm"


@dataclass(frozen=True)
class Setting:
    env: str
    default: object  # None: no default, left unset unless the operator provides one
    secret: bool


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    produces: tuple[str, ...]
    per_practice: bool  # fans events out to ccm.practice.<id>.* topics
    consumers: tuple[tuple[str, tuple[str, ...]], ...]
    settings: tuple[Setting, ...]  # the service's own (CCM_<SVC>_*)


def _settings_of(model: type) -> tuple[Setting, ...]:
    prefix = model.model_config.get("env_prefix", "")
    out = []
    for name, field in model.model_fields.items():
        default = field.default
        if hasattr(default, "value"):  # enums
            default = default.value
        out.append(
            Setting(
                env=f"{prefix}{name}".upper(),
                default=default,
                secret=any(w in name for w in SECRET_WORDS),
            )
        )
    return tuple(out)


def shared_settings() -> tuple[Setting, ...]:
    from ccm_shared.settings import Settings

    return _settings_of(Settings)


def discover() -> list[Service]:
    from ccm_shared.service import ServiceRuntime, discover_services
    from ccm_shared.settings import load_settings
    from ccm_shared.transport import InProcessTransport

    settings = load_settings(database_url="sqlite+aiosqlite:///unused/platform.db")
    services = []
    for d in discover_services().values():
        runtime = ServiceRuntime.build(d, settings, transport=InProcessTransport())
        services.append(
            Service(
                name=d.name,
                port=d.port,
                produces=tuple(d.produces),
                per_practice=bool(d.produces_per_practice),
                consumers=tuple((c.name, tuple(c.topics)) for c in runtime.consumers),
                settings=_settings_of(d.settings_model) if d.settings_model else (),
            )
        )
    return services


def contract_topics() -> list[str]:
    return sorted(
        p.name.removesuffix(".schema.json")
        for p in (ROOT / "contracts" / "events").glob("*.v1.schema.json")
    )


def env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return json.dumps(list(value))
    return str(value)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:  # plain YAML: no &anchors for shared dicts
        return True


def _yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


def _dump(docs: list[dict]) -> str:
    return HEADER + "".join("---\n" + _yaml(d) for d in docs)


# ------------------------------------------------------------------------------------------
# docker-compose.yml
# ------------------------------------------------------------------------------------------

# Values that differ from the code's defaults in Compose; ${VAR:-default} lets a user override
# them from the shell or an .env file next to docker-compose.yml.
KAFKA_DATA_DIR = "/var/lib/kafka/data"
COMPOSE_OVERRIDES = {
    "CCM_ENV": "${CCM_ENV:-development}",
    "CCM_DATABASE_URL": "postgresql+asyncpg://ccm:${POSTGRES_PASSWORD:-ccm}@postgres:5432/ccm",
    "CCM_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "CCM_SECRET_KEY": "${CCM_SECRET_KEY:-dev-secret-key}",
    "CCM_HTTP_HOST": "0.0.0.0",
    "CCM_LOG_LEVEL": "${CCM_LOG_LEVEL:-INFO}",
    "CCM_NOTIFICATION_SMTP_HOST": "mailpit",
    "CCM_NOTIFICATION_SMTP_PORT": "1025",
    "CCM_NOTIFICATION_SMTP_STARTTLS": "false",
    # 11 service processes and 4 migrations on PostgreSQL's default max_connections (100):
    # each process keeps up to twice this many connections open (deploy/README.md).
    "CCM_DB_POOL_SIZE": "${CCM_DB_POOL_SIZE:-3}",
}


def compose_env(svc: Service, shared: tuple[Setting, ...]) -> dict[str, str | None]:
    env: dict[str, str | None] = {}
    for s in (*shared, *svc.settings):
        if s.env in COMPOSE_OVERRIDES:
            env[s.env] = COMPOSE_OVERRIDES[s.env]
        elif s.env == "CCM_HTTP_PORT":
            env[s.env] = str(svc.port)
        elif s.default is None:
            env[s.env] = None  # passed through from the shell when set there, else unset
        else:
            env[s.env] = env_value(s.default)
    return env


def compose(services: list[Service]) -> dict:
    shared = shared_settings()
    doc: dict = {
        "name": "ccm-platform",
        "x-ccm-service": None,
        "services": {
            "kafka": {
                "image": "apache/kafka:4.1.1",
                "hostname": "kafka",
                "environment": {
                    "KAFKA_NODE_ID": "1",
                    "KAFKA_PROCESS_ROLES": "broker,controller",
                    "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093,EXTERNAL://:9094",
                    "KAFKA_ADVERTISED_LISTENERS": (
                        "PLAINTEXT://kafka:9092,EXTERNAL://localhost:${KAFKA_HOST_PORT:-9094}"
                    ),
                    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": (
                        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,EXTERNAL:PLAINTEXT"
                    ),
                    "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
                    "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
                    "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@kafka:9093",
                    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
                    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
                    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
                    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
                    "KAFKA_NUM_PARTITIONS": "3",
                    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
                    # The image's default is /tmp/kraft-combined-logs: outside the volume, so
                    # topics, offsets and the per-practice feeds were lost with the container.
                    "KAFKA_LOG_DIRS": KAFKA_DATA_DIR,
                },
                "ports": ["127.0.0.1:${KAFKA_HOST_PORT:-9094}:9094"],
                "volumes": [f"kafka-data:{KAFKA_DATA_DIR}"],
                "healthcheck": {
                    "test": [
                        "CMD-SHELL",
                        "/opt/kafka/bin/kafka-broker-api-versions.sh "
                        "--bootstrap-server kafka:9092 > /dev/null 2>&1",
                    ],
                    "interval": "10s",
                    "timeout": "10s",
                    "retries": 12,
                    "start_period": "20s",
                },
                "restart": "unless-stopped",
            },
            "kafka-topics": {
                "image": "apache/kafka:4.1.1",
                "depends_on": {"kafka": {"condition": "service_healthy"}},
                "volumes": ["./contracts/events:/contracts:ro"],
                "entrypoint": ["/bin/bash", "-ec"],
                # One topic per event contract (topic = event type) and its dead-letter topic;
                # $$ escapes Compose interpolation.
                "command": [
                    "for f in /contracts/*.v1.schema.json; do"
                    ' t=$$(basename "$$f" .schema.json);'
                    ' for name in "$$t" "$$t.dlq"; do'
                    " /opt/kafka/bin/kafka-topics.sh --bootstrap-server kafka:9092"
                    ' --create --if-not-exists --topic "$$name" --partitions 3'
                    " --replication-factor 1"
                    + "".join(f" --config {k}={v}" for k, v in TOPIC_CONFIG.items())
                    + " > /dev/null;"
                    " done; echo \"topic $$t\"; done"
                ],
                "restart": "no",
            },
            "postgres": {
                "image": "postgres:17.6-bookworm",
                "environment": {
                    "POSTGRES_USER": "ccm",
                    "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:-ccm}",
                    "POSTGRES_DB": "ccm",
                },
                "ports": ["127.0.0.1:${POSTGRES_HOST_PORT:-5432}:5432"],
                "volumes": ["postgres-data:/var/lib/postgresql/data"],
                "healthcheck": {
                    "test": ["CMD-SHELL", "pg_isready -U ccm -d ccm"],
                    "interval": "5s",
                    "timeout": "5s",
                    "retries": 12,
                },
                "restart": "unless-stopped",
            },
            "mailpit": {
                # Catches every e-mail notification sends; web UI on http://localhost:8025.
                "image": "axllent/mailpit:v1.27",
                "ports": ["127.0.0.1:${MAILPIT_HOST_PORT:-8025}:8025"],
                "restart": "unless-stopped",
            },
        },
        "volumes": {"kafka-data": {}, "postgres-data": {}},
    }
    del doc["x-ccm-service"]
    first = services[0].name if services else None
    for svc in services:
        image = f"ccm-platform/ccm-{svc.name}:${{CCM_IMAGE_TAG:-local}}"
        env = compose_env(svc, shared)
        base = {
            "image": image,
            # Every process of a service names the same build: BuildKit's cache builds it once.
            "build": {
                "context": ".",
                "dockerfile": "deploy/Dockerfile",
                "args": {"SERVICE": svc.name},
            },
            "environment": env,
            "read_only": True,
            "tmpfs": ["/tmp"],
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
        }
        migrate_deps = {"postgres": {"condition": "service_healthy"}}
        if svc.name != first:
            # `ccm migrate <svc>` also upgrades the shared platform schema: one at a time.
            migrate_deps[f"{first}-migrate"] = {"condition": "service_completed_successfully"}
        doc["services"][f"{svc.name}-migrate"] = {
            **base,
            "command": ["migrate", svc.name],
            "depends_on": migrate_deps,
            "restart": "no",
        }
        run_deps = {
            f"{svc.name}-migrate": {"condition": "service_completed_successfully"},
            "kafka-topics": {"condition": "service_completed_successfully"},
        }
        processes = {
            "api": (API_FLAGS, True),
            "relay": (RELAY_FLAGS, False),
        }
        if svc.consumers:
            processes["consumers"] = (CONSUMER_FLAGS, False)
        for process, (flags, published) in processes.items():
            entry = {
                **base,
                "command": ["serve", svc.name, *flags],
                "depends_on": run_deps,
                "restart": "unless-stopped",
                # Compose's default 10 s cuts short a consumer's batch or a request in flight.
                "stop_grace_period": "30s",
            }
            if published:
                entry["ports"] = [f"${{CCM_HOST_BIND:-127.0.0.1}}:{svc.port}:{svc.port}"]
            if svc.name == "notification":
                entry["depends_on"] = {**run_deps, "mailpit": {"condition": "service_started"}}
            doc["services"][f"{svc.name}-{process}"] = entry
    return doc


# ------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------


# Which process runs what. The schedulers (background jobs) run beside the relay only; they are
# safe on several replicas, but there is no reason to run them in every API and consumer pod.
API_FLAGS = ["--no-consumers", "--no-relay", "--no-background"]
CONSUMER_FLAGS = ["--no-api", "--no-relay", "--no-background"]
RELAY_FLAGS = ["--no-api", "--no-consumers"]


def labels(svc: str, component: str) -> dict:
    return {
        "app.kubernetes.io/name": svc,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "ccm-platform",
    }


def k8s_config(svc: Service, shared: tuple[Setting, ...]) -> tuple[dict, list[dict]]:
    """The service's ConfigMap and the env entries every one of its containers gets."""
    data: dict[str, str] = {}
    env: list[dict] = [
        {"name": "PGUSER", "valueFrom": {"secretKeyRef": {"name": f"ccm-db-{svc.name}",
                                                          "key": "username"}}},
        {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": f"ccm-db-{svc.name}",
                                                              "key": "password"}}},
    ]
    for s in (*shared, *svc.settings):
        if s.env == "CCM_DATABASE_URL":
            env.append({"name": s.env, "value": (
                f"postgresql+asyncpg://$(PGUSER):$(PGPASSWORD)@{PG_CLUSTER}-rw:5432/{DATABASE}"
            )})
        elif s.env in KAFKA_AUTH:
            value = KAFKA_AUTH[s.env]
            if isinstance(value, dict):  # the Strimzi-generated Secret of the service's KafkaUser
                env.append({"name": s.env, "valueFrom": {"secretKeyRef": {
                    "name": f"ccm-{svc.name}", "key": value["key"]}}})
            else:
                data[s.env] = value.format(svc=svc.name)
        elif s.env == "CCM_SECRET_KEY":
            env.append({"name": s.env, "valueFrom": {"secretKeyRef": {
                "name": "ccm-secret-key", "key": "secret-key"}}})
        elif s.secret:
            # Optional: unset (the code's default) unless the operator puts it in the Secret.
            env.append({"name": s.env, "valueFrom": {"secretKeyRef": {
                "name": f"ccm-{svc.name}-secrets", "key": s.env, "optional": True}}})
        elif s.env == "CCM_DB_POOL_SIZE":
            continue  # per process kind, in each container's env (pod_spec, DB_POOL_SIZE)
        elif s.env == "CCM_HTTP_PORT":
            # Pinned in the container: containerPort, probes, Service, NetworkPolicy ports and
            # the Prometheus annotation all use it, so <svc>-overrides must not move it.
            env.append({"name": s.env, "value": str(svc.port)})
        elif s.default is None and s.env not in K8S_VALUES:
            env.append({"name": s.env, "valueFrom": {"configMapKeyRef": {
                "name": f"{svc.name}-overrides", "key": s.env, "optional": True}}})
        else:
            data[s.env] = K8S_VALUES.get(s.env, env_value(s.default))
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{svc.name}-config", "labels": labels(svc.name, "config")},
        "data": data,
    }
    return configmap, env


K8S_VALUES = {
    "CCM_ENV": "production",
    "CCM_KAFKA_BOOTSTRAP_SERVERS": f"{KAFKA_CLUSTER}-kafka-bootstrap:9093",
    "CCM_HTTP_HOST": "0.0.0.0",
}
# Each service authenticates as its own KafkaUser (SCRAM-SHA-512 over TLS), so the ACLs of
# kafka_users() bind it: the user operator writes the password to the Secret `ccm-<svc>`, and
# the cluster CA certificate is mounted from `<cluster>-cluster-ca-cert`.
KAFKA_CA_DIR = "/etc/ccm/kafka-ca"
KAFKA_AUTH = {
    "CCM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "CCM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "CCM_KAFKA_SASL_USERNAME": "ccm-{svc}",
    "CCM_KAFKA_SASL_PASSWORD": {"key": "password"},
    "CCM_KAFKA_SSL_CAFILE": f"{KAFKA_CA_DIR}/ca.crt",
}

READINESS_TIMEOUT_SECONDS = 6

SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

# CCM_DB_POOL_SIZE per process kind. Each process keeps up to twice its pool size open
# (ccm_shared.db), so these, the replica ceilings (HPA, KEDA, replicas) plus one surge pod per
# Deployment, the roles' connectionLimit and the Cluster's max_connections are sized together:
# deploy/README.md ("Connection budget"), checked by tests/deploy/test_operations.py.
DB_POOL_SIZE = {"api": 3, "consumers": 2, "relay": 2, "migrate": 2}
# Per role (ccm_<svc>) and for the whole Cluster.
ROLE_CONNECTION_LIMIT = 100
MAX_CONNECTIONS = 400

RESOURCES = {
    "api": {"requests": {"cpu": "250m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"}},
    "consumers": {"requests": {"cpu": "200m", "memory": "256Mi"},
                  "limits": {"cpu": "1", "memory": "512Mi"}},
    "relay": {"requests": {"cpu": "100m", "memory": "192Mi"},
              "limits": {"cpu": "500m", "memory": "384Mi"}},
    "migrate": {"requests": {"cpu": "100m", "memory": "192Mi"},
                "limits": {"cpu": "500m", "memory": "384Mi"}},
}


def pod_spec(svc: Service, component: str, args: list[str], env: list[dict],
             *, init: bool = True, restart: str = "Always") -> dict:
    image = IMAGE_REPO.format(svc=svc.name)
    env_from = [{"configMapRef": {"name": f"{svc.name}-config"}}]
    env = [*env, {"name": "CCM_DB_POOL_SIZE", "value": str(DB_POOL_SIZE[component])}]
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "kafka-ca", "mountPath": KAFKA_CA_DIR, "readOnly": True},
    ]
    container = {
        "name": component,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "envFrom": env_from,
        "env": env,
        "resources": RESOURCES[component],
        "securityContext": SECURITY_CONTEXT,
        "volumeMounts": mounts,
    }
    if component != "migrate":
        container["ports"] = [{"name": "http", "containerPort": svc.port}]
        container["livenessProbe"] = {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3,
        }
        container["readinessProbe"] = {
            "httpGet": {"path": "/readyz", "port": "http"},
            # /readyz waits up to 4 s for the database and Kafka, asked at once
            # (ServiceRuntime.readiness, READINESS_PING_SECONDS): a probe that gives up
            # sooner reports a slow dependency as a failed probe without its answer.
            "periodSeconds": 10, "timeoutSeconds": READINESS_TIMEOUT_SECONDS,
            "failureThreshold": 3,
        }
        container["startupProbe"] = {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 2, "failureThreshold": 60,
        }
    if component == "api":
        # The preStop sleep keeps the listener open while the endpoint removal reaches
        # kube-proxy and the ingress controller (else requests routed meanwhile are refused);
        # the grace period below covers it plus the process's own shutdown (in-flight
        # requests, up to 30 s, then the Kafka producer's flush, up to 10 s). The image is
        # Debian slim: /bin/sleep exists.
        container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sleep", "5"]}}}
    spec: dict = {
        "serviceAccountName": "ccm-service",
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
            {"name": "kafka-ca", "secret": {"secretName": f"{KAFKA_CLUSTER}-cluster-ca-cert",
                                            "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        ],
        "restartPolicy": restart,
        # API: preStop 5 s + 30 s of requests + 10 s of Kafka flush + 5 s for the rest of the
        # runtime's shutdown (relay, consumers, the database pool)
        "terminationGracePeriodSeconds": 50 if component == "api" else 30,
    }
    if init:
        spec["initContainers"] = [{
            "name": "await-migrations",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["ccm-await-migrations", "--timeout", "900"],
            "envFrom": env_from,
            "env": env,
            "resources": RESOURCES["migrate"],
            "securityContext": SECURITY_CONTEXT,
            # It reads only CCM_DATABASE_URL, but gets every setting as the main container
            # does: every file a setting names is mounted (CCM_KAFKA_SSL_CAFILE).
            "volumeMounts": mounts,
        }]
    if component in ("api", "consumers"):
        spec["topologySpreadConstraints"] = [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": labels(svc.name, component)},
        }]
    return spec


def deployment(svc: Service, component: str, args: list[str], env: list[dict],
               replicas: int | None) -> dict:
    """``replicas`` None: an autoscaler owns the count (left out, so an apply does not fight
    it)."""
    lab = labels(svc.name, component)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{svc.name}-{component}", "labels": lab,
                     "annotations": wave("workloads")},
        "spec": {
            **({} if replicas is None else {"replicas": replicas}),
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": lab},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": lab, "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(svc.port),
                    "prometheus.io/path": "/metrics",
                }},
                "spec": pod_spec(svc, component, args, env),
            },
        },
    }


# Argo CD sync waves. A first install applies everything at once, and PreSync hooks would run
# before anything else exists (no PostgreSQL, no Kafka user): a deadlock. Instead Argo CD
# applies wave by wave, each once the previous one is healthy: the infrastructure (Kafka,
# its users and topics, the PostgreSQL Cluster, ConfigMaps; wave 0, the default), then the
# migration Jobs, then the workloads and their autoscalers. `kubectl apply` ignores these.
SYNC_WAVES = {"infrastructure": 0, "migrations": 1, "workloads": 2}


def wave(name: str) -> dict[str, str]:
    return {"argocd.argoproj.io/sync-wave": str(SYNC_WAVES[name])}


# The database role of the migration Job and the admin pod: the migrator's Secret.
MIGRATOR_SECRET = {name: {"name": "ccm-db-migrator"} for name in ("PGUSER", "PGPASSWORD")}


def secrets_changed(env: list[dict], changes: dict[str, dict]) -> list[dict]:
    """``env`` with the secretKeyRef of each variable named in ``changes`` updated by it."""
    changed = []
    for e in env:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if e["name"] in changes and ref is not None:
            e = {**e, "valueFrom": {"secretKeyRef": {**ref, **changes[e["name"]]}}}
        changed.append(e)
    return changed


def migration_job_spec(svc: Service, env: list[dict]) -> dict:
    """The migration Job's pod: the migrator's database role, and Kafka optional: `ccm migrate`
    uses only the database, so the Job can run before Strimzi has written the KafkaUser's
    Secret and the cluster CA."""
    job_env = secrets_changed(env, {**MIGRATOR_SECRET,
                                    **{name: {"optional": True} for name in KAFKA_AUTH}})
    spec = pod_spec(svc, "migrate", ["migrate", svc.name], job_env, init=False,
                    restart="OnFailure")
    for volume in spec["volumes"]:
        if "secret" in volume:
            volume["secret"] = {**volume["secret"], "optional": True}
    return spec


def service_manifests(svc: Service) -> list[dict]:
    configmap, env = k8s_config(svc, shared_settings())
    docs: list[dict] = [configmap]
    migrate_labels = labels(svc.name, "migrate")
    docs.append({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{svc.name}-migrate",
            "labels": migrate_labels,
            # Argo CD: a Sync hook (re-created on every sync, as a Job's template cannot be
            # changed in place) in the wave between the infrastructure and the Deployments
            # (SYNC_WAVES). With plain kubectl the Deployments' await-migrations init
            # container holds the new pods until it has finished.
            "annotations": {"argocd.argoproj.io/hook": "Sync",
                            "argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation",
                            **wave("migrations")},
        },
        "spec": {
            # ccm migrate also upgrades the shared platform schema; two Jobs racing on a first
            # install make one fail once, and its retry finds the schema current.
            "backoffLimit": 6,
            "ttlSecondsAfterFinished": 3600,
            # A migration waiting forever (e.g. on its advisory lock, held by a session a
            # transaction-mode pooler never released) fails the Job instead of hanging every
            # rollout behind it.
            "activeDeadlineSeconds": 1800,
            "template": {
                "metadata": {"labels": migrate_labels},
                "spec": migration_job_spec(svc, env),
            },
        },
    })
    # The APIs' HorizontalPodAutoscaler owns their replica count.
    docs.append(deployment(svc, "api", ["serve", svc.name, *API_FLAGS], env, replicas=None))
    # Consumers and relay run without the API: their HTTP server (not routed by any Service)
    # serves only /healthz, /readyz and /metrics for probes and scrapes.
    if svc.consumers:
        docs.append(deployment(svc, "consumers", ["serve", svc.name, *CONSUMER_FLAGS], env,
                               replicas=2))
    docs.append(deployment(svc, "relay", ["serve", svc.name, *RELAY_FLAGS], env, replicas=2))
    docs.append({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": svc.name, "labels": labels(svc.name, "api")},
        "spec": {
            "selector": labels(svc.name, "api"),
            "ports": [{"name": "http", "port": svc.port, "targetPort": "http"}],
        },
    })
    for component in ("api", "consumers", "relay"):
        if component == "consumers" and not svc.consumers:
            continue
        docs.append({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": f"{svc.name}-{component}",
                         "labels": labels(svc.name, component)},
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": labels(svc.name, component)}},
        })
    docs.append({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"{svc.name}-api", "labels": labels(svc.name, "api"),
                     "annotations": wave("workloads")},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": f"{svc.name}-api"},
            "minReplicas": 2,
            "maxReplicas": 10,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
        },
    })
    return docs


def scaled_objects(services: list[Service]) -> list[dict]:
    """KEDA ScaledObjects (prod overlay): consumers scale on their groups' lag, read on the
    brokers' TLS listener as KafkaUser ccm-keda (TriggerAuthentication kafka-keda,
    k8s/overlays/prod/keda-kafka.yaml: the cluster has no unauthenticated listener)."""
    docs = []
    for svc in services:
        if not svc.consumers:
            continue
        triggers = []
        for group, topics in svc.consumers:
            for topic in topics:
                triggers.append({
                    "type": "kafka",
                    "authenticationRef": {"name": "kafka-keda"},
                    "metadata": {
                        "bootstrapServers": f"{KAFKA_CLUSTER}-kafka-bootstrap.ccm.svc:9093",
                        "consumerGroup": group,
                        "topic": topic,
                        "lagThreshold": "100",
                        "activationLagThreshold": "1",
                        "offsetResetPolicy": "earliest",
                    },
                })
        docs.append({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": f"{svc.name}-consumers",
                         "labels": labels(svc.name, "consumers"),
                         "annotations": wave("workloads")},
            "spec": {
                "scaleTargetRef": {"name": f"{svc.name}-consumers"},
                # Never to zero: readiness reports a stalled consumer, and a group with no
                # member cannot report its own lag promptly.
                "minReplicaCount": 2,
                # More consumers than partitions (3 per topic) would sit idle.
                "maxReplicaCount": 3,
                "pollingInterval": 15,
                "cooldownPeriod": 300,
                "triggers": triggers,
            },
        })
    return docs


def kafka_topics(topics: list[str]) -> list[dict]:
    docs = []
    for topic in topics:
        for name in (topic, f"{topic}.dlq"):
            docs.append({
                "apiVersion": "kafka.strimzi.io/v1beta2",
                "kind": "KafkaTopic",
                "metadata": {
                    # Kubernetes names cannot hold the topic's dots in every position; the
                    # topic name itself is spec.topicName.
                    "name": name.replace(".", "-"),
                    "labels": {"strimzi.io/cluster": KAFKA_CLUSTER},
                },
                "spec": {
                    "topicName": name,
                    "partitions": 3,
                    "replicas": 3,
                    "config": {
                        "min.insync.replicas": "2",
                        "retention.ms": str(30 * 24 * 3600 * 1000 if name.endswith(".dlq")
                                            else 14 * 24 * 3600 * 1000),
                        "cleanup.policy": "delete",
                        **TOPIC_CONFIG,  # multi-megabyte events (a large practice's Invoice)
                    },
                },
            })
    return docs


def _acl(resource: dict, operations: list[str]) -> dict:
    return {"resource": resource, "operations": operations, "host": "*"}


def kafka_users(services: list[Service]) -> list[dict]:
    """One KafkaUser per service: write its own topics, read the topics its groups consume,
    write the dead-letter topics of those, use its own consumer groups. Reading the settings of
    those topics (DescribeConfigs) lets a service check their record limit at start; their
    KafkaTopics set it, so it never changes them (``ensure_topics``)."""
    docs = []
    for svc in services:
        acls = [
            _acl({"type": "topic", "name": t, "patternType": "literal"},
                 ["Write", "Describe", "DescribeConfigs"])
            for t in svc.produces
        ]
        consumed = sorted({t for _, topics in svc.consumers for t in topics})
        acls += [
            _acl({"type": "topic", "name": t, "patternType": "literal"},
                 ["Read", "Describe", "DescribeConfigs"])
            for t in consumed
        ]
        acls += [
            _acl({"type": "topic", "name": f"{t}.dlq", "patternType": "literal"},
                 ["Write", "Describe", "DescribeConfigs"])
            for t in consumed
        ]
        acls += [
            _acl({"type": "group", "name": group, "patternType": "literal"}, ["Read"])
            for group, _ in svc.consumers
        ]
        if svc.per_practice:
            # It creates each practice's topics and writes them; practices only read theirs
            # (k8s/examples/practice-subscriber.yaml). No KafkaTopic manages them, so it also
            # raises the record limit of those an earlier version created at 1 MB.
            practice_topics = {"type": "topic", "name": PRACTICE_TOPIC_PREFIX,
                               "patternType": "prefix"}
            acls.append(_acl(practice_topics, ["Create", "Write", "Describe",
                                               "DescribeConfigs", "AlterConfigs"]))
        # The idempotent producer needs IdempotentWrite on the cluster.
        acls.append(_acl({"type": "cluster"}, ["IdempotentWrite"]))
        docs.append(_kafka_user(f"ccm-{svc.name}", acls))
    return docs


def _kafka_user(name: str, acls: list[dict]) -> dict:
    return {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaUser",
        "metadata": {"name": name, "labels": {"strimzi.io/cluster": KAFKA_CLUSTER}},
        "spec": {
            "authentication": {"type": "scram-sha-512"},
            "authorization": {"type": "simple", "acls": acls},
        },
    }


def admin_kafka_user(topics: list[str]) -> dict:
    """The operators' Kafka identity (the ccm-admin pod): `ccm redrive` reads the dead-letter
    topics in consumer groups ``ccm-redrive:<consumer>:<practice>`` and writes each dead letter
    back to its source topic; `ccm events` reads the event topics without a group. Nothing
    else: no topic creation, no configuration changes, no service's group."""
    from ccm_shared.redrive import group_id

    redrive_groups = group_id(None, None).split(":", 1)[0] + ":"  # "ccm-redrive:"
    acls = [
        _acl({"type": "topic", "name": f"{t}.dlq", "patternType": "literal"},
             ["Read", "Describe"])
        for t in topics
    ]
    acls += [
        _acl({"type": "topic", "name": t, "patternType": "literal"},
             ["Read", "Write", "Describe"])
        for t in topics
    ]
    acls.append(_acl({"type": "group", "name": redrive_groups, "patternType": "prefix"},
                     ["Read", "Describe"]))
    acls.append(_acl({"type": "cluster"}, ["IdempotentWrite"]))
    return _kafka_user(ADMIN_KAFKA_USER, acls)


def postgres(services: list[Service]) -> list[dict]:
    """CloudNativePG: 3 instances, one database with a schema and a role per service.

    One database, not one per service: every service reads the shared practice registry
    (schema ``platform``). Isolation comes from roles: ``ccm_migrator`` owns every schema and
    runs the migrations; each service's role may only read and write the tables of its own
    schema and read ``platform``.
    """
    roles = [f"ccm_{s.name}" for s in services]
    sql = [f"CREATE ROLE {r} NOLOGIN" for r in roles]
    sql += ["CREATE SCHEMA IF NOT EXISTS platform AUTHORIZATION ccm_migrator"]
    if roles:
        sql += [
            f"GRANT USAGE ON SCHEMA platform TO {', '.join(roles)}",
            "ALTER DEFAULT PRIVILEGES FOR ROLE ccm_migrator IN SCHEMA platform "
            f"GRANT SELECT ON TABLES TO {', '.join(roles)}",
        ]
    for s, r in zip(services, roles, strict=True):
        sql += [
            f"CREATE SCHEMA IF NOT EXISTS {s.name} AUTHORIZATION ccm_migrator",
            f"GRANT USAGE ON SCHEMA {s.name} TO {r}",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE ccm_migrator IN SCHEMA {s.name} "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE ccm_migrator IN SCHEMA {s.name} "
            f"GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {r}",
        ]
    cluster = {
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": {"name": PG_CLUSTER},
        "spec": {
            "instances": 3,
            "imageName": "ghcr.io/cloudnative-pg/postgresql:17.6",
            "primaryUpdateStrategy": "unsupervised",
            "storage": {"size": "50Gi"},
            "walStorage": {"size": "10Gi"},
            # The connection budget (DB_POOL_SIZE): deploy/README.md.
            "postgresql": {"parameters": {"max_connections": str(MAX_CONNECTIONS)}},
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                          "limits": {"cpu": "2", "memory": "2Gi"}},
            "bootstrap": {"initdb": {
                "database": DATABASE,
                "owner": "ccm_migrator",
                "secret": {"name": "ccm-db-migrator"},
                "postInitApplicationSQL": sql,
            }},
            # Login and password of each service role, from Secrets the operator creates
            # (deploy/README.md); CloudNativePG keeps the roles in step with them.
            "managed": {"roles": [
                {"name": r, "ensure": "present", "login": True, "inherit": True,
                 "connectionLimit": ROLE_CONNECTION_LIMIT,
                 "passwordSecret": {"name": f"ccm-db-{s.name}"}}
                for s, r in zip(services, roles, strict=True)
            ]},
            # Example: continuous WAL archiving and base backups to S3-compatible storage.
            "backup": {
                "retentionPolicy": "30d",
                "barmanObjectStore": {
                    "destinationPath": "s3://ccm-backups/postgres",
                    "s3Credentials": {
                        "accessKeyId": {"name": "ccm-backup-s3", "key": "ACCESS_KEY_ID"},
                        "secretAccessKey": {"name": "ccm-backup-s3",
                                            "key": "ACCESS_SECRET_KEY"},
                    },
                    "wal": {"compression": "gzip"},
                    "data": {"compression": "gzip"},
                },
            },
            "monitoring": {"enablePodMonitor": False},
        },
    }
    scheduled = {
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "ScheduledBackup",
        "metadata": {"name": f"{PG_CLUSTER}-daily"},
        "spec": {
            "schedule": "0 0 3 * * *",
            "backupOwnerReference": "self",
            "cluster": {"name": PG_CLUSTER},
        },
    }
    return [cluster, scheduled]


ADMIN_KAFKA_USER = "ccm-admin"


def admin(services: list[Service]) -> list[dict]:
    """A pod to run `ccm practice create` / `ccm token create` with the migrator's role, and
    `ccm redrive` / `ccm events` as KafkaUser ccm-admin (admin_kafka_user); scaled to 0 until
    needed (deploy/README.md)."""
    svc = services[0]
    _, env = k8s_config(svc, shared_settings())
    # the Kafka password from the Secret Strimzi writes for ccm-admin
    admin_env = secrets_changed(env, {**MIGRATOR_SECRET,
                                      "CCM_KAFKA_SASL_PASSWORD": {"name": ADMIN_KAFKA_USER}})
    # Overrides the service's user name of the ConfigMap (env wins over envFrom).
    env = [*admin_env, {"name": "CCM_KAFKA_SASL_USERNAME", "value": ADMIN_KAFKA_USER}]
    spec = pod_spec(svc, "migrate", [], env, init=False)
    container = spec["containers"][0]
    container["name"] = "admin"
    del container["args"]
    container["command"] = ["sleep", "infinity"]
    lab = labels("ccm-admin", "admin")
    return [{
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "ccm-admin", "labels": lab, "annotations": wave("workloads")},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": lab},
            "template": {"metadata": {"labels": lab}, "spec": spec},
        },
    }]


def rendered() -> dict[Path, str]:
    services = discover()
    files: dict[Path, str] = {}
    compose_doc = compose(services)
    files[ROOT / "docker-compose.yml"] = HEADER + (
        "# Usage: docker compose up --build   (see deploy/README.md)\n"
        + _yaml(compose_doc)
    )
    names = []
    for svc in services:
        path = ROOT / "k8s" / "base" / "services" / f"{svc.name}.yaml"
        files[path] = _dump(service_manifests(svc))
        names.append(path.name)
    files[ROOT / "k8s" / "base" / "services" / "admin.yaml"] = _dump(admin(services))
    names.append("admin.yaml")
    files[ROOT / "k8s" / "base" / "postgres" / "cluster.yaml"] = _dump(postgres(services))
    files[ROOT / "k8s" / "base" / "services" / "kustomization.yaml"] = HEADER + _yaml(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
         "resources": names})
    topics = sorted({*contract_topics(), *(t for s in services for t in s.produces)})
    files[ROOT / "k8s" / "base" / "kafka" / "topics.yaml"] = _dump(kafka_topics(topics))
    files[ROOT / "k8s" / "base" / "kafka" / "users.yaml"] = _dump(
        [*kafka_users(services), admin_kafka_user(topics)])
    files[ROOT / "k8s" / "overlays" / "prod" / "scaledobjects.yaml"] = _dump(
        scaled_objects(services))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args()
    stale = []
    for path, text in rendered().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("out of date (run: uv run python deploy/tools/render.py):", file=sys.stderr)
        for p in stale:
            print(f"  {p}", file=sys.stderr)
        return 1
    for p in stale:
        print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
