"""The billing service end to end on the embedded database: projections → worklist → close →
Invoice and ChargeItems (FHIR R4) → report → payments → correction → cancel and reissue."""

import asyncio
import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from fhir.resources.R4B.chargeitem import ChargeItem
from fhir.resources.R4B.invoice import Invoice
from sqlalchemy import select, update

from ccm_billing.adapters import orm
from ccm_billing.entrypoints.jobs import run_once
from ccm_billing.service_layer import corrections
from ccm_shared.tables import outbox_table, practices
from tests.unit.billing import events as ev
from tests.unit.billing.conftest import PRICING


def unserved(resource: dict) -> dict:
    """A resource /fhir served, without the ``meta`` it adds (its version: billing_0024),
    which the stored resource, its events and EHR pushes do not carry."""
    return {k: v for k, v in resource.items() if k != "meta"}


async def deliver(runtime, *events):
    handler = runtime.definition.consumers(runtime)[0].handler
    for e in events:
        async with runtime.db.unit_of_work() as uow:
            await handler(e, uow)
            await uow.commit()


def api(runtime, practice="alpha"):
    client = runtime.state["client"]
    headers = {"Authorization": f"Bearer {runtime.state['tokens'][practice]}"}

    class Api:
        async def get(self, path, **kw):
            return await client.get(path, headers=headers, **kw)

        async def post(self, path, **kw):
            return await client.post(path, headers=headers, **kw)

        async def put(self, path, **kw):
            return await client.put(path, headers=headers, **kw)

    return Api()


async def outboxed(runtime, topic):
    async with runtime.db.unit_of_work() as uow:
        rows = (await uow.session.execute(select(outbox_table.c.payload).where(
            outbox_table.c.topic == topic).order_by(outbox_table.c.id))).scalars().all()
    return [json.loads(r) for r in rows]


async def march_practice(runtime):
    """p1: 45 staff minutes; p2: 19:59; p3: 25 staff min, its nurse role unknown until told."""
    await deliver(runtime, *ev.enrolled_patient("alpha", "p1"), *ev.enrolled_patient("alpha", "p2"),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  ev.time_logged("alpha", "p1", "e1", 1500, "2025-03-03T10:00:00-05:00"),
                  ev.time_logged("alpha", "p1", "e2", 1200, "2025-03-17T10:00:00-04:00"),
                  ev.time_logged("alpha", "p2", "e3", 1199, "2025-03-05T10:00:00-05:00"))


async def test_worklist_shows_who_is_short_and_why(billing):
    await march_practice(billing)
    r = await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")
    assert r.status_code == 200, r.text
    rows = {row["patient"]: row for row in r.json()["patients"]}
    assert rows["Patient/p1"]["codes"] == {"99490": 1, "99439": 1}
    assert rows["Patient/p1"]["seconds"] == {"staff": 2700, "practitioner": 0}
    assert rows["Patient/p2"]["codes"] == {} and rows["Patient/p2"]["blockers"] == ["time-threshold-not-met"]
    assert rows["Patient/p2"]["minutesToNextThreshold"] == 1
    near = await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist",
                                  params={"status": "near-threshold"})
    assert [x["patient"] for x in near.json()["patients"]] == ["Patient/p2"]
    blocked = await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist",
                                     params={"status": "blocked"})
    assert [x["patient"] for x in blocked.json()["patients"]] == ["Patient/p2"]


async def test_a_role_arriving_after_the_time_reclassifies_it(billing):
    # doc-1: the consent's billing practitioner (another practitioner's time never bills).
    await deliver(billing, *ev.enrolled_patient("alpha", "p1"),
                  ev.time_logged("alpha", "p1", "e1", 1900, "2025-03-03T10:00:00-05:00",
                                 practitioner="Practitioner/doc-1", role="PractitionerRole/doc-1"))
    before = await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")
    assert before.json()["patients"][0]["blockers"] == ["staff-role-unknown", "time-threshold-not-met"]
    await deliver(billing, ev.role("alpha", "doc-1", "billing-practitioner",
                                   practitioner="Practitioner/doc-1"))
    after = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert after["patients"][0]["codes"] == {"99491": 1}
    assert after["patients"][0]["seconds"] == {"staff": 0, "practitioner": 1900}


async def test_a_role_mapped_again_after_a_config_change_reclassifies_the_time(billing):
    """ingest re-states a role under a changed practice configuration with the same source
    version and a ``mappingRevision``: it is newer than the first mapping (before, the
    projection kept the first: the walkthrough's coordinator stayed staff-role-unknown)."""
    await deliver(billing, *ev.enrolled_patient("alpha", "p1"),
                  ev.role("alpha", "nurse-1", "unknown", practitioner="Practitioner/nurse-1"),
                  ev.time_logged("alpha", "p1", "e1", 1500, "2025-03-03T10:00:00-05:00"))
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert "staff-role-unknown" in rows["patients"][0]["blockers"]
    restated = ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1")
    restated.data["source"]["mappingRevision"] = 1
    older = ev.role("alpha", "nurse-1", "unknown", practitioner="Practitioner/nurse-1")
    await deliver(billing, restated, older)  # the first mapping again (a redelivery): older
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert rows["patients"][0]["codes"] == {"99490": 1}


