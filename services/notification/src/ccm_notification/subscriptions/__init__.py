"""Practice-system subscriptions: billing's practice-facing events fanned out to one Kafka topic
per practice and to the practice's webhook subscriptions (FHIR Subscription backport style)."""
