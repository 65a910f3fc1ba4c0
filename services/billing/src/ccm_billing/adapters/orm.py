"""Tables of the billing schema. Rows are declared without a schema; the engine places them.

Money is stored as decimal strings ("123.45"): exact on PostgreSQL and SQLite alike.
"""

from sqlalchemy import (
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
    false,
    func,
    text,
)

from ccm_billing.compliance.tables import REF_ID, REFERENCE, TENANT, add_compliance_tables
from ccm_shared.tables import add_messaging_tables

# A source version as the projections keep it (projections.version_key): lastUpdated in UTC to
# the microsecond, "|", the versionId (a FHIR id: 64 characters at most), ingest's mapping
# revision when it has one ("|r" and nine digits), the state suffix "|1".
VERSION = len("2025-01-01T00:00:00.000000|") + REF_ID + len("|r000000001") + len("|1")


def _projection(metadata: MetaData, name: str, key: str, *extra, patient: bool = True,
                patient_nullable: bool = False) -> Table:
    """A projection table: practice + source id as the key, the patient, the source version."""
    columns = [
        Column("practice", String(TENANT), nullable=False),
        Column(key, String(REF_ID), nullable=False),
    ]
    if patient:
        columns.append(Column("patient", String(REF_ID), nullable=patient_nullable))
    columns.append(Column("version", String(VERSION), nullable=False))
    indexes = [Index(f"ix_{name}_patient", "practice", "patient")] if patient else []
    return Table(name, metadata, *columns, *extra, PrimaryKeyConstraint("practice", key), *indexes)


# A FHIR date or dateTime as sent (``2026-11-20T10:00:00.123456789+05:00`` at most; the
# projection keeps only those: an onsetString or onsetAge is no day).
CONDITION_DATE = 40

# The time entries that enrol their patient in their month: the partial index's predicate.
ENROLLED_ENTRY = text("patient IS NOT NULL AND start IS NOT NULL")
# The payments whose reference is taken: those with one, not voided (billing_0022).
ACTIVE_REFERENCE = text("reference IS NOT NULL AND voided_at IS NULL")


def _served_version() -> tuple[Column, Column]:
    """``meta.versionId`` and ``meta.lastUpdated`` of a FHIR resource billing serves
    (billing_0024): one more, and the time, in the statement that changes what /fhir serves of
    it. The server defaults fill rows written by code before it."""
    return (Column("version_id", Integer, nullable=False, default=1, server_default=text("1")),
            Column("last_updated", DateTime(timezone=True), nullable=False,
                   server_default=func.now()))


# A payment or refund sent with an Idempotency-Key (billing_0023), and the key's longest form.
HAS_KEY = text("idempotency_key IS NOT NULL")
IDEMPOTENCY_KEY = 200


