"""Tables of the ingest schema. Rows are declared without a schema; the engine places them.

- ``resources``: one row per (practice, type, id): the current (newest applied) version and the
  resource's CCM state. The primary key starts with the practice, so ids never collide across
  practices and every lookup is tenant-scoped.
- ``resource_versions``: every accepted version, never overwritten (the system-of-record mirror).
- ``resource_identifiers``: identifiers of current versions, for ``identifier=`` searches.
- ``conditional_creates``: one row per (practice, type, normalised If-None-Exist criteria); its
  primary key is what makes concurrent conditional creates unable to create two resources.
- ``ingest_configs``: per-practice overrides of the default code sets, and their revision
  (since ``ingest_0006``: counted up by each change; events that state a stored version's
  mapping again after a change carry it as ``source.mappingRevision``).
"""

from sqlalchemy import (
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
)

from ccm_shared.tables import add_messaging_tables

metadata = MetaData()
outbox, inbox, event_sequences = add_messaging_tables(metadata)

resources = Table(
    "resources",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("type", String(40), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),  # current (applied) version
    Column("last_version", Integer, nullable=False),  # highest version stored
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("patient", String(64), nullable=True),
    Column("ccm_state", Text, nullable=False, default="{}"),
    PrimaryKeyConstraint("tenant", "type", "id"),
    Index("ix_resources_patient", "tenant", "type", "patient"),
    Index("ix_resources_updated", "tenant", "type", "last_updated"),
)

resource_versions = Table(
    "resource_versions",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("type", String(40), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("resource", Text, nullable=True),  # NULL for a deletion
    Column("sha256", String(64), nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("connection", String(200), nullable=True),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("applied", Boolean, nullable=False, default=True),  # False: older than the state
    # POST (a create with a server-assigned id), PUT or DELETE; NULL before ingest_0004.
    Column("method", String(6), nullable=True),
    PrimaryKeyConstraint("tenant", "type", "id", "version_id"),
)

resource_identifiers = Table(
    "resource_identifiers",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("type", String(40), nullable=False),
    Column("id", String(64), nullable=False),
    Column("system", String(500), nullable=False, default=""),
    Column("value", String(500), nullable=False),
    Index("ix_identifiers_lookup", "tenant", "type", "value"),
    Index("ix_identifiers_resource", "tenant", "type", "id"),
)

conditional_creates = Table(
    "conditional_creates",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("type", String(40), nullable=False),
    Column("criteria", String(1000), nullable=False),
    Column("id", String(64), nullable=False),
    PrimaryKeyConstraint("tenant", "type", "criteria"),
)

ingest_configs = Table(
    "ingest_configs",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("config", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("revision", Integer, nullable=False, server_default="0"),
)

SERVICE_TABLES = (resources, resource_versions, resource_identifiers, conditional_creates,
                  ingest_configs)

# One row per expiry notice sent (ingest.consent.expiring.v1): a consent's notice for one end
# day and patient goes out once, whatever the number of passes or replicas (the key refuses a
# second).
consent_expiry_notices = Table(
    "consent_expiry_notices",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("consent_id", String(64), nullable=False),
    Column("expires_on", String(10), nullable=False),
    Column("patient", String(64), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("tenant", "consent_id", "expires_on", "patient"),
)
