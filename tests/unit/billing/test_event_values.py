"""Billing keeps whatever an event's contract and FHIR allow (references of 64-character ids, a
versionId of 64, an MBI of any length: billing_0019), and refuses at once, naming the column,
a value no column holds: retried, it failed the same way six times before it was set aside."""

import pytest
from sqlalchemy import select

from ccm_billing.adapters import orm
from ccm_shared.consumer import PoisonMessage
from tests.unit.billing import compliance_events as cev
from tests.unit.billing import events as ev
from tests.unit.billing.test_billing_flow import api, deliver

ROLE = "nurse." + "n" * 58  # a FHIR id's 64 characters
PLAN = "cp-p1"


def review(**changes):
    e = cev.review_completed("alpha", "p1", PLAN, due="2025-03-10",
                             completed="2025-03-09T12:00:00+00:00")
    e.data.update(changes)
    return e


async def stored(runtime, table, *columns):
    """The rows' ``columns``, each value checked against its column's width, which SQLite
    ignores and PostgreSQL enforces."""
    async with runtime.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(*(table.c[c] for c in columns)))).all()
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            width = getattr(table.c[column].type, "length", None)
            assert width is None or len(value) <= width, f"{table.name}.{column}"
    return rows


async def test_the_longest_values_the_contracts_allow_are_kept(billing):
    """"PractitionerRole/" and 64 characters is 81; a versionId of 64 makes a version key of
    93; an MBI is any identifier value."""
    mbi = "8VD2D16CW69-CORRECTED-2026" + "X" * 5000
    entry = ev.time_logged("alpha", "p1", "e1", 1500, "2025-03-03T10:00:00-05:00",
                           role=f"PractitionerRole/{ROLE}")
    entry.data["source"]["versionId"] = "v" * 64
    await deliver(billing, *ev.enrolled_patient("alpha", "p1", mbi=mbi),
                  ev.role("alpha", ROLE, "clinical-staff", practitioner=f"PractitionerRole/{ROLE}"),
                  ev.consent("alpha", "p1", "c-2", practitioner=f"PractitionerRole/{ROLE}"),
                  entry, review(responsibleProvider=f"PractitionerRole/{ROLE}",
                                supervisor=f"PractitionerRole/{ROLE}"))
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert rows["patients"][0]["codes"] == {"99490": 1}  # the 81-character role classified it
    assert await stored(billing, orm.patients, "mbi") == [(mbi,)]
    assert await stored(billing, orm.time_entries, "practitioner_role", "version") == [
        (f"PractitionerRole/{ROLE}", f"2025-01-01T00:00:01.000000|{'v' * 64}|1")]
    assert (f"PractitionerRole/{ROLE}",) in await stored(billing, orm.consents, "practitioner")
    assert await stored(billing, orm.care_plan_reviews, "responsible_provider", "supervisor") == [
        (f"PractitionerRole/{ROLE}",) * 2]


def _source(**changes):
    e = ev.time_logged("alpha", "p1", "e1", 1500, "2025-03-03T10:00:00-05:00")
    e.data["source"].update(changes)
    return e


def _nul_mbi():
    return ev.patient("alpha", "p1", mbi="1EG4TE5MK72\x00")


@pytest.mark.parametrize(("event", "refused"), [
    (lambda: _source(versionId="9" * 65), "source_versions.version_id holds 64 characters"),
    (lambda: _source(id="e" * 65), "source_versions.resource_id holds 64 characters"),
    (lambda: _source(resourceType="E" * 41), "source_versions.resource_type holds 40 characters"),
    (lambda: _source(connection="c" * 201), "source_versions.connection holds 200 characters"),
    (lambda: review(tracker="t" * 65), "care_plan_reviews.tracker holds 64 characters"),
    (lambda: review(idempotencyKey="k" * 301),
     "care_plan_reviews.idempotency_key holds 300 characters"),
    (_nul_mbi, "patients.mbi has a NUL character"),
], ids=["version-id", "resource-id", "resource-type", "connection", "tracker", "key", "nul"])
async def test_a_value_no_column_holds_is_refused_at_once_naming_its_column(billing, event,
                                                                            refused):
    with pytest.raises(PoisonMessage, match=refused) as raised:
        await deliver(billing, event())
    assert "999" not in str(raised.value) and "1EG4" not in str(raised.value)  # no values
    for table in (orm.time_entries, orm.source_versions, orm.care_plan_reviews, orm.patients):
        assert await stored(billing, table, "practice") == []
