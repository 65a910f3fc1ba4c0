"""The init container's check reads CCM_DATABASE_URL and nothing else: a setting it does not
use (a Kafka CA file its container has not mounted, SASL without a password) cannot stop it.
It once validated every setting and exited on `CCM_KAFKA_SSL_CAFILE: no such file`, so no pod
of any Deployment ever started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ccm_shared.migrate import upgrade
from ccm_shared.service import discover_services

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "ccm-await-migrations"


def _run(database_url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCM_")}
    env |= {
        "CCM_ENV": "production",
        "CCM_DATABASE_URL": database_url,
        "CCM_KAFKA_BOOTSTRAP_SERVERS": "ccm-kafka-kafka-bootstrap:9093",
        "CCM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CCM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "CCM_KAFKA_SASL_USERNAME": "ccm-ingest",
        "CCM_KAFKA_SSL_CAFILE": "/etc/ccm/kafka-ca/ca.crt",  # not mounted
    }
    return subprocess.run([sys.executable, str(SCRIPT), "--timeout", "0", "--interval", "0"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_it_checks_the_schemas_whatever_the_other_settings_say(infra):
    for definition in discover_services().values():  # the platform: the infra fixture's
        upgrade(infra.database_url, definition.schema, definition.migrations_package)
    proc = _run(infra.database_url)
    assert "Traceback" not in proc.stderr and "ConfigurationError" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert "schemas are at the image's migration heads" in proc.stderr
