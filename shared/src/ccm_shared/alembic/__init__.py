"""Alembic environment shared by every schema (see ccm_shared.migrate)."""
