"""The ingest domain: pure Python (dataclasses, Decimal, datetime), no framework imports."""