async def test_close_issues_valid_fhir_and_is_idempotent(billing):
    await march_practice(billing)
    early = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert early.status_code == 409  # March has not ended in New York yet
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    first = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert first.status_code == 200, first.text
    second = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert second.json() == first.json()
    body = first.json()
    assert body["summary"]["patientsBillable"] == 1 and body["summary"]["patientsBlocked"] == 1
    inv_id = body["invoice"]["id"]
    assert body["invoice"]["totalNet"] == "75.33"  # 42.00 + 33.33
    invoice = (await api(billing).get(f"/fhir/Invoice/{inv_id}")).json()
    Invoice.model_validate(invoice)
    assert invoice["status"] == "issued" and invoice["recipient"] == {
        "type": "Organization", "display": "Alpha Clinic",
        "identifier": {"system": "https://ccm-platform.org/fhir/sid/practice", "value": "alpha"}}
    assert invoice["identifier"][0]["value"] == "alpha:2025-03"
    line_total = sum(Decimal(str(li["priceComponent"][0]["amount"]["value"])) for li in invoice["lineItem"])
    assert line_total == Decimal(str(invoice["totalNet"]["value"])) == Decimal("75.33")
    items = (await api(billing).get("/fhir/ChargeItem", params={"subject": "Patient/p1"})).json()
    assert items["total"] == 2
    for entry in items["entry"]:
        ChargeItem.model_validate(entry["resource"])
    by_code = {e["resource"]["code"]["coding"][0]["code"]: e["resource"] for e in items["entry"]}
    assert by_code["99490"]["identifier"][0]["value"] == "alpha:p1:2025-03:99490"
    assert {s["reference"] for s in by_code["99490"]["supportingInformation"]} == {
        "Encounter/e1", "Encounter/e2"}
    one = await api(billing).get(f"/fhir/ChargeItem/{by_code['99439']['id']}")
    assert one.status_code == 200 and one.json()["quantity"]["value"] == 1
    search = (await api(billing).get("/fhir/Invoice", params={
        "recipient": "Organization/alpha", "date": "2025-04"})).json()
    assert [e["resource"]["id"] for e in search["entry"]] == [inv_id]
    # Paged: one ChargeItem a page, the next link keeps the search and moves on.
    first_page = (await api(billing).get("/fhir/ChargeItem", params={
        "subject": "Patient/p1", "_count": "1"})).json()
    assert first_page["total"] == 2 and len(first_page["entry"]) == 1
    links = {link["relation"]: link["url"] for link in first_page["link"]}
    assert "previous" not in links and "subject=Patient%2Fp1" in links["next"]
    second_page = (await api(billing).get(links["next"].removeprefix("http://test"))).json()
    assert [e["resource"]["id"] for e in first_page["entry"] + second_page["entry"]] == [
        e["resource"]["id"] for e in items["entry"]]
    assert "next" not in {link["relation"] for link in second_page["link"]}
    only_total = (await api(billing).get("/fhir/Invoice", params={"_count": "0"})).json()
    assert only_total["total"] == 1 and "entry" not in only_total  # ele-1: no empty arrays
    for bad in ({"_count": "1001"}, {"_count": "-1"}, {"_offset": "x"}):  # FHIR's 400
        refused = await api(billing).get("/fhir/ChargeItem", params=bad)
        assert refused.status_code == 400 and refused.json()["resourceType"] == "OperationOutcome"
    issued = await outboxed(billing, "billing.invoice.issued.v1")
    closed = await outboxed(billing, "billing.period.closed.v1")
    assert len(issued) == 1 and len(closed) == 1  # the second close emitted nothing
    assert issued[0]["data"]["invoice"]["id"] == inv_id
    # Stored without its lines (billing_0016), read whole: what the event carried, in order.
    async with billing.db.unit_of_work() as uow:
        stored = (await uow.session.execute(select(orm.invoices.c.resource, orm.invoices.c.lines_in_place)
                                            .where(orm.invoices.c.id == inv_id))).one()
    assert stored.lines_in_place and "lineItem" not in json.loads(stored.resource)
    assert unserved(invoice) == issued[0]["data"]["invoice"] == unserved(
        search["entry"][0]["resource"])
    assert invoice["meta"] == search["entry"][0]["resource"]["meta"] == {
        "versionId": "1", "lastUpdated": "2025-04-02T12:00:00Z"}
    assert list(unserved(invoice)) == list(issued[0]["data"]["invoice"])
    assert len(invoice["lineItem"]) == 2
    # The Invoice's event, then the period's: consecutive practice sequence numbers.
    assert closed[0]["data"]["practiceSequence"] == issued[0]["data"]["practiceSequence"] + 1
    assert closed[0]["data"]["codes"] == {"99439": 1, "99490": 1}


