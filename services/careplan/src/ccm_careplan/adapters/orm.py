"""Tables of the careplan schema. Rows are declared without a schema; the engine places them.

``add_tracker_tables`` is today's tracker tables; migration careplan_0002 creates them from it on
a new database. Any later change to a table needs a migration of its own that alters a database
created before it, checking first what is there (careplan_0004: ingest's mapping revisions).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
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

from ccm_shared.tables import add_messaging_tables

REF = 140  # "PractitionerRole/" + a 64-character id, with room to spare


def fact_version() -> tuple[Column, Column]:
    """The source version a fact was last replaced by, after its ``last_updated`` (null
    ``version_id``: recorded before careplan_0004)."""
    return (Column("version_id", String(64), nullable=True),
            Column("mapping_revision", Integer, nullable=False, server_default="0"))


def add_tracker_tables(metadata: MetaData) -> dict[str, Table]:
    trackers = Table(
        "care_plan_trackers",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("practice", String(64), nullable=False),
        Column("care_plan", String(REF), nullable=False),
        Column("patient", String(REF), nullable=False),
        Column("status", String(20), nullable=False),
        Column("intent", String(20), nullable=False),
        Column("created", Date, nullable=True),
        Column("first_seen", Date, nullable=False),
        Column("current_version", String(64), nullable=True),
        Column("current_last_updated", DateTime(timezone=True), nullable=True),
        # ingest's source.mappingRevision of the current version (0: as first mapped)
        Column("current_mapping_revision", Integer, nullable=False, server_default="0"),
        Column("author", String(REF), nullable=True),
        Column("care_team", JSON, nullable=False),
        Column("addresses", JSON, nullable=False),
        Column("last_review", Date, nullable=True),
        Column("last_reviewer", String(REF), nullable=True),
        Column("next_review_due", Date, nullable=True),
        Column("early_trigger", String(40), nullable=True),
        Column("early_trigger_date", Date, nullable=True),
        Column("signoff_status", String(20), nullable=False),
        Column("signoff_by", String(REF), nullable=True),
        Column("signoff_date", Date, nullable=True),
        Column("reminders_sent", Integer, nullable=False, default=0),
        Column("escalation_level", Integer, nullable=False, default=0),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("practice", "care_plan", name="uq_tracker_practice_plan"),
        Index("ix_tracker_practice_due", "practice", "next_review_due"),
        Index("ix_tracker_practice_patient", "practice", "patient"),
    )
    versions = Table(
        "care_plan_versions",
        metadata,
        Column("tracker_id", String(36), nullable=False),
        Column("version_id", String(64), nullable=False),
        Column("practice", String(64), nullable=False),
        Column("event_type", String(80), nullable=False),
        Column("status", String(20), nullable=False),
        Column("last_updated", DateTime(timezone=True), nullable=False),
        Column("review_date", Date, nullable=True),
        Column("applied", Boolean, nullable=False),
        Column("received_at", DateTime(timezone=True), nullable=False),
        # A version ingest mapped again after a config change is a row of its own (0: as first
        # mapped); the same version and revision again is a duplicate.
        Column("mapping_revision", Integer, nullable=False, server_default="0"),
        PrimaryKeyConstraint("tracker_id", "version_id", "mapping_revision"),
    )
    reviews = Table(
        "care_plan_reviews",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("tracker_id", String(36), nullable=False, index=True),
        Column("practice", String(64), nullable=False),
        Column("review_date", Date, nullable=False),
        Column("reviewer", String(REF), nullable=True),
        Column("outcome", String(30), nullable=False),
        Column("notes", Text, nullable=True),
        Column("source", String(10), nullable=False),
        Column("version_id", String(64), nullable=True),
        Column("cycle_due", Date, nullable=True),
        Column("days_overdue", Integer, nullable=False),
        Column("recorded_at", DateTime(timezone=True), nullable=False),
    )
    steps = Table(
        "review_steps",
        metadata,
        # The unique idempotency key is what makes concurrent scheduler replicas safe.
        Column("idempotency_key", String(300), primary_key=True),
        Column("practice", String(64), nullable=False),
        Column("tracker_id", String(36), nullable=False),
        Column("kind", String(20), nullable=False),
        Column("cycle_due", Date, nullable=False),
        Column("step", Integer, nullable=False),
        Column("scheduled_on", Date, nullable=False),
        Column("sent", Boolean, nullable=False),
        Column("event_id", String(36), nullable=True),
        Column("recorded_at", DateTime(timezone=True), nullable=False),
        Index("ix_steps_tracker_cycle", "tracker_id", "cycle_due"),
    )
    distributions = Table(
        "care_plan_distributions",
        metadata,
        Column("tracker_id", String(36), nullable=False),
        Column("version_id", String(64), nullable=False),
        Column("recipient", String(REF), nullable=False),
        Column("practice", String(64), nullable=False),
        Column("distributed_at", DateTime(timezone=True), nullable=False),
        Column("acknowledged_at", DateTime(timezone=True), nullable=True),
        PrimaryKeyConstraint("tracker_id", "version_id", "recipient"),
    )
    rules = Table(
        "practice_review_rules",
        metadata,
        Column("practice", String(64), primary_key=True),
        Column("rules", JSON, nullable=False),
        Column("revision", Integer, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    patients = Table(
        "patients",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("patient", String(REF), nullable=False),
        Column("active", Boolean, nullable=False),
        Column("deceased", Boolean, nullable=False),
        Column("deleted", Boolean, nullable=False),
        Column("general_practitioners", JSON, nullable=False),
        Column("last_updated", DateTime(timezone=True), nullable=False),
        *fact_version(),
        PrimaryKeyConstraint("practice", "patient"),
    )
    practitioners = Table(
        "practitioners",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("reference", String(REF), nullable=False),
        Column("practitioner", String(REF), nullable=True),  # for a PractitionerRole
        Column("display", String(200), nullable=True),
        Column("active", Boolean, nullable=False),
        Column("deleted", Boolean, nullable=False),
        Column("last_updated", DateTime(timezone=True), nullable=False),
        *fact_version(),
        PrimaryKeyConstraint("practice", "reference"),
    )
    conditions = Table(
        "conditions",
        metadata,
        Column("practice", String(64), nullable=False),
        Column("condition", String(REF), nullable=False),
        Column("patient", String(REF), nullable=False),
        Column("chronic_active", Boolean, nullable=False),
        Column("last_updated", DateTime(timezone=True), nullable=False),
        *fact_version(),
        PrimaryKeyConstraint("practice", "condition"),
    )
    return {t.name: t for t in (trackers, versions, reviews, steps, distributions, rules,
                                patients, practitioners, conditions)}


metadata = MetaData()
outbox, inbox, event_sequences = add_messaging_tables(metadata)
_tables = add_tracker_tables(metadata)
trackers = _tables["care_plan_trackers"]
versions = _tables["care_plan_versions"]
reviews = _tables["care_plan_reviews"]
review_steps = _tables["review_steps"]
distributions = _tables["care_plan_distributions"]
practice_rules = _tables["practice_review_rules"]
patients = _tables["patients"]
practitioners = _tables["practitioners"]
conditions = _tables["conditions"]
