"""`ccm migrate` uses only the database: its Kubernetes Job runs before Strimzi has written
the Kafka users' Secrets and the cluster CA, so the Kafka settings (servers, SASL credentials,
the CA file) are not checked for it, while every other command still checks them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ccm_shared import cli
from ccm_shared.settings import ConfigurationError, load_settings

pytestmark = pytest.mark.usefixtures("clean_ccm_env")

# What a migration Job's container has before Strimzi has created the Kafka user and CA.
KAFKA_NOT_YET = {
    "CCM_ENV": "test",  # checked as in production, but SQLite is allowed
    "CCM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "CCM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "CCM_KAFKA_SASL_USERNAME": "ccm-ingest",
    "CCM_KAFKA_SSL_CAFILE": "/etc/ccm/kafka-ca/ca.crt",  # not mounted yet
}


@pytest.fixture
def kafka_not_yet(monkeypatch, tmp_path):
    for name, value in KAFKA_NOT_YET.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CCM_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/platform.db")


def test_migrate_runs_without_the_kafka_settings_the_services_need(kafka_not_yet):
    result = CliRunner().invoke(cli.app, ["migrate", "ingest"])
    assert result.exit_code == 0, result.output
    assert "migrations are up to date" in result.stderr


@pytest.mark.parametrize("command", [["config"], ["serve", "ingest"]])
def test_other_commands_still_refuse_them(kafka_not_yet, command):
    result = CliRunner().invoke(cli.app, command)
    assert result.exit_code == 2, result.output
    assert "CCM_KAFKA_SSL_CAFILE: no such file" in result.stderr


@pytest.mark.parametrize(("overrides", "refused_without_kafka"), [
    ({"kafka_ssl_cafile": "/nonexistent"}, None),
    ({"kafka_bootstrap_servers": None}, None),
    ({"kafka_security_protocol": "SASL_SSL"}, None),
    # Not Kafka's: still refused for a database-only command.
    ({"database_url": None}, "CCM_DATABASE_URL"),
    ({"kafka_sasl_mechanism": "FOO"}, "CCM_KAFKA_SASL_MECHANISM"),  # not a value at all
    ({"env": "production", "secret_key": "short"}, "CCM_SECRET_KEY"),
])
def test_only_the_kafka_checks_are_left_out(overrides, refused_without_kafka, tmp_path):
    given = {"env": "test", "database_url": f"sqlite+aiosqlite:///{tmp_path}/p.db",
             "kafka_bootstrap_servers": "kafka:9093", **overrides}
    if given["env"] == "production":
        given["database_url"] = "postgresql+asyncpg://u:p@db/ccm"
    with pytest.raises(ConfigurationError):  # every one is refused for the services
        load_settings(**given)
    if refused_without_kafka is None:
        settings = load_settings(kafka=False, **given)
        assert settings.database_url == given["database_url"]
    else:
        with pytest.raises(ConfigurationError, match=refused_without_kafka):
            load_settings(kafka=False, **given)
