"""Tables the platform library owns: the tenant registry, and each service's outbox and inbox.

Messaging tables are declared without a schema and added to each service's own MetaData, so the
``schema_translate_map`` of that service's engine puts them in the service's schema.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)

# BIGSERIAL on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

platform_metadata = MetaData(schema="platform")

practices = Table(
    "practices",
    platform_metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("pricing", Text, nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_tokens = Table(
    "api_tokens",
    platform_metadata,
    Column("id", String(36), primary_key=True),
    Column("practice_id", String(64), nullable=False, index=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("scopes", Text, nullable=False, server_default=""),
    Column("label", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)


def add_messaging_tables(metadata: MetaData) -> tuple[Table, Table, Table]:
    """Add ``outbox``, ``inbox`` and ``event_sequences`` to a service's MetaData."""
    outbox = Table(
        "outbox",
        metadata,
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("tenant", String(64), nullable=False),
        Column("topic", String(249), nullable=False),
        Column("key", String(200), nullable=True),
        Column("event_type", String(200), nullable=False),
        Column("payload", Text, nullable=False),
        Column("correlation_id", String(64), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("sent_at", DateTime(timezone=True), nullable=True),
        Index(
            "ix_outbox_unsent",
            "id",
            postgresql_where=text("sent_at IS NULL"),
            sqlite_where=text("sent_at IS NULL"),
        ),
    )
    inbox = Table(
        "inbox",
        metadata,
        Column("consumer", String(200), nullable=False),
        Column("event_id", String(200), nullable=False),
        Column("tenant", String(64), nullable=True),
        Column("topic", String(249), nullable=False),
        Column("partition", Integer, nullable=False),
        Column("offset", BigInteger, nullable=False),
        Column("outcome", String(20), nullable=False),
        Column("processed_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("consumer", "event_id"),
        # Retention deletes by age: without it each pass read the whole inbox.
        Index("ix_inbox_processed", "processed_at"),
    )
    sequences = Table(
        "event_sequences",
        metadata,
        Column("tenant", String(64), nullable=False),
        Column("subject", String(200), nullable=False),
        Column("last", BigInteger, nullable=False),
        PrimaryKeyConstraint("tenant", "subject"),
    )
    return outbox, inbox, sequences


def messaging_tables(metadata: MetaData) -> tuple[Table, Table, Table]:
    return metadata.tables["outbox"], metadata.tables["inbox"], metadata.tables["event_sequences"]


# One MetaData holding the messaging tables alone, for the library's own queries: every service's
# copies have the same columns, and the engine's schema_translate_map picks the schema.
messaging_metadata = MetaData()
outbox_table, inbox_table, sequences_table = add_messaging_tables(messaging_metadata)
