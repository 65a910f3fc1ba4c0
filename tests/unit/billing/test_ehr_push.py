"""Pushing Invoices and ChargeItems to a practice's EHR: queued with the Invoice, sent as a FHIR
transaction Bundle, retried with backoff, logged; a failed push never loses the Invoice."""

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from ccm_billing.service_layer.ehr import deliver_due
from tests.unit.billing.test_billing_flow import api, march_practice, unserved


class Ehr:
    """The practice's EHR as an httpx transport: answers from a script, records requests."""

    def __init__(self, *statuses):
        self.statuses = list(statuses)
        self.requests = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == "down":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(status, json={"resourceType": "Bundle", "type": "transaction-response"})


@pytest.mark.parametrize("body", [
    {"baseUrl": "https://[::1"}, {"baseUrl": "https://ehr:99999/fhir"},
    {"baseUrl": "https://ehr:abc/fhir"}, {"baseUrl": "https://user:pw@ehr/fhir"},
    {"baseUrl": "https://ehr\u0000x/fhir"}, {"baseUrl": "https://ehr/fh ir"},
    {"baseUrl": "https://ehr.example.org/fhir", "authorization": "Bearer a\r\nX-Evil: 1"},
    {"baseUrl": "https://ehr.example.org/fhir", "authorization": "Bearer \u0000"},
])
async def test_an_ehr_endpoint_that_cannot_be_called_is_refused(billing, body):
    """An unclosed IPv6 bracket answered 500; ports that are no port, credentials in the URL,
    and an authorization that would break its header line are 422 too."""
    r = await api(billing).put("/v1/practices/alpha/ehr-endpoint", json=body)
    assert r.status_code == 422, r.text
    assert (await api(billing).get("/v1/practices/alpha/ehr-endpoint")).status_code == 404


async def test_invoice_push_retries_with_backoff_and_is_logged(billing):
    a = api(billing)
    bad = await a.put("/v1/practices/alpha/ehr-endpoint", json={"baseUrl": "ftp://ehr"})
    assert bad.status_code == 422
    r = await a.put("/v1/practices/alpha/ehr-endpoint",
                    json={"baseUrl": "https://ehr.example.org/fhir/", "authorization": "Bearer s3cret"})
    assert r.json() == {"baseUrl": "https://ehr.example.org/fhir", "hasAuthorization": True}
    assert "s3cret" not in (await a.get("/v1/practices/alpha/ehr-endpoint")).text
    await march_practice(billing)
    now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    billing.state["clock"].now = now
    inv = (await a.post("/v1/practices/alpha/billing-periods/2025-03/close")).json()["invoice"]
    ehr = Ehr("down", 503, 200)
    transport = httpx.MockTransport(ehr)

    assert await deliver_due(billing.db, now, transport=transport, backoff=30) == {
        "delivered": 0, "retrying": 1, "failed": 0}
    log = (await a.get("/v1/practices/alpha/ehr-deliveries")).json()["deliveries"]
    assert log[0]["status"] == "pending" and log[0]["lastError"] == "ConnectError"
    assert (await a.get(f"/fhir/Invoice/{inv['id']}")).json()["status"] == "issued"  # never lost
    # Not due again before the backoff has passed.
    assert (await deliver_due(billing.db, now + timedelta(seconds=29), transport=transport))[
        "retrying"] == 0
    assert (await deliver_due(billing.db, now + timedelta(seconds=31), transport=transport,
                              backoff=30))["retrying"] == 1
    assert (await deliver_due(billing.db, now + timedelta(seconds=200), transport=transport))[
        "delivered"] == 1
    log = (await a.get("/v1/practices/alpha/ehr-deliveries")).json()["deliveries"]
    assert (log[0]["status"], log[0]["attempts"], log[0]["lastStatus"]) == ("delivered", 3, 200)
    sent = ehr.requests[-1]
    assert str(sent.url) == "https://ehr.example.org/fhir"
    assert sent.headers["authorization"] == "Bearer s3cret"
    bundle = json.loads(sent.content)
    assert bundle["type"] == "transaction"
    urls = [e["request"]["url"] for e in bundle["entry"]]
    assert urls[-1] == f"Invoice/{inv['id']}" and len(urls) == 3  # two ChargeItems, the Invoice
    assert all(e["request"]["method"] == "PUT" for e in bundle["entry"])
    # The Invoice whole, as issued (its row keeps it without its lines: billing_0016).
    pushed = bundle["entry"][-1]["resource"]
    assert pushed == unserved((await a.get(f"/fhir/Invoice/{inv['id']}")).json())
    assert sorted(li["chargeItemReference"]["reference"] for li in pushed["lineItem"]) == sorted(
        urls[:2])


