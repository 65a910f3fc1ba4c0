"""Tables of the compliance records (append-only; declared without a schema like the rest)."""

from sqlalchemy import (
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
)

from ccm_shared.tables import inbox_table

TENANT = 64
REF_ID = 64
# A relative reference "Type/id" an event carries: the longest R4 resource type's name + "/" + a
# FHIR id (64 characters at most). The contracts name shorter types ("PractitionerRole/" and 64
# characters is 81: it did not fit the 80 these columns had), but any type fits.
REFERENCE = len("MedicinalProductUndesirableEffect") + 1 + REF_ID
# An event id, as wide as the inbox's: any event the consumer took.
EVENT_ID = inbox_table.c.event_id.type.length


def add_compliance_tables(metadata: MetaData) -> dict[str, Table]:
    """Version 3 of the billing tables (migration billing_0003 creates exactly these)."""
    t = {}
    # Every source FHIR version billing consumed, as the event described it: the projections keep
    # only the newest version, this keeps them all (what was known, from where, when).
    t["source_versions"] = Table(
        "source_versions", metadata,
        Column("practice", String(TENANT), nullable=False),
        Column("resource_type", String(40), nullable=False),
        Column("resource_id", String(REF_ID), nullable=False),
        Column("version_id", String(64), nullable=False),
        Column("event_type", String(80), nullable=False),
        Column("patient", String(REF_ID), nullable=True),
        Column("last_updated", DateTime(timezone=True), nullable=False),
        Column("sha256", String(64), nullable=False),
        Column("received_at", DateTime(timezone=True), nullable=False),
        Column("connection", String(200), nullable=True),
        Column("recorded_at", DateTime(timezone=True), nullable=False),  # applied by billing
        Column("data", Text, nullable=False),  # the event's data without `source`, as JSON
        PrimaryKeyConstraint("practice", "resource_type", "resource_id", "version_id", "event_type"),
        Index("ix_source_versions_patient", "practice", "patient", "resource_type"),
    )
    # The decision of a patient-month each time it was filed: revision 0 at close, then one per
    # correction that changed it. Never updated: a correction adds a revision.
    t["decision_filings"] = Table(
        "decision_filings", metadata,
        Column("practice", String(TENANT), nullable=False),
        Column("patient", String(REF_ID), nullable=False),
        Column("month", String(7), nullable=False),
        Column("revision", Integer, nullable=False),
        Column("filed_at", DateTime(timezone=True), nullable=False),
        Column("reason", Text, nullable=False),
        Column("decision", Text, nullable=False),  # Decision.to_dict() as JSON
        Column("entries", Text, nullable=False),  # the month's time entries as decided, JSON
        PrimaryKeyConstraint("practice", "patient", "month", "revision"),
    )
    # Care-plan reviews completed (careplan.review.completed.v1): the review evidence.
    t["care_plan_reviews"] = Table(
        "care_plan_reviews", metadata,
        Column("practice", String(TENANT), nullable=False),
        Column("idempotency_key", String(300), nullable=False),
        Column("patient", String(REF_ID), nullable=False),
        Column("care_plan_id", String(REF_ID), nullable=False),
        Column("tracker", String(REF_ID), nullable=False),
        Column("due_date", Date, nullable=False),
        Column("completed_at", DateTime(timezone=True), nullable=False),
        Column("days_overdue", Integer, nullable=False),
        Column("responsible_provider", String(REFERENCE), nullable=True),
        Column("supervisor", String(REFERENCE), nullable=True),
        Column("event_id", String(EVENT_ID), nullable=False),
        PrimaryKeyConstraint("practice", "idempotency_key"),
        Index("ix_care_plan_reviews_patient", "practice", "patient"),
    )
    return t
