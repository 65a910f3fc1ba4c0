import subprocess
import sys

import pytest

from ccm_shared.settings import ConfigurationError, Environment, load_settings

pytestmark = pytest.mark.usefixtures("clean_ccm_env")


PG = "postgresql+asyncpg://ccm:pw@db:5432/ccm"
GOOD_KEY = "k" * 40


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ("production", {"kafka_bootstrap_servers": "k:9092", "secret_key": GOOD_KEY},
         "CCM_DATABASE_URL is not set"),
        ("production", {"database_url": PG, "secret_key": GOOD_KEY},
         "CCM_KAFKA_BOOTSTRAP_SERVERS is not set"),
        ("production", {"database_url": PG, "kafka_bootstrap_servers": "k:9092"},
         "CCM_SECRET_KEY is missing or a placeholder"),
        ("production", {"database_url": PG, "kafka_bootstrap_servers": "k:9092",
                        "secret_key": "changethis"}, "placeholder"),
        ("production", {"database_url": PG, "kafka_bootstrap_servers": "k:9092",
                        "secret_key": "short-but-not-placeholder"}, "shorter than 32"),
        ("production", {"database_url": "sqlite+aiosqlite:///x.db",
                        "kafka_bootstrap_servers": "k:9092", "secret_key": GOOD_KEY},
         "production needs PostgreSQL"),
        ("test", {"kafka_bootstrap_servers": "k:9092"}, "CCM_DATABASE_URL is not set"),
    ],
)
def test_unsafe_or_missing_settings_are_refused(monkeypatch, env, overrides, message):
    monkeypatch.setenv("CCM_ENV", env)
    with pytest.raises(ConfigurationError, match=message):
        load_settings(**overrides)


def test_complete_production_settings_are_accepted(monkeypatch):
    monkeypatch.setenv("CCM_ENV", "production")
    s = load_settings(database_url=PG, kafka_bootstrap_servers="k:9092", secret_key=GOOD_KEY)
    assert s.env is Environment.PRODUCTION and s.is_postgres


def test_development_needs_nothing(monkeypatch):
    for name in ("CCM_ENV", "CCM_DATABASE_URL", "CCM_KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    assert load_settings().env is Environment.DEVELOPMENT


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("CCM_MAX_BODY_BYTES", "-5")
    with pytest.raises(ConfigurationError, match="CCM_MAX_BODY_BYTES"):
        load_settings()


def test_service_refuses_to_start_with_unsafe_configuration():
    env = {"CCM_ENV": "production", "CCM_DATABASE_URL": PG, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "ccm_shared.cli", "serve", "ingest"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "configuration refused" in proc.stderr
    assert "CCM_KAFKA_BOOTSTRAP_SERVERS is not set" in proc.stderr
    assert "CCM_SECRET_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sasl_without_credentials_is_refused(monkeypatch):
    monkeypatch.setenv("CCM_ENV", "test")
    with pytest.raises(ConfigurationError, match="CCM_KAFKA_SASL_MECHANISM"):
        load_settings(database_url=PG, kafka_bootstrap_servers="k:9093",
                      kafka_security_protocol="SASL_SSL")


def test_unknown_kafka_protocol_is_refused():
    with pytest.raises(ConfigurationError, match="CCM_KAFKA_SECURITY_PROTOCOL"):
        load_settings(kafka_security_protocol="TLS")


def test_sasl_ssl_options_reach_every_kafka_client():
    from ccm_shared.transport import KafkaTransport

    t = KafkaTransport("k:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                       sasl_username="billing", sasl_password="pw")
    options = t.producer_options()
    assert options["sasl_mechanism"] == "SCRAM-SHA-512" and options["sasl_plain_username"] == "billing"
    assert options["ssl_context"] is not None and options["enable_idempotence"] is True


@pytest.mark.parametrize(("setting", "sent"), [(None, "lz4"), ("zstd", "zstd"), ("none", None)])
def test_kafka_compression_and_record_size_reach_the_producer(monkeypatch, setting, sent):
    from ccm_shared.service import build_transport
    from ccm_shared.transport import MAX_MESSAGE_BYTES, TOPIC_CONFIG

    if setting:
        monkeypatch.setenv("CCM_KAFKA_COMPRESSION", setting)
    options = build_transport(load_settings(kafka_bootstrap_servers="k:9092")).producer_options()
    assert options["compression_type"] == sent
    assert options["max_request_size"] == MAX_MESSAGE_BYTES == int(TOPIC_CONFIG["max.message.bytes"])


def test_unknown_kafka_compression_is_refused(monkeypatch):
    monkeypatch.setenv("CCM_KAFKA_COMPRESSION", "brotli")
    with pytest.raises(ConfigurationError, match="CCM_KAFKA_COMPRESSION"):
        load_settings()
