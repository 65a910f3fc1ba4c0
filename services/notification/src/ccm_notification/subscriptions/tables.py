"""Tables of practice subscriptions (migration ``notification_0003``)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
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
    UniqueConstraint,
)

from ccm_shared.tables import BigId, inbox_table


def add_subscription_tables_v1(metadata: MetaData) -> dict[str, Table]:
    """Subscriptions, their numbered events and the delivery log (version 1)."""
    subscriptions = Table(
        "subscriptions",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("practice", String(64), nullable=False, index=True),
        Column("description", String(200), nullable=True),
        Column("event_types", JSON, nullable=False),
        Column("endpoint", String(500), nullable=False),
        Column("payload", String(20), nullable=False),  # id-only | full-resource
        Column("secret_salt", String(64), nullable=False),  # the secret itself is derived
        Column("status", String(20), nullable=False),  # active | paused
        Column("last_event_number", Integer, nullable=False),
        Column("delivered_through", Integer, nullable=False),
        Column("consecutive_failures", Integer, nullable=False),
        Column("next_attempt_at", DateTime(timezone=True), nullable=True),
        Column("lease_token", String(36), nullable=True),
        Column("leased_until", DateTime(timezone=True), nullable=True),
        Column("paused_at", DateTime(timezone=True), nullable=True),
        Column("paused_reason", Text, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    subscription_events = Table(
        "subscription_events",
        metadata,
        Column("subscription_id", String(36), nullable=False),
        Column("number", Integer, nullable=False),
        Column("practice", String(64), nullable=False),
        Column("event_id", String(inbox_table.c.event_id.type.length), nullable=False),
        Column("event_type", String(100), nullable=False),
        Column("body", JSON, nullable=False),  # the notification exactly as delivered
        Column("status", String(20), nullable=False),  # pending | delivered
        Column("attempts", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("delivered_at", DateTime(timezone=True), nullable=True),
        PrimaryKeyConstraint("subscription_id", "number"),
        UniqueConstraint("subscription_id", "event_id", name="uq_subscription_events_event"),
        Index("ix_subscription_events_pending", "subscription_id", "status", "number"),
    )
    subscription_deliveries = Table(
        "subscription_deliveries",
        metadata,
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("subscription_id", String(36), nullable=False),
        Column("practice", String(64), nullable=False),
        Column("number", Integer, nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("outcome", String(20), nullable=False),  # delivered | duplicate | retry | paused
        Column("response", Text, nullable=True),
        Column("latency_ms", Integer, nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
        Index("ix_subscription_deliveries_sub", "subscription_id", "id"),
    )
    return {t.name: t for t in (subscriptions, subscription_events, subscription_deliveries)}


def add_subscription_secrets_table(metadata: MetaData) -> dict[str, Table]:
    """The signing secrets of subscriptions whose secret was rotated (migration
    ``notification_0009``), one row per secret: the current one (``valid_until`` null, the
    highest ``generation``) and earlier ones, which sign until ``valid_until`` (a row past it
    signs nothing and is removed by the next rotation).
    A subscription without rows was never rotated: its secret is derived from
    ``CCM_SECRET_KEY`` and ``subscriptions.secret_salt``. Stored as shown (no encryption helper
    in the platform): whoever reads this table can sign as the platform towards these
    receivers (README, "Rotating a subscription's secret")."""
    subscription_secrets = Table(
        "subscription_secrets",
        metadata,
        Column("subscription_id", String(36), nullable=False),
        Column("generation", Integer, nullable=False),  # 0: the derived one, before rotation
        Column("practice", String(64), nullable=False),
        Column("secret", String(70), nullable=False),  # "whsec_" + 64 hex digits
        Column("valid_until", DateTime(timezone=True), nullable=True),  # null: the current one
        Column("created_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("subscription_id", "generation"),
    )
    return {"subscription_secrets": subscription_secrets}


# Indexes of migration ``notification_0008`` (name, table, columns): what the subscriptions'
# retention (``subscriptions.retention``) deletes by, so a pass reads what it deletes, not the
# tables: old notifications by when they were delivered (pending ones have no
# ``delivered_at``: never in the range read), and the attempts at each of them.
SUBSCRIPTION_RETENTION_INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("ix_subscription_events_delivered_at", "subscription_events", ("delivered_at",)),
    ("ix_subscription_deliveries_number", "subscription_deliveries",
     ("subscription_id", "number")),
)


def add_feed_held_table(metadata: MetaData) -> dict[str, Table]:
    """The practice feed's reorder buffer: billing events held until those billing numbered
    before them have been fanned out. Each practice's last billing number fanned out is its
    ``event_sequences`` counter ``FEED_POSITION`` (notification_0007; ``feed_positions``
    before)."""
    feed_held = Table(
        "feed_held",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("producer_sequence", BigInteger, nullable=False),  # billing's practiceSequence
        Column("event_id", String(inbox_table.c.event_id.type.length), nullable=False),
        Column("event", Text, nullable=False),  # the CloudEvent as consumed (JSON)
        Column("held_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "producer_sequence", "event_id"),
        UniqueConstraint("event_id", name="uq_feed_held_event"),
        Index("ix_feed_held_age", "held_at"),
    )
    return {"feed_held": feed_held}


def add_feed_positions_table_v1(metadata: MetaData) -> dict[str, Table]:
    """``feed_positions`` as notification_0006 created it (notification_0007 moved its rows to
    ``event_sequences`` and dropped it; its downgrade creates it again)."""
    feed_positions = Table(
        "feed_positions",
        metadata,
        Column("practice", String(64), primary_key=True),
        # the highest billing number fanned out (0: none yet)
        Column("producer_sequence", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    return {"feed_positions": feed_positions}


def add_feed_order_tables(metadata: MetaData) -> dict[str, Table]:
    """What migration ``notification_0006`` creates: ``feed_held`` and ``feed_positions``."""
    return {**add_feed_held_table(metadata), **add_feed_positions_table_v1(metadata)}
