"""Billing's FHIR output names resources so that they resolve: a searchset's and the EHR push's
Bundle.entry.fullUrl are absolute (R4: an absolute URL, ``Invoice/inv-…`` was relative) — the
searchset's under this server's /fhir (``CCM_BILLING_FHIR_BASE_URL``, else the request's), the
push's under the EHR's base, where its PUT puts the resource — and an Invoice's recipient is the
practice by its platform id (a logical reference with its name), not ``Organization/{practice}``,
which resolved nowhere. Each Bundle validates with fhir.resources R4B."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.invoice import Invoice
from pydantic import ValidationError

from ccm_billing.service_layer.ehr import deliver_due
from ccm_billing.settings import BillingSettings
from tests.unit.billing.test_billing_flow import api, march_practice
from tests.unit.billing.test_ehr_push import Ehr

PRACTICE = "https://ccm-platform.org/fhir/sid/practice"


async def closed(billing) -> str:  # noqa: ANN001
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    return (await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
            ).json()["invoice"]["id"]


async def test_searchset_entries_have_absolute_full_urls_under_the_request_base(billing):
    invoice = await closed(billing)
    for path in ("/fhir/Invoice", "/fhir/ChargeItem"):
        doc = (await api(billing).get(path)).json()
        Bundle.model_validate(doc)
        assert doc["entry"], path
        for e in doc["entry"]:
            r = e["resource"]
            assert e["fullUrl"] == f"http://t/fhir/{r['resourceType']}/{r['id']}", e["fullUrl"]
    invoices = (await api(billing).get("/fhir/Invoice")).json()["entry"]
    assert [e["fullUrl"] for e in invoices] == [f"http://t/fhir/Invoice/{invoice}"]


async def test_a_configured_base_url_names_the_entries(billing, monkeypatch):
    await closed(billing)
    configured = BillingSettings(fhir_base_url="https://billing.example.org/fhir/")
    monkeypatch.setattr(billing, "service_settings", lambda: configured)
    doc = (await api(billing).get("/fhir/ChargeItem")).json()
    assert {e["fullUrl"].rsplit("/", 1)[0] for e in doc["entry"]} == {
        "https://billing.example.org/fhir/ChargeItem"}


def test_a_base_url_that_is_not_absolute_is_refused():
    with pytest.raises(ValidationError):
        BillingSettings(fhir_base_url="billing/fhir")


async def test_an_invoice_names_its_practice_by_identifier(billing):
    invoice = await closed(billing)
    doc = (await api(billing).get(f"/fhir/Invoice/{invoice}")).json()
    Invoice.model_validate(doc)
    assert doc["recipient"] == {"type": "Organization", "display": "Alpha Clinic",
                                "identifier": {"system": PRACTICE, "value": "alpha"}}
    assert "reference" not in doc["recipient"]


async def test_the_ehr_push_names_each_entry_at_the_ehrs_base(billing):
    await api(billing).put("/v1/practices/alpha/ehr-endpoint",
                           json={"baseUrl": "https://ehr.example.org/fhir/R4/"})
    invoice = await closed(billing)
    ehr = Ehr(200)
    now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    assert (await deliver_due(billing.db, now, transport=httpx.MockTransport(ehr)))[
        "delivered"] == 1
    bundle = json.loads(ehr.requests[-1].content)
    Bundle.model_validate(bundle)
    for e in bundle["entry"]:
        r = e["resource"]
        assert e["fullUrl"] == (f"https://ehr.example.org/fhir/R4/{r['resourceType']}/"
                                f"{r['id']}")
        assert e["request"]["url"] == f"{r['resourceType']}/{r['id']}"
    assert bundle["entry"][-1]["resource"]["id"] == invoice
    assert bundle["entry"][-1]["resource"]["recipient"]["identifier"]["value"] == "alpha"
