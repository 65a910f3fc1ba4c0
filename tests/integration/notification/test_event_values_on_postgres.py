"""Values ingest's and careplan's events may carry, as long as FHIR and the contracts let them be,
through notification's consumers on real PostgreSQL (which, unlike SQLite, holds a VARCHAR to
its length): an Organization's name and a ContactPoint's value are FHIR strings of any length,
and a reference takes a 64-character id. Before notification_0005 an Organization named in more
than 300 characters, an email of more than 320 (a role's, an organization's) dead-lettered the
directory's event, and a practitioner's email of more than 500 (a message's recipient), or a
reference of 81 characters as the message's patient, the alert sent with them."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import pytest_asyncio
from alembic import command
from sqlalchemy import select, text

from ccm_notification.adapters.orm import messages, organizations, provider_roles
from ccm_notification.bootstrap import SERVICE
from ccm_shared.db import create_engine_for
from ccm_shared.events import CloudEvent, to_message
from ccm_shared.migrate import alembic_config, upgrade
from ccm_shared.service import discover_services
from tests.support.infra import api_on_postgres

pytestmark = pytest.mark.asyncio(loop_scope="session")

ID = "i" * 64  # the longest FHIR id
NAME = "Clinic " * 60  # 420 characters
EMAIL = "care.team." * 60 + "@clinic.example"  # 615 characters: a ContactPoint's value
SOURCE = {"versionId": "1", "lastUpdated": "2026-11-01T00:00:00+00:00", "sha256": "0" * 64,
          "receivedAt": "2026-11-01T00:00:00+00:00"}


@pytest_asyncio.fixture(loop_scope="session")
async def service(infra):
    async with api_on_postgres(infra.database_url, SERVICE, "widths") as (rt, _, practice, _h):
        yield rt, practice


def event(practice: str, type_: str, subject: str, data: dict) -> CloudEvent:
    return CloudEvent(source="/ccm/ingest", type=type_, tenant=practice, subject=subject,
                      data=data)


async def test_the_longest_names_emails_and_references_are_stored_not_dead_lettered(service):
    rt, practice = service
    directory = next(c for c in rt.consumers if c.name == "notification-directory")
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    email = [{"system": "email", "value": EMAIL, "use": "work"}]
    for e in (
        event(practice, "ingest.organization.upserted.v1", f"Organization/{ID}", {
            "source": {"resourceType": "Organization", "id": ID, **SOURCE},
            "organization": f"Organization/{ID}", "active": True, "name": NAME, "npi": None,
            "telecom": email, "partOf": None, "deleted": False}),
        event(practice, "ingest.practitioner.upserted.v1", f"Practitioner/{ID}", {
            "source": {"resourceType": "Practitioner", "id": ID, **SOURCE},
            "practitioner": f"Practitioner/{ID}", "active": True,
            "name": {"family": "Lee", "given": ["Ana"]}, "npi": None, "telecom": email,
            "qualifications": [], "deleted": False}),
        event(practice, "ingest.practitioner-role.upserted.v1", f"PractitionerRole/{ID}", {
            "source": {"resourceType": "PractitionerRole", "id": ID, **SOURCE},
            "practitionerRole": f"PractitionerRole/{ID}", "practitioner": f"Practitioner/{ID}",
            "organization": f"Organization/{ID}", "active": True, "codes": [],
            "specialties": [], "classification": "clinical-staff", "telecom": email,
            "deleted": False}),
    ):
        await directory.process(to_message(e.type, e))
    # Any reference the contracts allow (their Reference: any of its types and a 64-character
    # id) is what a message is about: "PractitionerRole/" + 64 is 81 characters.
    about = f"PractitionerRole/{ID}"
    overdue = event(practice, "careplan.review.overdue.v1", about, {
        "tracker": "t-1", "carePlan": f"CarePlan/{ID}", "patient": about,
        "dueDate": "2026-11-01", "daysOverdue": 3, "responsibleProvider": f"PractitionerRole/{ID}",
        "supervisor": None, "step": 0, "idempotencyKey": f"{practice}:t-1:overdue:2026-11-01:0"})
    await alerts.process(to_message(overdue.type, overdue))

    assert directory.stats.dead_lettered == 0 and alerts.stats.dead_lettered == 0
    async with rt.db.engine.connect() as conn:
        org = (await conn.execute(select(organizations).where(
            organizations.c.practice == practice))).one()
        role = (await conn.execute(select(provider_roles).where(
            provider_roles.c.practice == practice))).one()
        message = (await conn.execute(select(messages).where(
            messages.c.practice == practice))).one()
    assert (org.id, org.name, org.email) == (ID, NAME, EMAIL)
    assert (role.id, role.practitioner, role.organization, role.email) == (ID, ID, ID, EMAIL)
    assert (message.provider_id, message.channel, message.recipient) == (ID, "email", EMAIL)
    assert message.patient == about and message.status == "pending", message.last_error


async def test_a_database_from_before_notification_0005_is_widened(infra):
    """notification_0005 on a database created before it (its columns narrower): widened, the
    values kept; upgraded again or downgraded and upgraded, nothing changes."""
    definition = discover_services()["notification"]
    schema = f"t_nwidths_{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(upgrade, infra.database_url, schema, definition.migrations_package,
                            "notification_0004")
    engine = create_engine_for(infra.database_url, schema=schema, pool_size=1)
    before = {("organizations", "name"): 300, ("organizations", "email"): 320,
              ("provider_roles", "email"): 320, ("messages", "recipient"): 500,
              ("messages", "patient"): 80, ("subscription_events", "event_id"): 100}
    wanted = {("organizations", "name"): "text", ("organizations", "email"): "text",
              ("provider_roles", "email"): "text", ("messages", "recipient"): "text",
              ("messages", "patient"): 140, ("subscription_events", "event_id"): 200}

    async def widths() -> dict:
        async with engine.connect() as conn:
            return {(t, c): length or kind for t, c, length, kind in (await conn.execute(text(
                "SELECT table_name, column_name, character_maximum_length, data_type "
                "FROM information_schema.columns WHERE table_schema = :s"), {"s": schema})).all()
                if (t, c) in before}

    q = f'"{schema}"'
    try:
        async with engine.begin() as conn:  # as a database created before notification_0005
            for (table, column), length in before.items():
                await conn.execute(text(f"ALTER TABLE {q}.{table} ALTER COLUMN {column} "
                                        f"TYPE varchar({length})"))
        assert await widths() == before
        await asyncio.to_thread(upgrade, infra.database_url, schema,
                                definition.migrations_package)
        assert await widths() == wanted
        await asyncio.to_thread(command.downgrade, alembic_config(
            infra.database_url, schema, definition.migrations_package), "notification_0004")
        await asyncio.to_thread(upgrade, infra.database_url, schema,
                                definition.migrations_package)
        assert await widths() == wanted
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()