async def closed_march_with_endpoint(billing, base_url: str):  # noqa: ANN001, ANN201
    """Alpha's March closed (its Invoice queued for the EHR at ``base_url``): (client, now)."""
    a = api(billing)
    await a.put("/v1/practices/alpha/ehr-endpoint", json={"baseUrl": base_url})
    await march_practice(billing)
    now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    billing.state["clock"].now = now
    await a.post("/v1/practices/alpha/billing-periods/2025-03/close")
    return a, now


async def test_a_push_that_keeps_failing_is_marked_failed_and_can_be_retried(billing):
    a, now = await closed_march_with_endpoint(billing, "https://ehr.example.org/fhir")
    transport = httpx.MockTransport(Ehr(500, 500))
    await deliver_due(billing.db, now, transport=transport, max_attempts=2, backoff=1)
    result = await deliver_due(billing.db, now + timedelta(seconds=5), transport=transport,
                               max_attempts=2, backoff=1)
    assert result["failed"] == 1
    failed = (await a.get("/v1/practices/alpha/ehr-deliveries", params={"status": "failed"})).json()
    delivery = failed["deliveries"][0]
    assert delivery["lastError"] == "HTTP 500"
    other = api(billing, "beta")
    assert (await other.post(f"/v1/practices/alpha/ehr-deliveries/{delivery['id']}/retry")).status_code == 404
    retried = await a.post(f"/v1/practices/alpha/ehr-deliveries/{delivery['id']}/retry")
    assert retried.json()["status"] == "pending" and retried.json()["attempts"] == 0
    assert (await deliver_due(billing.db, now + timedelta(seconds=6),
                              transport=httpx.MockTransport(Ehr(200))))["delivered"] == 1


async def test_no_endpoint_no_push(billing):
    await march_practice(billing)
    billing.state["clock"].now = datetime(2025, 4, 2, 12, tzinfo=UTC)
    await api(billing).post("/v1/practices/alpha/billing-periods/2025-03/close")
    assert (await api(billing).get("/v1/practices/alpha/ehr-deliveries")).json() == {"deliveries": []}
    assert (await api(billing).get("/v1/practices/alpha/ehr-endpoint")).status_code == 404


async def test_a_push_to_a_refused_address_fails_at_once_with_the_reason(billing):
    """An EHR endpoint on the platform's own network (outgoing requests refuse it in
    production): the delivery said only 'ConnectError' and was retried 8 times."""
    from ccm_shared.outbound import outbound_transport

    a, now = await closed_march_with_endpoint(billing, "http://127.0.0.1:9/fhir")
    assert await deliver_due(billing.db, now, transport=outbound_transport(allow_private=False)
                             ) == {"delivered": 0, "retrying": 0, "failed": 1}
    (delivery,) = (await a.get("/v1/practices/alpha/ehr-deliveries")).json()["deliveries"]
    assert delivery["status"] == "failed" and delivery["attempts"] == 1
    assert delivery["lastError"].startswith("refused: 127.0.0.1 resolves to an address that "
                                            "is not a public internet address")


async def test_a_refusal_naming_a_long_host_is_kept_as_the_log_holds_it(billing):
    """A host name may have 253 characters: "refused: {host} resolves to …" was cut at 500 for
    a column of 300, which PostgreSQL refused, and the delivery job failed at every run."""
    from ccm_billing.adapters import orm
    from ccm_shared.outbound import RefusedDestination

    host = ".".join(["h" * 62] * 4)  # 251 characters

    def refused(request: httpx.Request) -> httpx.Response:
        try:
            raise RefusedDestination(f"{host} resolves to an address that is not a public "
                                     "internet address")
        except RefusedDestination as exc:
            raise httpx.ConnectError("refused", request=request) from exc

    a, now = await closed_march_with_endpoint(billing, "https://ehr.example.org/fhir")
    assert await deliver_due(billing.db, now, transport=httpx.MockTransport(refused)) == {
        "delivered": 0, "retrying": 0, "failed": 1}
    (delivery,) = (await a.get("/v1/practices/alpha/ehr-deliveries")).json()["deliveries"]
    assert delivery["lastError"].startswith(f"refused: {host} resolves to")
    assert len(delivery["lastError"]) == orm.ehr_deliveries.c.last_error.type.length


async def test_an_ehr_endpoint_pushes_may_not_reach_is_refused_when_set(billing):
    """Where outgoing requests may not reach the platform's own network (production's default),
    an EHR base there is refused when it is set, not by every Invoice push failing."""
    billing.settings = billing.settings.model_copy(update={"outbound_allow_private": False})
    r = await api(billing).put("/v1/practices/alpha/ehr-endpoint",
                               json={"baseUrl": "https://localhost:9443/fhir"})
    assert r.status_code == 422 and "not a public internet address" in r.text, r.text
    assert (await api(billing).get("/v1/practices/alpha/ehr-endpoint")).status_code == 404