def add_billing_tables(metadata: MetaData) -> dict[str, Table]:
    """Version 2 of the billing tables (migration billing_0002 creates exactly these)."""
    t = {}
    # -- projections of ingest's events (latest source version wins) --------------------------
    t["time_entries"] = _projection(
        metadata, "time_entries", "entry_id",
        # the logged version `start`… came from
        Column("data_version", String(VERSION), nullable=True),
        Column("status", String(30), nullable=False),  # finished | entered-in-error | cancelled …
        Column("seconds", Integer, nullable=False, default=0),
        Column("start", DateTime(timezone=True), nullable=True),
        Column("month", String(7), nullable=True),  # the practice's local month of `start`
        Column("complex", Boolean, nullable=False, default=False),
        Column("practitioner", String(REFERENCE), nullable=True),
        Column("practitioner_role", String(REFERENCE), nullable=True),
        Column("role_codes", Text, nullable=False, default="[]"),
        # The performer's kind by the practice's ingest config (billing_0017; None: older)
        Column("performer_class", String(30), nullable=True),
        Column("warnings", Text, nullable=False, default="[]"),
        Column("late", Boolean, nullable=False, default=False),  # logged after its month closed
        Index("ix_time_entries_month", "practice", "month"),
        # Who has time in a month (decision_cache.enrolled_query), read from the index alone
        # (billing_0014): a month close's check of its cached decisions read 6,000 rows for it.
        Index("ix_time_entries_enrolled", "practice", "month", "patient",
              postgresql_where=ENROLLED_ENTRY, sqlite_where=ENROLLED_ENTRY),
        patient_nullable=True,  # a reversal can arrive before anything else about the entry
    )
    t["consents"] = _projection(
        metadata, "consents", "consent_id",
        Column("status", String(30), nullable=False),
        Column("obtained_at", DateTime(timezone=True), nullable=True),
        Column("provision", String(10), nullable=False),
        Column("effective_until", Date, nullable=True),
        Column("practitioner", String(REFERENCE), nullable=True),
        # provision.period, as days of the practice (billing_0017)
        Column("valid_from", Date, nullable=True),
        Column("valid_until", Date, nullable=True),
        # When billing first received a version that granted it (billing_0025): after a
        # month's end, that month's consent was documented late.
        Column("received_at", DateTime(timezone=True), nullable=True),
    )
    t["care_plans"] = _projection(
        metadata, "care_plans", "care_plan_id",
        Column("status", String(30), nullable=False),
        Column("intent", String(20), nullable=False),
        Column("created", Date, nullable=True),
        Column("last_review", Date, nullable=True),
        Column("completed_on", Date, nullable=True),  # status completed: when (billing_0017)
        Column("review_version", String(VERSION), nullable=True),  # the version last_review is of
    )
    t["conditions"] = _projection(
        metadata, "conditions", "condition_id",
        Column("counts", Boolean, nullable=False),  # active, chronic, not in error, not deleted
        # For the months it counts in (billing_0025; service_layer/conditions.py): whether it
        # is a chronic condition (ingest's verdict while active, kept through its resolution;
        # NULL: first known resolved), its onset (else recordedDate) and abatement as sent,
        # when billing first received it, when its resolution was received, and whether a
        # chronic code list judged it.
        Column("chronic", Boolean, nullable=True),
        Column("onset", String(CONDITION_DATE), nullable=True),
        Column("abatement", String(CONDITION_DATE), nullable=True),
        Column("first_received_at", DateTime(timezone=True), nullable=True),
        Column("resolved_at", DateTime(timezone=True), nullable=True),
        Column("code_checked", Boolean, nullable=True),
    )
    t["patients"] = _projection(
        metadata, "patients", "patient_id",
        # The identifier's value as the Patient has it, whatever its length (a FHIR string; one
        # longer than the 20 it had was dead-lettered). The duplicate-biller check only asks
        # equality: a hash index holds any value, a btree entry ~2,700 bytes (billing_0019).
        Column("mbi", Text, nullable=True),
        Column("active", Boolean, nullable=False),
        Index("ix_patients_mbi", "mbi", postgresql_using="hash"),
        patient=False,
    )
    t["practitioner_roles"] = _projection(
        metadata, "practitioner_roles", "role_id",
        Column("practitioner", String(REFERENCE), nullable=True),
        Column("classification", String(30), nullable=False),
        Column("active", Boolean, nullable=False),
        Index("ix_roles_practitioner", "practice", "practitioner"),
        patient=False,
    )
    # -- billing state ---------------------------------------------------------------------------
    t["billing_periods"] = Table(
        "billing_periods", metadata,
        Column("practice", String(TENANT), nullable=False),
        Column("month", String(7), nullable=False),
        Column("status", String(10), nullable=False),  # closed
        Column("closed_at", DateTime(timezone=True), nullable=False),
        Column("invoice_id", String(REF_ID), nullable=True),
        Column("summary", Text, nullable=False),  # JSON: the period-closed event's data
        # Closed in place (adapters/filed.py): the month's cached decisions are its revision-0
        # filings, and its decision lines the ChargeItems of ``line_invoice`` (until that Invoice
        # is cancelled), each with ``line_entered`` (its enteredDate) appended.
        Column("filed_in_place", Boolean, nullable=False, default=False, server_default=false()),
        Column("line_invoice", String(REF_ID), nullable=True),
        Column("line_entered", Text, nullable=True),
        # JSON {"pricing"}: the contract and rule options the month is billed under: those of
        # its close, or of its last explicit recompute (billing_0013). A correction decides and
        # prices under them; NULL (closed before billing_0013): the current ones.
        Column("terms", Text, nullable=True),
        PrimaryKeyConstraint("practice", "month"),
    )
    t["invoices"] = Table(
        "invoices", metadata,
        Column("id", String(REF_ID), primary_key=True),
        Column("practice", String(TENANT), nullable=False),
        Column("month", String(7), nullable=False),
        Column("revision", Integer, nullable=False),
        Column("status", String(20), nullable=False),  # issued | balanced | cancelled
        Column("payment_status", String(20), nullable=False),  # issued | partially-paid | balanced
        Column("total_net", String(20), nullable=False),
        # What the practice has paid net: its payments not voided, less its refunds (billing_0020)
        Column("paid", String(20), nullable=False),
        # Refunded to the practice of what it overpaid (billing_0020)
        Column("refunded", String(20), nullable=False, default="0.00", server_default="0.00"),
        Column("issued_at", DateTime(timezone=True), nullable=False),
        Column("due_date", Date, nullable=False),
        Column("overdue", Boolean, nullable=False, default=False),
        Column("replaces", String(REF_ID), nullable=True),
        Column("replaced_by", String(REF_ID), nullable=True),
        Column("cancel_reason", Text, nullable=True),
        Column("resource", Text, nullable=False),  # the FHIR R4 Invoice, as JSON
        # resource without its lineItem: its ChargeItems give it (filed.invoice_resource)
        Column("lines_in_place", Boolean, nullable=False, default=False,
               server_default=false()),
        # Its status, cancellation or replacement changed: a new version (a payment that leaves
        # the status as it was changes nothing /fhir/Invoice serves).
        *_served_version(),
        UniqueConstraint("practice", "month", "revision", name="uq_invoices_practice_month_rev"),
        Index("ix_invoices_practice_status", "practice", "status"),
    )
    t["charge_items"] = Table(
        "charge_items", metadata,
        Column("id", String(REF_ID), primary_key=True),
        Column("practice", String(TENANT), nullable=False),
        Column("invoice_id", String(REF_ID), nullable=False),
        Column("patient", String(REF_ID), nullable=False),
        Column("month", String(7), nullable=False),
        Column("code", String(10), nullable=False),
        Column("status", String(20), nullable=False),  # billable | entered-in-error
        Column("amount", String(20), nullable=False),
        Column("resource", Text, nullable=False),  # the FHIR R4 ChargeItem, as JSON
        *_served_version(),  # version 2: entered-in-error (its Invoice cancelled)
        Index("ix_charge_items_invoice", "invoice_id"),
        Index("ix_charge_items_patient", "practice", "patient"),
    )
    t["payments"] = Table(
        "payments", metadata,
        Column("id", String(36), primary_key=True),
        Column("practice", String(TENANT), nullable=False),
        Column("invoice_id", String(REF_ID), nullable=False, index=True),
        Column("amount", String(20), nullable=False),
        Column("date", Date, nullable=False),
        Column("reference", String(200), nullable=True),
        Column("recorded_at", DateTime(timezone=True), nullable=False),
        # A payment of a cancelled Invoice carried into its replacement: the one it carries.
        Column("carried_from", String(36), nullable=True),
        # Voided (recorded in error, or reversed by the bank): when, why and by whom (the API
        # token and its label); a voided payment counts nowhere, and every copy of it carried
        # into a replacement is voided with it (billing_0020). Never deleted.
        Column("voided_at", DateTime(timezone=True), nullable=True),
        Column("void_reason", Text, nullable=True),
        Column("voided_by", String(200), nullable=True),
        Column("voided_by_label", String(200), nullable=True),
        # A reference names one payment of the invoice that counts: the same one sent again is
        # that payment, and a voided one leaves its reference free for the payment that
        # replaces it (billing_0022). Copies carried into a replacement are its payments too.
        Index("uq_payments_invoice_reference", "invoice_id", "reference", unique=True,
              postgresql_where=ACTIVE_REFERENCE, sqlite_where=ACTIVE_REFERENCE),
        # The request's Idempotency-Key (billing_0023): the same key sent again to the invoice
        # is this payment (voided or not), whatever its reference; one payment per key.
        Column("idempotency_key", String(IDEMPOTENCY_KEY), nullable=True),
        Index("uq_payments_invoice_idempotency_key", "invoice_id", "idempotency_key",
              unique=True, postgresql_where=HAS_KEY, sqlite_where=HAS_KEY),
    )
    t["threshold_alerts"] = Table(
        "threshold_alerts", metadata,
        Column("practice", String(TENANT), nullable=False),
        Column("month", String(7), nullable=False),
        Column("patient", String(REF_ID), nullable=False),
        Column("days_left", Integer, nullable=False),
        Column("sent_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "month", "patient", "days_left"),
    )
    t["duplicate_releases"] = Table(
        "duplicate_releases", metadata,
        Column("practice", String(TENANT), nullable=False),
        Column("month", String(7), nullable=False),
        Column("patient", String(REF_ID), nullable=False),
        Column("released_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("practice", "month", "patient"),
    )
    t["practice_sequences"] = Table(
        "practice_sequences", metadata,
        Column("practice", String(TENANT), primary_key=True),
        Column("last", Integer, nullable=False),
    )
    return t


def add_ehr_tables(metadata: MetaData) -> dict[str, Table]:
    """Version 3: pushing Invoices and ChargeItems to a practice's EHR (migration billing_0004)."""
    return {
        "ehr_endpoints": Table(
            "ehr_endpoints", metadata,
            Column("practice", String(TENANT), primary_key=True),
            Column("base_url", String(500), nullable=False),
            Column("authorization", Text, nullable=True),  # sent as the Authorization header
            Column("updated_at", DateTime(timezone=True), nullable=False),
        ),
        "ehr_deliveries": Table(
            "ehr_deliveries", metadata,
            Column("id", String(36), primary_key=True),
            Column("practice", String(TENANT), nullable=False),
            Column("invoice_id", String(REF_ID), nullable=False),
            Column("status", String(12), nullable=False),  # pending | delivered | failed
            Column("attempts", Integer, nullable=False, default=0),
            Column("next_attempt_at", DateTime(timezone=True), nullable=False),
            Column("last_status", Integer, nullable=True),
            Column("last_error", String(300), nullable=True),
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("delivered_at", DateTime(timezone=True), nullable=True),
            Index("ix_ehr_deliveries_due", "status", "next_attempt_at"),
            Index("ix_ehr_deliveries_practice", "practice", "created_at"),
        ),
    }


def add_decision_cache_tables(metadata: MetaData) -> dict[str, Table]:
    """Version 4: decisions kept current during the month (migration billing_0005).

    ``fact_generations`` counts changes to a patient's facts (the projections bump it in the
    transaction that changes them); a cached decision records the generation it was decided at,
    so a decision whose generation, duplicate-biller flag or practice context is not current is
    never used: it is decided again. The cache is an accelerator, never a source of truth.
    """
    return {
        "fact_generations": Table(
            "fact_generations", metadata,
            Column("practice", String(TENANT), nullable=False),
            Column("patient", String(REF_ID), nullable=False),
            Column("generation", Integer, nullable=False),
            PrimaryKeyConstraint("practice", "patient"),
        ),
        "month_decisions": Table(
            "month_decisions", metadata,
            Column("practice", String(TENANT), nullable=False),
            Column("month", String(7), nullable=False),
            Column("patient", String(REF_ID), nullable=False),
            Column("generation", Integer, nullable=False),  # fact generation decided at
            Column("context", String(64), nullable=False),  # rules, options, pricing, roles
            Column("duplicate", Boolean, nullable=False),  # the duplicate-biller fact used
            Column("billable", Boolean, nullable=False),
            Column("codes", Text, nullable=False),  # JSON {code: units}
            Column("blockers", Text, nullable=False),  # JSON [blocker]
            Column("staff_seconds", Integer, nullable=False),
            Column("practitioner_seconds", Integer, nullable=False),
            Column("decision", Text, nullable=False),  # Decision.to_dict() as JSON
            Column("entries", Text, nullable=False),  # the time entries as decided, JSON
            Column("decided_at", DateTime(timezone=True), nullable=False),
            PrimaryKeyConstraint("practice", "month", "patient"),
        ),
        "month_decision_lines": Table(
            "month_decision_lines", metadata,
            Column("practice", String(TENANT), nullable=False),
            Column("month", String(7), nullable=False),
            Column("patient", String(REF_ID), nullable=False),
            Column("code", String(10), nullable=False),
            Column("charge_item_id", String(REF_ID), nullable=False),  # of revision 0
            Column("amount", String(20), nullable=False),
            Column("resource", Text, nullable=False),  # the ChargeItem without enteredDate
            PrimaryKeyConstraint("practice", "month", "patient", "code"),
            # A month closed in place serves its ChargeItems from here (adapters/filed.py).
            Index("ix_decision_lines_item", "charge_item_id"),
            Index("ix_decision_lines_patient", "practice", "patient"),
        ),
    }


def add_visit_tables(metadata: MetaData) -> dict[str, Table]:
    """Version 5: qualifying visits, for the initiating-visit check and G0506 (billing_0011)."""
    return {
        "visits": _projection(
            metadata, "visits", "visit_id",
            Column("status", String(30), nullable=False),  # finished | entered-in-error | …
            Column("day", Date, nullable=False),  # in the practice's time zone
            Column("codes", Text, nullable=False),  # JSON [visit code]
            Column("performers", Text, nullable=False),  # JSON [{practitioner, practitionerRole}]
        ),
    }


def add_refund_tables(metadata: MetaData) -> dict[str, Table]:
    """Version 6: refunds of what a practice overpaid (billing_0020)."""
    return {
        "refunds": Table(
            "refunds", metadata,
            Column("id", String(36), primary_key=True),
            Column("practice", String(TENANT), nullable=False),
            Column("invoice_id", String(REF_ID), nullable=False, index=True),
            Column("amount", String(20), nullable=False),
            Column("date", Date, nullable=False),
            Column("reference", String(200), nullable=True),
            Column("recorded_at", DateTime(timezone=True), nullable=False),
            # A refund of a cancelled Invoice carried into its replacement: the one it carries.
            Column("carried_from", String(36), nullable=True),
            # The request's Idempotency-Key (billing_0023), as a payment's.
            Column("idempotency_key", String(IDEMPOTENCY_KEY), nullable=True),
            Index("uq_refunds_invoice_idempotency_key", "invoice_id", "idempotency_key",
                  unique=True, postgresql_where=HAS_KEY, sqlite_where=HAS_KEY),
        ),
    }


metadata = MetaData()
outbox, inbox, event_sequences = add_messaging_tables(metadata)
tables = add_billing_tables(metadata)
tables.update(add_ehr_tables(metadata))
tables.update(add_decision_cache_tables(metadata))
tables.update(add_visit_tables(metadata))
tables.update(add_refund_tables(metadata))
time_entries = tables["time_entries"]
consents = tables["consents"]
care_plans = tables["care_plans"]
conditions = tables["conditions"]
patients = tables["patients"]
practitioner_roles = tables["practitioner_roles"]
billing_periods = tables["billing_periods"]
invoices = tables["invoices"]
charge_items = tables["charge_items"]
payments = tables["payments"]
refunds = tables["refunds"]
threshold_alerts = tables["threshold_alerts"]
duplicate_releases = tables["duplicate_releases"]
practice_sequences = tables["practice_sequences"]
compliance = add_compliance_tables(metadata)
source_versions = compliance["source_versions"]
decision_filings = compliance["decision_filings"]
care_plan_reviews = compliance["care_plan_reviews"]
ehr_endpoints = tables["ehr_endpoints"]
ehr_deliveries = tables["ehr_deliveries"]
fact_generations = tables["fact_generations"]
month_decisions = tables["month_decisions"]
month_decision_lines = tables["month_decision_lines"]
visits = tables["visits"]
