"""Tables of the ingest schema. Rows are declared without a schema; the engine places them."""

from sqlalchemy import MetaData

from ccm_shared.tables import add_messaging_tables

metadata = MetaData()
outbox, inbox, event_sequences = add_messaging_tables(metadata)