async def test_report_numbers_match_the_invoice_line_by_line(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    close = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()
    doc = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/report.json")).json()
    assert doc["totals"]["amount"] == close["invoice"]["totalNet"]
    p1 = next(p for p in doc["patients"] if p["patient"] == "Patient/p1")
    assert p1["minutes"] == {"staff": 45, "practitioner": 0}
    assert [(x["code"], x["amount"], x["medicareAmount"]) for x in p1["lines"]] == [
        ("99439", "33.33", "45.93"), ("99490", "42.00", "60.49")]
    r = await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/report.csv")
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert sum(Decimal(x["amount"]) for x in rows if x["patient"] != "TOTAL") == Decimal("75.33")
    assert rows[-1]["patient"] == "TOTAL" and rows[-1]["amount"] == "75.33"
    p2 = next(x for x in rows if x["patient"] == "Patient/p2")
    assert p2["blockers"] == "time-threshold-not-met"


async def test_payments_partial_then_paid_and_overdue(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    url = f"/v1/invoices/{inv['id']}/payments"
    too_much = await api(billing).post(url, json={"amount": "100.00", "date": "2025-04-10"})
    assert too_much.status_code == 422
    bad = await api(billing).post(url, json={"amount": "abc", "date": "2025-04-10"})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    other = await api(billing, "beta").post(url, json={"amount": "1.00", "date": "2025-04-10"})
    assert other.status_code == 404
    part = await api(billing).post(url, json={"amount": "50.00", "date": "2025-04-10", "reference": "chk-1"})
    assert part.status_code == 201 and part.json()["invoice"]["paymentStatus"] == "partially-paid"
    again = await api(billing).post(url, json={"amount": "50.00", "date": "2025-04-10", "reference": "chk-1"})
    assert again.json()["invoice"]["balance"] == "25.33"  # the same reference is not counted twice
    billing.state["clock"].now = datetime(2025, 5, 10, 12, tzinfo=UTC)  # past the 30 due days
    assert (await run_once(billing))["overdue"] == 1
    listed = await api(billing).get("/v1/practices/alpha/invoices", params={"status": "overdue"})
    assert [x["id"] for x in listed.json()["invoices"]] == [inv["id"]]
    paid = await api(billing).post(url, json={"amount": "25.33", "date": "2025-05-10"})
    assert paid.json()["invoice"]["status"] == "balanced"
    read = (await api(billing).get(f"/fhir/Invoice/{inv['id']}")).json()
    assert read["status"] == "balanced"
    assert [e["data"]["status"] for e in await outboxed(billing, "billing.payment.recorded.v1")] == [
        "partially-paid", "balanced"]
    paid_events = await outboxed(billing, "billing.invoice.paid.v1")
    overdue = await outboxed(billing, "billing.invoice.overdue.v1")
    issued = (await outboxed(billing, "billing.invoice.issued.v1"))[0]["data"]["invoice"]
    assert len(paid_events) == 1 and len(overdue) == 1
    # Every later event and read carries the lines the Invoice was issued with.
    assert len(issued["lineItem"]) == 2
    assert unserved(read) == paid_events[0]["data"]["invoice"] == {**issued, "status": "balanced"}
    assert list(unserved(read)) == list(issued) and read["meta"]["versionId"] == "2"
    assert overdue[0]["data"]["invoice"] == issued


async def test_concurrent_payments_of_an_invoice_count_once_each_and_never_overpay(billing):
    """Payments at the same time each see the balance the one before left: the invoice is never
    paid beyond its total, a repeated reference is one payment, and `paid` is the sum of the
    payments stored (each added its amount to the same old balance before)."""
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    url = f"/v1/invoices/{inv['id']}/payments"
    same = await asyncio.gather(*(api(billing).post(url, json={
        "amount": "10.00", "date": "2025-04-10", "reference": "chk-1"}) for _ in range(4)))
    # One records it (201), the others answer that payment again (200, nothing recorded).
    assert sorted(r.status_code for r in same) == [200, 200, 200, 201]
    assert len({r.json()["payment"]["id"] for r in same}) == 1
    split = await asyncio.gather(*(api(billing).post(url, json={
        "amount": "30.00", "date": "2025-04-10", "reference": f"ach-{n}"}) for n in range(4)))
    assert sorted(r.status_code for r in split) == [201, 201, 422, 422]  # 75.33 - 10: two fit
    async with billing.db.engine.connect() as conn:
        amounts = (await conn.execute(select(orm.payments.c.amount).where(
            orm.payments.c.invoice_id == inv["id"]))).scalars().all()
        paid = (await conn.execute(select(orm.invoices.c.paid).where(
            orm.invoices.c.id == inv["id"]))).scalar_one()
    assert sorted(amounts) == ["10.00", "30.00", "30.00"] and paid == "70.00"


async def test_a_payment_reference_with_a_lone_surrogate_is_422(billing):
    """JSON may escape a lone surrogate, which no database encodes: refused with the request
    (here by the body's model), 422, never echoed."""
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    r = await billing.state["client"].post(
        f"/v1/invoices/{inv['id']}/payments",
        content='{"amount": "1.00", "date": "2025-04-10", "reference": "Jane\\ud800Doe"}',
        headers={"Authorization": f"Bearer {billing.state['tokens']['alpha']}",
                 "Content-Type": "application/json"})
    assert r.status_code == 422 and "Jane" not in r.text, r.text
    assert r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("amount", ["1e30", "9" * 40, "1E+100", " 1.00", "1_000", "１２", "+5",
                                    "1.", ".5", "1.005", "0.00", 12])
async def test_a_payment_amount_is_digits_with_two_decimals_at_most(billing, amount):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    r = await api(billing).post(f"/v1/invoices/{inv['id']}/payments",
                                json={"amount": amount, "date": "2025-04-10"})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("day", ["0001-01-01", "2025-02-28", "9999-12-31", 1744243200])
async def test_a_payment_dated_before_its_month_a_year_ahead_or_as_a_number_is_refused(billing,
                                                                                        day):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    r = await api(billing).post(f"/v1/invoices/{inv['id']}/payments",
                                json={"amount": "1.00", "date": day})
    assert r.status_code == 422, r.text
    ok = await api(billing).post(f"/v1/invoices/{inv['id']}/payments",
                                 json={"amount": "1.00", "date": "2025-03-01"})
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize("month", ["2024-12", "1900-01", "9999-12", "２０２５-03"])
async def test_a_month_no_billing_rules_cover_is_refused_on_every_read(billing, month):
    """Nothing before the earliest rules' year can be decided (reads of it answered 500), and
    9999-12 has no next month for its last day."""
    await march_practice(billing)
    for path in (f"/v1/practices/alpha/billing-periods/{month}/worklist",
                 f"/v1/practices/alpha/billing-periods/{month}/report.json",
                 f"/v1/practices/alpha/patients/p1/time-log?month={month}",
                 f"/v1/practices/alpha/patients/p1/audit-packet?from={month}"):
        r = await api(billing).get(path)
        assert r.status_code == 422, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert (await api(billing).post(
        f"/v1/practices/alpha/billing-periods/{month}/close")).status_code == 422


async def test_an_invoice_stored_whole_before_billing_0016_reads_and_pays_as_before(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    issued = (await outboxed(billing, "billing.invoice.issued.v1"))[0]["data"]["invoice"]
    i = orm.invoices
    async with billing.db.unit_of_work() as uow:  # as the code before billing_0016 stored it
        await uow.session.execute(update(i).where(i.c.id == inv["id"]).values(
            resource=json.dumps(issued), lines_in_place=False))
        await uow.commit()
    assert unserved((await api(billing).get(f"/fhir/Invoice/{inv['id']}")).json()) == issued
    assert [unserved(e["resource"]) for e in
            (await api(billing).get("/fhir/Invoice")).json()["entry"]] == [issued]
    paid = await api(billing).post(f"/v1/invoices/{inv['id']}/payments",
                                   json={"amount": inv["totalNet"], "date": "2025-04-10"})
    assert paid.status_code == 201
    event = (await outboxed(billing, "billing.invoice.paid.v1"))[0]["data"]["invoice"]
    assert event == {**issued, "status": "balanced"}
    async with billing.db.unit_of_work() as uow:
        row = (await uow.session.execute(select(i.c.resource, i.c.lines_in_place)
                                         .where(i.c.id == inv["id"]))).one()
    assert not row.lines_in_place and json.loads(row.resource) == event  # still stored whole


@pytest.mark.parametrize("correction", ["encounter", "consent", "care-plan"])
async def test_a_correction_after_close_cancels_and_reissues(billing, correction):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    first = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()
    event = {
        "encounter": ev.time_reversed("alpha", "p1", "e2"),
        "consent": ev.consent("alpha", "p1", "c-p1", status="entered-in-error", version=2),
        "care-plan": ev.care_plan("alpha", "p1", "cp-p1", status="entered-in-error", version=2),
    }[correction]
    await deliver(billing, event, event)  # delivered twice: one cancel, one reissue
    old = (await api(billing).get(f"/v1/invoices/{first['invoice']['id']}")).json()
    assert old["status"] == "cancelled" and old["cancelReason"].startswith("corrected:")
    cancelled = await outboxed(billing, "billing.invoice.cancelled.v1")
    assert len(cancelled) == 1 and cancelled[0]["data"]["replacedBy"] == old["replacedBy"]
    issued = await outboxed(billing, "billing.invoice.issued.v1")
    # The cancelled Invoice keeps the lines it was issued with, in its event and when read.
    first_lines = issued[0]["data"]["invoice"]["lineItem"]
    assert cancelled[0]["data"]["invoice"]["lineItem"] == first_lines
    fhir_old = (await api(billing).get(f"/fhir/Invoice/{old['id']}")).json()
    assert unserved(fhir_old) == cancelled[0]["data"]["invoice"]
    assert fhir_old["status"] == "cancelled" and fhir_old["meta"]["versionId"] == "2"
    assert list(unserved(fhir_old)) == list(cancelled[0]["data"]["invoice"])
    if correction == "encounter":
        new = (await api(billing).get(f"/v1/invoices/{old['replacedBy']}")).json()
        assert new["replaces"] == old["id"] and new["revision"] == 1 and new["totalNet"] == "42.00"
        assert len(issued) == 2 and issued[1]["data"]["replaces"] == old["id"]
        fhir_new = (await api(billing).get(f"/fhir/Invoice/{new['id']}")).json()
        Invoice.model_validate(fhir_new)
        assert unserved(fhir_new) == issued[1]["data"]["invoice"]
        assert len(fhir_new["lineItem"]) == 1
        assert fhir_new["identifier"][0]["value"] == "alpha:2025-03:r1"
        # A search reads the lines of all its Invoices at once: each as read alone.
        found = (await api(billing).get("/fhir/Invoice")).json()["entry"]
        assert [e["resource"] for e in found] == [fhir_old, fhir_new]
    else:  # nothing billable is left: cancelled without a replacement
        assert old["replacedBy"] is None and len(issued) == 1
    report = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/report.json")).json()
    assert report["totals"]["amount"] == ("42.00" if correction == "encounter" else "0.00")


@pytest.mark.parametrize(("payment", "balance", "status", "payment_status"), [
    ("20.00", "22.00", "issued", "partially-paid"),  # the replacement is owed the rest
    ("42.00", "0.00", "balanced", "balanced"),         # paid in full by what was paid
    ("50.00", "-8.00", "balanced", "balanced"),        # paid beyond the corrected total: owed back
])
async def test_a_corrected_invoice_carries_its_payments_into_the_replacement(
        billing, payment, balance, status, payment_status):
    """A payment, then a correction that reissues the month: the replacement was issued unpaid
    (the practice billed again, then dunned as overdue, for what it had paid)."""
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    pay = {"amount": payment, "date": "2025-04-10", "reference": "chk-1"}
    assert (await api(billing).post(f"/v1/invoices/{inv['id']}/payments", json=pay)).status_code == 201
    await deliver(billing, ev.time_reversed("alpha", "p1", "e2"))  # 75.33 → 42.00
    old = (await api(billing).get(f"/v1/invoices/{inv['id']}")).json()
    assert (old["status"], old["paid"], old["balance"]) == ("cancelled", payment, "0.00")
    new = (await api(billing).get(f"/v1/invoices/{old['replacedBy']}")).json()
    assert (new["totalNet"], new["paid"], new["balance"]) == ("42.00", payment, balance)
    assert (new["status"], new["paymentStatus"]) == (status, payment_status)
    assert [(x["amount"], x["date"], x["reference"], x["carriedFrom"]) for x in new["payments"]] == [
        (payment, "2025-04-10", "chk-1", old["payments"][0]["id"])]
    assert old["payments"][0]["carriedFrom"] is None
    # The practice's system sending chk-1 again, to the replacement, records nothing more.
    again = await api(billing).post(f"/v1/invoices/{new['id']}/payments", json=pay)
    assert again.status_code == 200 and again.json()["invoice"]["paid"] == payment
    issued = (await outboxed(billing, "billing.invoice.issued.v1"))[-1]["data"]
    assert (issued["invoiceId"], issued["paid"], issued["balance"], issued["status"]) == (
        new["id"], payment, balance, status)
    cancelled = (await outboxed(billing, "billing.invoice.cancelled.v1"))[0]["data"]
    assert (cancelled["paid"], cancelled["balance"]) == (payment, "0.00")
    assert (await api(billing).get(f"/fhir/Invoice/{new['id']}")).json()["status"] == status
    paid = [e["data"]["invoiceId"] for e in await outboxed(billing, "billing.invoice.paid.v1")]
    assert paid == ([new["id"]] if status == "balanced" else [])
    billing.state["clock"].now = datetime(2025, 6, 1, 12, tzinfo=UTC)  # past the due days
    assert (await run_once(billing))["overdue"] == (1 if status == "issued" else 0)


async def test_a_paid_invoice_a_correction_leaves_nothing_to_bill_is_owed_back(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    await api(billing).post(f"/v1/invoices/{inv['id']}/payments",
                            json={"amount": "75.33", "date": "2025-04-10"})
    await deliver(billing, ev.consent("alpha", "p1", "c-p1", status="entered-in-error", version=2))
    old = (await api(billing).get(f"/v1/invoices/{inv['id']}")).json()
    assert (old["status"], old["replacedBy"], old["paid"], old["balance"]) == (
        "cancelled", None, "75.33", "-75.33")
    cancelled = (await outboxed(billing, "billing.invoice.cancelled.v1"))[0]["data"]
    assert (cancelled["paid"], cancelled["balance"]) == ("75.33", "-75.33")


async def test_time_logged_after_close_is_not_billed_and_flagged(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    await deliver(billing, ev.time_logged("alpha", "p2", "late-1", 600, "2025-03-30T10:00:00-04:00"))
    doc = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/recompute",
                                   json={"reason": "check"})).json()
    assert doc == {"month": "2025-03", "reissued": False}
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    p2 = next(x for x in rows["patients"] if x["patient"] == "Patient/p2")
    assert p2["codes"] == {} and "backdated-entry" in p2["warnings"]


async def test_same_mbi_in_two_practices_is_flagged_in_both_until_released(billing):
    await deliver(billing, *ev.enrolled_patient("alpha", "pa", mbi="1EG4TE5MK73"),
                  *ev.enrolled_patient("beta", "pb", mbi="1EG4TE5MK73"),
                  ev.role("alpha", "nurse-1", "clinical-staff"), ev.role("beta", "nurse-1", "clinical-staff"),
                  ev.time_logged("alpha", "pa", "ea", 1800, "2025-03-03T10:00:00-05:00"),
                  ev.time_logged("beta", "pb", "eb", 1800, "2025-03-04T10:00:00-06:00"))
    a = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    b = (await api(billing, "beta").get("/v1/practices/beta/billing-periods/2025-03/worklist")).json()
    assert a["patients"][0]["blockers"] == ["duplicate-biller"]
    assert b["patients"][0]["blockers"] == ["duplicate-biller"]
    r = await api(billing, "beta").post("/v1/practices/beta/billing-periods/2025-03/duplicates/pb/resolve",
                                        json={"decision": "release"})
    assert r.status_code == 200
    a = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    b = (await api(billing, "beta").get("/v1/practices/beta/billing-periods/2025-03/worklist")).json()
    assert a["patients"][0]["codes"] == {"99490": 1}
    assert b["patients"][0]["blockers"] == ["duplicate-biller"]
    # A release taken back raises the flag in both practices again.
    r = await api(billing, "beta").post("/v1/practices/beta/billing-periods/2025-03/duplicates/pb/resolve",
                                        json={"decision": "reclaim"})
    assert r.status_code == 200, r.text
    a = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert a["patients"][0]["blockers"] == ["duplicate-biller"]
    again = await api(billing, "beta").post(
        "/v1/practices/beta/billing-periods/2025-03/duplicates/pb/resolve", json={"decision": "reclaim"})
    assert again.status_code == 409 and "nothing to reclaim" in again.json()["detail"]


async def test_a_patient_no_other_practice_bills_cannot_be_released(billing):
    """A walkthrough released a patient with no duplicate: 200, and the patient was blocked as
    duplicate-biller for good, billed by no one."""
    await march_practice(billing)
    path = "/v1/practices/alpha/billing-periods/2025-03/duplicates/p2/resolve"
    r = await api(billing).post(path, json={"decision": "release"})
    assert r.status_code == 409, r.text
    assert "not flagged duplicate-biller" in r.json()["detail"]
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    p2 = next(x for x in rows["patients"] if x["patient"] == "Patient/p2")
    assert "duplicate-biller" not in p2["blockers"]
    assert (await api(billing).post(path, json={"decision": "reclaim"})).status_code == 409


async def test_threshold_alerts_at_7_and_3_days_once_each(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 3, 20, 15, tzinfo=UTC)  # 11 days left
    assert (await run_once(billing))["alerts"] == 0
    billing.state["clock"].now = datetime(2025, 3, 24, 15, tzinfo=UTC)  # 7 days left
    assert (await run_once(billing))["alerts"] == 1
    assert (await run_once(billing))["alerts"] == 0
    billing.state["clock"].now = datetime(2025, 3, 28, 15, tzinfo=UTC)  # 3 days left
    assert (await run_once(billing))["alerts"] == 1
    sent = await outboxed(billing, "billing.threshold.at-risk.v1")
    assert [(e["data"]["patient"], e["data"]["daysLeft"], e["data"]["minutesToNext"]) for e in sent] == [
        ("Patient/p2", 7, 1), ("Patient/p2", 3, 1)]


async def test_other_practices_data_is_not_found(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    inv = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    beta = api(billing, "beta")
    assert (await beta.get("/v1/practices/alpha/billing-periods/2025-03/worklist")).status_code == 404
    assert (await beta.post("/v1/practices/alpha/billing-periods/2025-03/close")).status_code == 404
    missing = await beta.get(f"/fhir/Invoice/{inv['id']}")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"
    assert (await beta.get(f"/v1/invoices/{inv['id']}")).status_code == 404
    assert (await beta.get("/fhir/ChargeItem", params={"subject": "Patient/p1"})).json()["total"] == 0
    assert (await beta.get("/fhir/Invoice", params={"recipient": "Organization/alpha"})).json()["total"] == 0


@pytest.mark.parametrize("month", ["2025-13", "march", "2025-3"])
async def test_bad_month_is_a_clear_422(billing, month):
    r = await api(billing).get(f"/v1/practices/alpha/billing-periods/{month}/worklist")
    assert r.status_code == 422 and "yyyy-mm" in r.json()["detail"]


async def test_per_code_contract_without_a_rate_refuses_to_close(billing):
    await deliver(billing, *ev.enrolled_patient("alpha", "p1"), ev.role("alpha", "nurse-1", "clinical-staff"),
                  ev.time_logged("alpha", "p1", "e1", 1900, "2025-03-03T10:00:00-05:00",
                                 practitioner="Practitioner/doc-1", role=None,
                                 role_codes=[{"system": "http://nucc.org/provider-taxonomy",
                                              "code": "207Q00000X"}]))
    from sqlalchemy import update
    from ccm_shared.tables import practices

    async with billing.db.engine.begin() as conn:
        await conn.execute(update(practices).where(practices.c.id == "alpha").values(
            pricing=json.dumps({"model": "per-code", "rates": {"99490": "40"}})))
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    r = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert r.status_code == 422 and "99491" in r.json()["detail"]
    async with billing.db.unit_of_work() as uow:  # nothing was written
        assert (await uow.session.execute(select(orm.billing_periods))).first() is None


async def test_g0506_with_its_visit_and_a_reversed_visit_reissues(billing, monkeypatch):
    """p4 consents at an office visit on 2 March: the month bills 99490 and G0506 (dated and
    supported by the visit). A routine visit later changes nothing; the initiating visit entered
    in error cancels the Invoice and reissues it without G0506."""
    await deliver(billing, *ev.enrolled_patient("alpha", "p4")[:-1],
                  ev.consent("alpha", "p4", "c-p4", obtained="2025-03-02T11:00:00-05:00",
                             version=2),
                  ev.visit("alpha", "p4", "visit-1", day="2025-03-02"),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  ev.time_logged("alpha", "p4", "e9", 1800, "2025-03-05T10:00:00-05:00"))
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    (p4,) = rows["patients"]
    assert p4["codes"] == {"99490": 1, "G0506": 1} and p4["warnings"] == []
    assert p4["explanation"]["initiatingVisit"] == {"encounter": "Encounter/visit-1",
                                                    "date": "2025-03-02"}
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    first = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()
    assert first["invoice"]["totalNet"] == "87.00"  # 42.00 + 45.00
    items = (await api(billing).get("/fhir/ChargeItem", params={"subject": "Patient/p4"})).json()
    g0506 = next(e["resource"] for e in items["entry"]
                 if e["resource"]["code"]["coding"][0]["code"] == "G0506")
    ChargeItem.model_validate(g0506)
    assert g0506["occurrenceDateTime"] == "2025-03-02"
    assert g0506["supportingInformation"] == [{"reference": "Encounter/visit-1"}]
    assert g0506["code"]["coding"][0]["system"] == (
        "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets")

    recomputed = []
    original = corrections.recompute_patient_months

    async def spy(uow, practice, patient, reason, now, **kw):
        recomputed.append(reason)
        await original(uow, practice, patient, reason, now, **kw)

    monkeypatch.setattr(corrections, "recompute_patient_months", spy)
    await deliver(billing, ev.visit("alpha", "p4", "routine", day="2025-03-20"),
                  ev.visit("alpha", "p4", "long-ago", day="2024-03-01"),
                  ev.visit("alpha", "p4", "visit-1", day="2025-03-02", version=5))
    # After the consent, or more than 12 months before it, a visit initiates nothing; a new
    # version of the initiating visit that changes nothing it says changes no decision.
    assert recomputed == []
    old = (await api(billing).get(f"/v1/invoices/{first['invoice']['id']}")).json()
    assert old["status"] == "issued"

    reversal = ev.visit("alpha", "p4", "visit-1", day="2025-03-02", version=6,
                        reason="entered-in-error")
    await deliver(billing, reversal, reversal)
    old = (await api(billing).get(f"/v1/invoices/{first['invoice']['id']}")).json()
    assert old["status"] == "cancelled" and old["cancelReason"] == (
        "corrected: Encounter/visit-1 entered-in-error")
    assert recomputed == ["Encounter/visit-1 entered-in-error"]  # the duplicate is not applied
    new = (await api(billing).get(f"/v1/invoices/{old['replacedBy']}")).json()
    assert new["totalNet"] == "42.00"
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    (p4,) = rows["patients"]
    assert p4["codes"] == {"99490": 1} and p4["warnings"] == ["initiating-visit-missing"]


async def test_time_early_on_the_first_counts_in_its_month_on_the_embedded_database(billing):
    """02:00 New York time on 1 March is 07:00 UTC: March. SQLite keeps no offsets; the embedded
    database stores instants in UTC, so the time is not read back as 1 March 02:00 UTC (which
    is still February in New York)."""
    await deliver(billing, *ev.enrolled_patient("alpha", "p5"),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  ev.time_logged("alpha", "p5", "night", 1300, "2025-03-01T02:00:00-05:00"))
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    (p5,) = rows["patients"]
    assert p5["codes"] == {"99490": 1} and p5["explanation"]["notCounted"] == []


async def _close_march(billing):
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    closed = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert closed.status_code == 200, closed.text
    return closed.json()["invoice"]


async def _consented_on_march_2(billing, patient, **visit):
    """``patient`` consents on 2 March (time on the 5th); ``visit`` given: its visit that day."""
    await deliver(billing, *ev.enrolled_patient("alpha", patient)[:-1],
                  ev.consent("alpha", patient, f"c-{patient}", obtained="2025-03-02T11:00:00-05:00",
                             version=2),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  ev.time_logged("alpha", patient, f"e-{patient}", 1800,
                                 "2025-03-05T10:00:00-05:00"))
    if visit:
        await deliver(billing, ev.visit("alpha", patient, visit["vid"], day="2025-03-02"))


async def _g0506_items(billing, patient):
    items = (await api(billing).get("/fhir/ChargeItem", params={"subject": f"Patient/{patient}"})).json()
    return [e["resource"] for e in items.get("entry", [])
            if e["resource"]["code"]["coding"][0]["code"] == "G0506"]


@pytest.mark.parametrize("order", ["reversal first", "visit first"])
async def test_a_visit_moved_to_another_patient_follows_it_in_either_order(billing, order):
    """Ingest reports an Encounter moved from p4 to p9 as a reversal for p4 and a visit for p9,
    of the same source version, on different partitions: any order ends with p9's visit."""
    await _consented_on_march_2(billing, "p4", vid="v1")
    await _consented_on_march_2(billing, "p9")
    moved = [ev.visit("alpha", "p4", "v1", day="2025-03-02", version=2, reason="not-a-visit"),
             ev.visit("alpha", "p9", "v1", day="2025-03-02", version=2)]
    await deliver(billing, *(moved if order == "reversal first" else moved[::-1]))
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    by = {r["patient"]: r for r in rows["patients"]}
    assert by["Patient/p9"]["codes"] == {"99490": 1, "G0506": 1}
    assert by["Patient/p9"]["explanation"]["initiatingVisit"]["encounter"] == "Encounter/v1"
    assert by["Patient/p4"]["codes"] == {"99490": 1}
    assert by["Patient/p4"]["warnings"] == ["initiating-visit-missing"]


async def test_a_moved_visit_reissues_the_closed_month_of_the_patient_it_left(billing):
    await _consented_on_march_2(billing, "p4", vid="v1")
    await _consented_on_march_2(billing, "p9")
    first = await _close_march(billing)
    assert first["totalNet"] == "129.00"  # 42.00 + 42.00 + G0506 45.00 for p4
    await deliver(billing, ev.visit("alpha", "p4", "v1", day="2025-03-02", version=2,
                                    reason="not-a-visit"),
                  ev.visit("alpha", "p9", "v1", day="2025-03-02", version=2))
    # Two corrections, two reissues: without p4's G0506 (84.00), then with p9's (129.00).
    chain = [(await api(billing).get(f"/v1/invoices/{first['id']}")).json()]
    while chain[-1]["replacedBy"]:
        chain.append((await api(billing).get(f"/v1/invoices/{chain[-1]['replacedBy']}")).json())
    assert [(i["status"], i["totalNet"]) for i in chain] == [
        ("cancelled", "129.00"), ("cancelled", "84.00"), ("issued", "129.00")]
    assert [i["status"] for i in await _g0506_items(billing, "p4")] == ["entered-in-error"]
    assert [i["status"] for i in await _g0506_items(billing, "p9")] == ["billable"]


async def test_a_changed_initiating_visit_reissues_the_g0506_charge_item(billing):
    """Two visits before the consent; the later one (2 March) initiated it and was billed; once
    it is entered in error, the 1 March one did: same amount, another day and Encounter."""
    await _consented_on_march_2(billing, "p4", vid="v1")
    await deliver(billing, ev.visit("alpha", "p4", "v0", day="2025-03-01"))
    first = await _close_march(billing)
    assert [(i["occurrenceDateTime"], i["supportingInformation"])
            for i in await _g0506_items(billing, "p4")] == [
        ("2025-03-02", [{"reference": "Encounter/v1"}])]
    await deliver(billing, ev.visit("alpha", "p4", "v1", day="2025-03-02", version=2,
                                    reason="entered-in-error"))
    old = (await api(billing).get(f"/v1/invoices/{first['id']}")).json()
    assert old["status"] == "cancelled"
    new = (await api(billing).get(f"/v1/invoices/{old['replacedBy']}")).json()
    assert new["totalNet"] == first["totalNet"] == "87.00"
    current = [i for i in await _g0506_items(billing, "p4") if i["status"] == "billable"]
    assert [(i["occurrenceDateTime"], i["supportingInformation"]) for i in current] == [
        ("2025-03-01", [{"reference": "Encounter/v0"}])]


async def test_a_visit_recorded_again_unblocks_a_closed_month_where_the_practice_blocks(billing):
    """Where a missing initiating visit blocks, a visit reversed after close blocks the month
    (cancelled), and recorded again bills it again: the outcome follows the facts, not their
    history."""
    async with billing.db.unit_of_work() as uow:
        await uow.session.execute(update(practices).where(practices.c.id == "alpha").values(
            pricing=json.dumps({**json.loads(PRICING.to_json()),
                                "rules": {"initiating_visit_missing": "blocker"}})))
        await uow.commit()
    await _consented_on_march_2(billing, "p4", vid="v1")
    first = await _close_march(billing)
    assert first["totalNet"] == "87.00"
    await deliver(billing, ev.visit("alpha", "p4", "v1", day="2025-03-02", version=2,
                                    reason="entered-in-error"))
    old = (await api(billing).get(f"/v1/invoices/{first['id']}")).json()
    assert old["status"] == "cancelled" and old["replacedBy"] is None
    await deliver(billing, ev.visit("alpha", "p4", "v1", day="2025-03-02", version=3))
    report = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/report.json")).json()
    assert report["totals"]["amount"] == "87.00"


@pytest.mark.parametrize("order", ["consent first", "visit first"])
async def test_a_correction_changes_only_the_patients_it_concerns(billing, order):
    """After close, p2's consent arrives late (it bills nothing retroactively) and the contract
    changes; then p4's initiating visit is entered in error. Whatever the order, only p4's
    lines change, priced with the contract the month closed under (not the new rate: one
    Invoice never prices a code twice); p1 keeps what it was billed and p2 stays blocked: a
    closed month never depends on the order unrelated events came in. The explicit recompute
    then decides and prices the whole month with today's facts and contract."""
    await deliver(billing, *ev.enrolled_patient("alpha", "p1"),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  ev.time_logged("alpha", "p1", "e1", 1500, "2025-03-03T10:00:00-05:00"),
                  ev.patient("alpha", "p2"), ev.care_plan("alpha", "p2", "cp-p2"),
                  ev.condition("alpha", "p2", "k1-p2"), ev.condition("alpha", "p2", "k2-p2"),
                  ev.time_logged("alpha", "p2", "e2", 1500, "2025-03-04T10:00:00-05:00"))
    await _consented_on_march_2(billing, "p4", vid="v1")
    first = await _close_march(billing)
    assert first["totalNet"] == "129.00"  # p1 42.00, p4 42.00 + 45.00; p2 has no consent
    async with billing.db.unit_of_work() as uow:
        await uow.session.execute(update(practices).where(practices.c.id == "alpha").values(
            pricing=json.dumps({**json.loads(PRICING.to_json()),
                                "rates": {**json.loads(PRICING.to_json())["rates"],
                                          "99490": "50.00"}})))
        await uow.commit()
    late_consent = ev.consent("alpha", "p2", "c-p2", obtained="2025-03-01T09:00:00-05:00")
    reversal = ev.visit("alpha", "p4", "v1", day="2025-03-02", version=2,
                        reason="entered-in-error")
    await deliver(billing, *((late_consent, reversal) if order == "consent first"
                             else (reversal, late_consent)))
    old = (await api(billing).get(f"/v1/invoices/{first['id']}")).json()
    assert old["status"] == "cancelled"
    new = (await api(billing).get(f"/v1/invoices/{old['replacedBy']}")).json()
    assert new["status"] == "issued" and new["totalNet"] == "84.00"  # p1 42.00 + p4 42.00
    report = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/report.json")).json()
    by = {p["patient"]: p for p in report["patients"]}
    assert by["Patient/p1"]["amount"] == "42.00" and by["Patient/p4"]["amount"] == "42.00"
    assert by["Patient/p2"]["amount"] == "0.00" and by["Patient/p2"]["codes"] == {}
    period = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert {r["patient"] for r in period["patients"] if r["billable"]} == {
        "Patient/p1", "Patient/p4"}
    again = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/recompute",
                                    json={"reason": "contract amended for March"})
    assert again.status_code == 200, again.text
    # The whole month from today's facts and contract: p1, p2 (its late consent) and p4 at 50.00.
    assert (await _invoice_chain(billing, first["id"]))[-1] == ("issued", "150.00")
    # Those terms are the month's now: p2's next correction (more minutes, same code) keeps
    # 50.00, so the lines stand and nothing is reissued.
    await deliver(billing, ev.time_logged("alpha", "p2", "e2", 1600, "2025-03-04T10:00:00-05:00",
                                          version=2))
    assert (await _invoice_chain(billing, first["id"]))[-1] == ("issued", "150.00")
    assert len(await _invoice_chain(billing, first["id"])) == 3


async def test_a_close_whose_invoice_kafka_cannot_take_is_refused_and_writes_nothing(
        billing, monkeypatch):
    """A close's events over what an event may take (16 MiB less room for key and headers; made
    small here): a clear 422, the month stays open, nothing is written, and closing again once
    they fit works."""
    from ccm_shared import outbox

    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    monkeypatch.setattr(outbox, "MAX_EVENT_BYTES", 300)
    refused = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "bytes of JSON" in refused.json()["detail"]
    rows = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert rows["period"] == "open"
    assert await outboxed(billing, "billing.invoice.issued.v1") == []
    assert (await api(billing).get("/v1/practices/alpha/invoices")).json()["invoices"] == []
    monkeypatch.undo()
    closed = await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert closed.status_code == 200 and closed.json()["invoice"]["totalNet"] == "75.33"


async def _invoice_chain(billing, first_id):
    chain = [(await api(billing).get(f"/v1/invoices/{first_id}")).json()]
    while chain[-1]["replacedBy"]:
        chain.append((await api(billing).get(f"/v1/invoices/{chain[-1]['replacedBy']}")).json())
    return [(i["status"], i["totalNet"]) for i in chain]


async def test_a_consent_moved_to_another_patient_corrects_the_patient_it_left(billing):
    await _consented_on_march_2(billing, "p4", vid="v4")
    await _consented_on_march_2(billing, "p9", vid="v9")
    first = await _close_march(billing)
    assert first["totalNet"] == "174.00"  # two patients, each 99490 + G0506
    # p4's consent turns out to be p9's (and revoked): p4 has no consent in March.
    await deliver(billing, ev.consent("alpha", "p9", "c-p4", obtained="2025-03-02T11:00:00-05:00",
                                      status="inactive", effective_until="2025-03-31", version=3))
    assert await _invoice_chain(billing, first["id"]) == [("cancelled", "174.00"),
                                                          ("issued", "87.00")]


async def test_a_visit_moved_in_one_event_reissues_once_never_billing_it_twice(billing):
    """A newer version puts the initiating visit on another patient in one event (no reversal
    seen first): one replacement, where G0506 moved with it, never one billing it to both."""
    await _consented_on_march_2(billing, "p4", vid="v1")
    await _consented_on_march_2(billing, "p9")
    first = await _close_march(billing)
    await deliver(billing, ev.visit("alpha", "p9", "v1", day="2025-03-02", version=2))
    assert await _invoice_chain(billing, first["id"]) == [("cancelled", "129.00"),
                                                          ("issued", "129.00")]
    assert [i["status"] for i in await _g0506_items(billing, "p9")] == ["billable"]


async def test_a_visit_dated_out_of_the_lookback_is_no_longer_the_initiating_one(billing):
    await _consented_on_march_2(billing, "p4", vid="v1")
    first = await _close_march(billing)
    assert first["totalNet"] == "87.00"
    await deliver(billing, ev.visit("alpha", "p4", "v1", day="2023-06-01", version=2))
    assert await _invoice_chain(billing, first["id"]) == [("cancelled", "87.00"),
                                                          ("issued", "42.00")]


async def test_a_correction_that_leaves_the_lines_updates_the_month_summary(billing):
    """55 minutes, one 10-minute call entered in error: still 99490 + 99439 (no reissue), but
    the month's summary counts 45 minutes, as a repeated close answers."""
    await deliver(billing, *ev.enrolled_patient("alpha", "p1"),
                  ev.role("alpha", "nurse-1", "clinical-staff", practitioner="Practitioner/nurse-1"),
                  ev.time_logged("alpha", "p1", "a", 1500, "2025-03-03T10:00:00-05:00"),
                  ev.time_logged("alpha", "p1", "b", 1200, "2025-03-10T10:00:00-04:00"),
                  ev.time_logged("alpha", "p1", "c", 600, "2025-03-17T10:00:00-04:00"))
    first = await _close_march(billing)
    assert first["totalNet"] == "75.33"
    await deliver(billing, ev.time_reversed("alpha", "p1", "c"))
    assert await _invoice_chain(billing, first["id"]) == [("issued", "75.33")]
    again = (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")).json()
    assert again["summary"]["minutes"] == {"staff": 45, "practitioner": 0}
    assert again["invoice"]["id"] == first["id"]


async def test_a_correction_reissues_when_only_the_billing_practitioner_changed(billing):
    """p4's consent now names doc-2 (no correction by itself); its time entry is then revised
    (same minutes): the replacement's ChargeItems name doc-2, though amounts are unchanged."""
    await _consented_on_march_2(billing, "p4")
    first = await _close_march(billing)
    await deliver(billing, ev.consent("alpha", "p4", "c-p4", obtained="2025-03-02T11:00:00-05:00",
                                      version=3, practitioner="Practitioner/doc-2"),
                  ev.time_logged("alpha", "p4", "e-p4", 1800, "2025-03-05T10:00:00-05:00",
                                 version=2))
    assert await _invoice_chain(billing, first["id"]) == [("cancelled", "42.00"),
                                                          ("issued", "42.00")]
    items = (await api(billing).get("/fhir/ChargeItem", params={"subject": "Patient/p4"})).json()
    assert sorted((e["resource"]["status"], e["resource"]["performer"][0]["actor"]["reference"])
                  for e in items["entry"]) == [("billable", "Practitioner/doc-2"),
                                               ("entered-in-error", "Practitioner/doc-1")]


@pytest.mark.parametrize("order", ["reversal first", "entry first"])
async def test_time_moved_out_of_a_closed_month_leaves_it_in_either_order(billing, order):
    """The EHR corrects an Encounter's date from 17 March to 2 April after March closed. Ingest
    reports it as a reversal for March and an entry for April, of one source version, in either
    order: March is reissued without it and April counts it."""
    await march_practice(billing)
    first = await _close_march(billing)
    assert first["totalNet"] == "75.33"  # p1: 25 + 20 minutes
    moved = [ev.time_reversed("alpha", "p1", "e2", version=2, reason="moved", month="2025-03"),
             ev.time_logged("alpha", "p1", "e2", 1200, "2025-04-02T10:00:00-04:00", version=2)]
    await deliver(billing, *(moved if order == "reversal first" else moved[::-1]))
    assert await _invoice_chain(billing, first["id"]) == [("cancelled", "75.33"),
                                                          ("issued", "42.00")]
    april = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-04/worklist")).json()
    p1 = next(r for r in april["patients"] if r["patient"] == "Patient/p1")
    assert p1["seconds"]["staff"] == 1200 and "e2" in p1["explanation"]["counted"]


@pytest.mark.parametrize("order", ["out, then back", "back, then out"])
async def test_time_moved_out_of_its_closed_month_and_back_is_the_filed_entry_again(billing, order):
    """Billed in March, moved to April (v2), then back to 17 March (v3): in any delivery order
    of the two moves it is March's filed entry again, not time logged after the close."""
    await march_practice(billing)
    first = await _close_march(billing)
    out = [ev.time_reversed("alpha", "p1", "e2", version=2, reason="not-ccm", month="2025-03"),
           ev.time_logged("alpha", "p1", "e2", 1200, "2025-04-02T10:00:00-04:00", version=2)]
    back = [ev.time_reversed("alpha", "p1", "e2", version=3, reason="not-ccm", month="2025-04"),
            ev.time_logged("alpha", "p1", "e2", 1200, "2025-03-17T10:00:00-04:00", version=3)]
    await deliver(billing, *(out + back if order == "out, then back" else back + out))
    chain = await _invoice_chain(billing, first["id"])
    assert chain[-1] == ("issued", "75.33")
    async with billing.db.unit_of_work() as uow:
        row = (await uow.session.execute(select(orm.time_entries).where(
            orm.time_entries.c.entry_id == "e2"))).one()
    assert (row.month, row.status, row.late) == ("2025-03", "finished", False)


@pytest.mark.parametrize(("text", "day"), [
    ("2026-04-01T02:00:00Z", "2026-03-31"),          # 22:00 on 31 March in New York
    ("2026-03-31T22:00:00-10:00", "2026-04-01"),     # 04:00 on 1 April in New York
    ("2026-03-31", "2026-03-31"), ("2026-03", "2026-03-01"), ("2026", "2026-01-01"),
    (None, None),
    ("2026-03-15T23:59:60Z", "2026-03-15"),          # a leap second: as written
    ("9999-12-31T23:00:00-05:00", "9999-12-31"),     # past 9999 in the zone: as written
])
def test_a_care_plan_date_is_the_practice_day(text, day):
    from zoneinfo import ZoneInfo

    from ccm_billing.service_layer.common import local_day

    found = local_day(text, ZoneInfo("America/New_York"))
    assert (found.isoformat() if found else None) == day


@pytest.mark.parametrize(("text", "tz", "day"), [
    ("2026", "America/New_York", "2026-12-31"), ("2026-02", "America/New_York", "2026-02-28"),
    ("2026-02-10", "America/New_York", "2026-02-10"),
    ("2026-03-31T22:00:00-04:00", None, "2026-03-31"),  # practice unknown: as written
])
def test_the_end_of_a_period_is_the_last_day_it_names(text, tz, day):
    from zoneinfo import ZoneInfo

    from ccm_billing.service_layer.common import local_day

    assert local_day(text, ZoneInfo(tz) if tz else None, end=True).isoformat() == day


async def test_care_plan_created_in_the_practice_zone_and_its_last_review_kept(billing):
    """``created`` 2026-04-01T02:00Z is a March plan in New York (billing read 1 April: March
    had no care plan); a partial date is its first day (it had failed the event); a revision
    without review evidence keeps the last review (it had cleared it: review overdue)."""
    async def row(cid: str):
        t = orm.care_plans
        async with billing.db.engine.connect() as conn:
            return (await conn.execute(select(t.c.created, t.c.last_review).where(
                t.c.care_plan_id == cid))).one()

    await deliver(billing, ev.care_plan("alpha", "p1", "cp-z", created="2026-04-01T02:00:00Z"))
    assert str((await row("cp-z")).created) == "2026-03-31"
    await deliver(billing, ev.care_plan("alpha", "p1", "cp-m", created="2026-03"))
    assert str((await row("cp-m")).created) == "2026-03-01"
    reviewed = ev.care_plan("alpha", "p1", "cp-r", version=2)
    reviewed.data["review"] = {"date": "2026-02-10"}
    await deliver(billing, reviewed, ev.care_plan("alpha", "p1", "cp-r", version=3))
    assert str((await row("cp-r")).last_review) == "2026-02-10"


@pytest.mark.parametrize("order", [(1, 2, 3, 4), (1, 3, 2, 4), (4, 3, 2, 1), (2, 4, 3, 1)])
async def test_the_last_review_is_the_newest_versions_in_any_delivery_order(billing, order):
    """Version 4 corrects version 3's review date downwards; version 2 carries none."""
    versions = {}
    for v, review in ((1, "2025-01-10"), (2, None), (3, "2025-09-10"), (4, "2025-06-10")):
        versions[v] = ev.care_plan("alpha", "p1", "cp-o", version=v)
        if review:
            versions[v].data["review"] = {"date": review}
    await deliver(billing, *(versions[v] for v in order))
    t = orm.care_plans
    async with billing.db.engine.connect() as conn:
        found = (await conn.execute(select(t.c.last_review, t.c.version).where(
            t.c.care_plan_id == "cp-o"))).one()
    assert str(found.last_review) == "2025-06-10"
    assert found.version.endswith("4")  # the newest version is still the one applied


async def test_a_consents_period_is_kept_as_practice_days(billing):
    granted = ev.consent("alpha", "p1", "c-per")
    granted.data["period"] = {"start": "2026-01-01T03:00:00Z", "end": "2026-06-30"}
    await deliver(billing, granted)
    t = orm.consents
    async with billing.db.engine.connect() as conn:
        row = (await conn.execute(select(t.c.valid_from, t.c.valid_until).where(
            t.c.consent_id == "c-per"))).one()
    assert (str(row.valid_from), str(row.valid_until)) == ("2025-12-31", "2026-06-30")



async def test_a_completed_care_plan_keeps_the_day_it_ended(billing):
    """The day ingest says the plan was completed (kept through later edits there), in any
    delivery order; from an older ingest without completedOn, the version's day."""
    t = orm.care_plans

    async def completed_on(cid: str):
        async with billing.db.engine.connect() as conn:
            return (await conn.execute(select(t.c.completed_on).where(
                t.c.care_plan_id == cid))).scalar()

    def version(cid: str, v: int, updated: str, status: str = "completed",
                on: str | None = None):
        e = ev.care_plan("alpha", "p1", cid, status=status, version=v)
        e.data["source"]["lastUpdated"] = updated
        if on is not None:
            e.data["completedOn"] = on
        return e

    completed = version("cp-g", 2, "2025-03-10T15:00:00Z", on="2025-03-10")
    edited = version("cp-g", 3, "2025-07-20T15:00:00Z", on="2025-03-10")
    again = version("cp-g", 4, "2025-08-01T15:00:00Z", status="active")
    for order in ((completed, edited), (edited, completed)):
        await deliver(billing, *order)
        assert str(await completed_on("cp-g")) == "2025-03-10"
    await deliver(billing, again)
    assert await completed_on("cp-g") is None
    await deliver(billing, version("cp-old", 2, "2025-04-02T15:00:00Z"))  # no completedOn
    assert str(await completed_on("cp-old")) == "2025-04-02"


async def test_a_practitioners_kind_from_ingest_classifies_time_without_a_role(billing):
    """Time performed by a Practitioner (no PractitionerRole): the kind ingest gave it by the
    practice's lists wins over billing's default code sets (here: a local qualification code
    the defaults do not know). doc-1 is the consent's billing practitioner."""
    logged = ev.time_logged("alpha", "p1", "e1", 1900, "2025-03-03T10:00:00-05:00",
                            practitioner="Practitioner/doc-1", role=None,
                            role_codes=[{"system": "urn:local", "code": "MD"}])
    await deliver(billing, *ev.enrolled_patient("alpha", "p1"), logged)
    before = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert "staff-role-unknown" in before["patients"][0]["blockers"]
    logged = ev.time_logged("alpha", "p1", "e1", 1900, "2025-03-03T10:00:00-05:00",
                            practitioner="Practitioner/doc-1", role=None, version=2,
                            role_codes=[{"system": "urn:local", "code": "MD"}])
    logged.data["performers"][0]["classification"] = "billing-practitioner"
    await deliver(billing, logged)
    after = (await api(billing).get("/v1/practices/alpha/billing-periods/2025-03/worklist")).json()
    assert after["patients"][0]["codes"] == {"99491": 1}
