"""Tables of the notification schema. Rows are declared without a schema; the engine places them.

``add_notification_tables_v1`` is what migration ``notification_0002`` creates; a later change to
these tables needs a migration of its own that alters them (the same rule as the messaging tables).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
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

from ccm_notification.subscriptions.tables import (
    SUBSCRIPTION_RETENTION_INDEXES,
    add_feed_held_table,
    add_subscription_secrets_table,
    add_subscription_tables_v1,
)
from ccm_shared.tables import BigId, add_messaging_tables

# A reference an event carries: "PractitionerRole/" and a 64-character id is 81 characters.
REFERENCE = 140


def add_notification_tables_v1(metadata: MetaData) -> dict[str, Table]:
    """The service's own tables (version 1), added to ``metadata``."""
    providers = Table(
        "providers",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("id", String(64), nullable=False),
        Column("version", Integer, nullable=False),
        # current values (what messages use), the EHR's latest values, and the manually pinned
        # field names: a pinned field keeps its manual value until released.
        Column("current", JSON, nullable=False),
        Column("source", JSON, nullable=False),
        Column("pinned", JSON, nullable=False),
        Column("source_version", String(64), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "id"),
    )
    provider_history = Table(
        "provider_history",
        metadata,
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("practice", String(64), nullable=False),
        Column("provider_id", String(64), nullable=False),
        Column("version", Integer, nullable=False),
        Column("origin", String(20), nullable=False),  # fhir | manual | release
        Column("actor", String(200), nullable=True),
        Column("changes", JSON, nullable=False),  # {field: [before, after]}
        Column("held", JSON, nullable=False),  # {field: ehr value not applied (pinned)}
        Column("at", DateTime(timezone=True), nullable=False),
        Index("ix_provider_history_provider", "practice", "provider_id"),
    )
    provider_roles = Table(
        "provider_roles",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("id", String(64), nullable=False),
        Column("practitioner", String(64), nullable=True),
        Column("organization", String(64), nullable=True),
        Column("email", Text, nullable=True),  # a ContactPoint's value (notification_0005)
        Column("active", Boolean, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "id"),
    )
    organizations = Table(
        "organizations",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("id", String(64), nullable=False),
        # An Organization's name and a ContactPoint's value are FHIR strings of any length
        # (notification_0005).
        Column("name", Text, nullable=True),
        Column("email", Text, nullable=True),
        Column("active", Boolean, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "id"),
    )
    practice_contacts = Table(
        "practice_contacts",
        metadata,
        Column("practice", String(64), primary_key=True),
        Column("supervisor", String(64), nullable=True),
        Column("on_call", String(64), nullable=True),
        Column("summary_recipients", JSON, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    template_overrides = Table(
        "template_overrides",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("kind", String(64), nullable=False),
        Column("source", Text, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "kind"),
    )
    ack_policies = Table(
        "ack_policies",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("kind", String(64), nullable=False),
        Column("requires_ack", Boolean, nullable=False),
        Column("sla_minutes", Integer, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "kind"),
    )
    messages = Table(
        "messages",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("practice", String(64), nullable=False),
        Column("idempotency_key", String(400), nullable=False),
        Column("kind", String(64), nullable=False),
        Column("provider_id", String(64), nullable=True),
        Column("patient", String(REFERENCE), nullable=True),
        Column("channel", String(20), nullable=True),
        # An email address from the EHR is a ContactPoint's value (notification_0005).
        Column("recipient", Text, nullable=True),
        Column("subject", Text, nullable=False),
        Column("text_body", Text, nullable=False),
        Column("html_body", Text, nullable=False),
        Column("fields", JSON, nullable=False),
        Column("attachments", JSON, nullable=False),  # [{filename, content_type, content}]
        Column("status", String(20), nullable=False),  # pending|sending|sent|failed
        Column("attempts", Integer, nullable=False),
        Column("next_attempt_at", DateTime(timezone=True), nullable=True),
        Column("last_error", Text, nullable=True),
        Column("sent_at", DateTime(timezone=True), nullable=True),
        # acknowledgement: the alert is the root message; re-notifications point at it
        Column("root_id", String(36), nullable=True),
        Column("ack_state", String(20), nullable=True),  # None | pending | acknowledged | closed
        Column("ack_due_at", DateTime(timezone=True), nullable=True),
        Column("acked_at", DateTime(timezone=True), nullable=True),
        Column("acked_by", String(200), nullable=True),
        Column("escalation_level", Integer, nullable=False),
        Column("tracker", String(200), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("idempotency_key", name="uq_messages_idempotency_key"),
        Index("ix_messages_due", "status", "next_attempt_at"),
        Index("ix_messages_practice", "practice", "created_at"),
        Index("ix_messages_ack", "ack_state", "ack_due_at"),
    )
    deliveries = Table(
        "deliveries",
        metadata,
        Column("id", BigId, primary_key=True, autoincrement=True),
        Column("message_id", String(36), nullable=False, index=True),
        Column("practice", String(64), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("channel", String(20), nullable=False),
        Column("outcome", String(20), nullable=False),  # delivered | retry | failed
        Column("response", Text, nullable=True),
        Column("at", DateTime(timezone=True), nullable=False),
    )
    call_requests = Table(
        "call_requests",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("practice", String(64), nullable=False, index=True),
        Column("provider_id", String(64), nullable=False),
        Column("patient", String(80), nullable=True),
        Column("reason", Text, nullable=False),
        Column("requester_name", String(200), nullable=False),
        Column("requester_email", String(320), nullable=False),
        Column("slots", JSON, nullable=False),  # ISO start times (UTC)
        Column("duration_minutes", Integer, nullable=False),
        Column("status", String(20), nullable=False),  # proposed | confirmed
        Column("chosen_slot", DateTime(timezone=True), nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    return {
        t.name: t
        for t in (
            providers,
            provider_history,
            provider_roles,
            organizations,
            practice_contacts,
            template_overrides,
            ack_policies,
            messages,
            deliveries,
            call_requests,
        )
    }


def add_invoice_cancellations_table(metadata: MetaData) -> dict[str, Table]:
    """The invoices whose ``billing.invoice.cancelled.v1`` this service consumed (migration
    ``notification_0008``): billing publishes an invoice's ``issued`` and ``cancelled`` on
    topics of their own, so the cancellation may come first; the ``issued`` event then finds
    it here and sends no ``invoice-issued`` message. One small row per cancelled invoice, kept
    (an ``issued`` may come any time later: redriven from its dead-letter topic)."""
    invoice_cancellations = Table(
        "invoice_cancellations",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("invoice_id", Text, nullable=False),
        Column("replaced_by", Text, nullable=True),
        Column("event_id", String(200), nullable=False),  # the cancelled event's id
        Column("recorded_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "invoice_id"),
    )
    return {"invoice_cancellations": invoice_cancellations}


metadata = MetaData()
outbox, inbox, event_sequences = add_messaging_tables(metadata)
_tables = add_notification_tables_v1(metadata)
providers = _tables["providers"]
provider_history = _tables["provider_history"]
provider_roles = _tables["provider_roles"]
organizations = _tables["organizations"]
practice_contacts = _tables["practice_contacts"]
template_overrides = _tables["template_overrides"]
ack_policies = _tables["ack_policies"]
messages = _tables["messages"]
deliveries = _tables["deliveries"]
call_requests = _tables["call_requests"]
_subscription_tables = add_subscription_tables_v1(metadata)
subscriptions = _subscription_tables["subscriptions"]
subscription_events = _subscription_tables["subscription_events"]
subscription_deliveries = _subscription_tables["subscription_deliveries"]
feed_held = add_feed_held_table(metadata)["feed_held"]
invoice_cancellations = add_invoice_cancellations_table(metadata)["invoice_cancellations"]
subscription_secrets = add_subscription_secrets_table(metadata)["subscription_secrets"]
for _name, _table, _columns in SUBSCRIPTION_RETENTION_INDEXES:
    Index(_name, *(metadata.tables[_table].c[c] for c in _columns))
