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


# Invalid values are refused with the variable's name, not accepted and failing later (a
# ValueError from logging, an SQLAlchemy or aiokafka traceback, a random port).
@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CCM_LOG_LEVEL", "LOUD", "'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
        ("CCM_DATABASE_URL", "not-a-url", "not a database URL"),
        ("CCM_DATABASE_URL", "mysql://u:p@h/db", "unsupported database 'mysql'"),
        ("CCM_DATABASE_URL", "postgresql://u:p@h/db", "unsupported database 'postgresql'"),
        ("CCM_DATABASE_URL", "sqlite+aiosqlite://", "SQLite needs a file path"),
        ("CCM_KAFKA_SASL_MECHANISM", "FOO", "'PLAIN', 'SCRAM-SHA-256' or 'SCRAM-SHA-512'"),
        ("CCM_HTTP_PORT", "99999", "less than or equal to 65535"),
        ("CCM_HTTP_PORT", "0", "greater than or equal to 1"),
        ("CCM_HTTP_PORT", "http", "valid integer"),
        ("CCM_KAFKA_SSL_CAFILE", "/nonexistent/ca.crt", "no such file: /nonexistent/ca.crt"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert str(refused.value).startswith(f"{variable}: ") and message in str(refused.value)
    assert "\n" not in str(refused.value)  # one line for one value


def test_valid_values_are_accepted_and_normalised(monkeypatch, tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("CCM_LOG_LEVEL", "warning")
    monkeypatch.setenv("CCM_KAFKA_SASL_MECHANISM", "scram-sha-512")
    monkeypatch.setenv("CCM_KAFKA_SSL_CAFILE", str(ca))
    monkeypatch.setenv("CCM_HTTP_PORT", "65535")
    s = load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/platform.db")
    assert (s.log_level, s.kafka_sasl_mechanism, s.http_port) == (
        "WARNING", "SCRAM-SHA-512", 65535)
    assert load_settings(database_url=PG + "?prepared_statement_cache_size=0").is_postgres
    monkeypatch.setenv("CCM_DATABASE_URL", "")
    monkeypatch.setenv("CCM_KAFKA_SASL_MECHANISM", "")
    assert load_settings().database_url is None and load_settings().kafka_sasl_mechanism is None


@pytest.mark.parametrize(
    ("value", "days"), [("7,3", (7, 3)), ("[7, 3]", (7, 3)), ("3, 7, 7", (7, 3))]
)
def test_billing_alert_days_take_a_comma_separated_or_json_list(monkeypatch, value, days):
    from ccm_billing.settings import BillingSettings
    from ccm_shared.settings import load_service_settings

    monkeypatch.setenv("CCM_BILLING_ALERT_DAYS", value)
    assert load_service_settings(BillingSettings).alert_days == days


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CCM_BILLING_ALERT_DAYS", "7,x", "valid integer"),
        ("CCM_BILLING_ALERT_DAYS", "[7,", "not a JSON list of days"),
        ("CCM_BILLING_ALERT_DAYS", "-1", "alert days must be >= 0"),
        ("CCM_NOTIFICATION_SMTP_PORT", "-5", "greater than 0"),
        ("CCM_CAREPLAN_SCHEDULER_BATCH_SIZE", "0", "greater than 0"),
        ("CCM_INGEST_MAX_CLOCK_SKEW_SECONDS", "1e9", "less than or equal to 86400"),
    ],
)
def test_service_settings_are_refused_like_the_platforms(monkeypatch, variable, value, message):
    from ccm_shared.service import discover_services
    from ccm_shared.settings import load_service_settings

    monkeypatch.setenv(variable, value)
    service = variable.split("_")[1].lower()
    with pytest.raises(ConfigurationError) as refused:
        load_service_settings(discover_services()[service].settings_model)
    assert str(refused.value).startswith(f"{variable}: ") and message in str(refused.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+asyncpg://ccm:pw@db:5432/ccm", "postgresql+asyncpg://ccm:***@db:5432/ccm"),
        ("postgresql+asyncpg://ccm@db/ccm?password=pw&prepared_statement_cache_size=0",
         "postgresql+asyncpg://ccm@db/ccm?password=***&prepared_statement_cache_size=0"),
        ("postgresql+asyncpg://u:p@ss/w@db/ccm?sslpassword=pw",
         "postgresql+asyncpg://u:***@db/ccm?sslpassword=***"),
        ("postgresql+asyncpg://ccm:s3cr?t-Pw@db:5432/ccm", "postgresql+asyncpg://ccm:***@db:5432/ccm"),
        ("postgresql+asyncpg://ccm:a/b@db/ccm", "postgresql+asyncpg://ccm:***@db/ccm"),
        ("postgresql+asyncpg://db/ccm?x=a@b", "postgresql+asyncpg://db/ccm?x=a@b"),
        ("sqlite+aiosqlite:///x/platform.db", "sqlite+aiosqlite:///x/platform.db"),
        ("https://example.org/ack?token=abc&x=1", "https://example.org/ack?token=***&x=1"),
    ],
)
def test_urls_lose_their_passwords(url, shown):
    from ccm_shared.settings import mask_url

    assert mask_url(url) == shown


def test_one_masking_rule_for_platform_and_service_settings():
    from ccm_shared.settings import masked

    assert masked("secret_key", "k" * 40) == masked("kafka_sasl_password", "pw") == "***"
    assert masked("smtp_password", "pw") == masked("api_token", "t") == "***"
    assert masked("smtp_password", None) is None and masked("smtp_port", 587) == 587
    url = "postgresql+asyncpg://u:pw@h/d"
    assert masked("database_url", url) == "postgresql+asyncpg://u:***@h/d"
