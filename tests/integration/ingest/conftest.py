"""Ingest integration fixtures: the bulk outbox writes follow the event contracts too."""

from tests.unit.ingest.bulk_contracts import _bulk_events_follow_their_contracts  # noqa: F401
