"""Edges of notification's API found by fuzzing: every one a clear 4xx (problem+json) or a
consistent answer under concurrency, never a 500 or a stall (embedded SQLite)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime

import httpx
import pytest
from sqlalchemy import select

from ccm_notification.adapters.orm import call_requests, messages, template_overrides
from ccm_notification.adapters.rendering import Renderer
from ccm_notification.adapters.sql import upsert
from ccm_shared.events import CloudEvent, to_message
from tests.unit.notification.conftest import NOW

P = "/v1/practices/acme"
GAP = {"kind": "care-gap-alert", "provider": "doc-1",
       "fields": {"patient": "Patient/p-1", "gap": "HbA1c"}}
CALL = {"provider": "doc-1", "reason": "discuss the care plan",
        "slots": ["2026-12-01T15:00:00+00:00", "2026-12-02T15:00:00+00:00",
                  "2026-12-03T15:00:00+00:00"],
        "requester_name": "RN Diaz", "requester_email": "diaz@acme.test"}
RAISES = "{% block subject %}Gap {{ 1/0 }}{% endblock %}{% block text %}{{ gap }}{% endblock %}" \
         "{% block html %}{{ gap }}{% endblock %}"
PERCENT_D = "{% block subject %}{{ '%d' % gap }}{% endblock %}{% block text %}x{% endblock %}" \
            "{% block html %}x{% endblock %}"
NESTED_LOOPS = "{% block subject %}Gap{% endblock %}{% block text %}{% for i in range(100000) %}" \
               "{% for j in range(8000) %}{% endfor %}{% endfor %}{{ gap }}{% endblock %}" \
               "{% block html %}{{ gap }}{% endblock %}"
LOOPS_UNDER_RANGE_CAP = NESTED_LOOPS.replace("100000", "9000").replace("8000", "9000")


def is_problem(r: httpx.Response, status: int, fragment: str) -> bool:
    return (r.status_code == status and fragment in r.text
            and r.headers["content-type"].startswith("application/problem+json"))


async def store_override(rt, kind: str, source: str) -> None:  # noqa: ANN001
    """An override stored as it was before uploads rendered them (no validation)."""
    async with rt.db.unit_of_work() as uow:
        await upsert(uow.session, template_overrides, {"practice": "acme", "kind": kind},
                     {"source": source, "updated_at": NOW})
        await uow.commit()


async def all_rows(rt, table, *where):  # noqa: ANN001
    async with rt.db.unit_of_work() as uow:
        return (await uow.session.execute(select(table).where(*where))).all()


# -- N1: call slots ----------------------------------------------------------------------------

@pytest.mark.parametrize("slot, duration", [
    ("9999-12-31T23:00:00-05:00", 15),  # its UTC form is in year 10000
    ("9999-12-31T22:00:00Z", 240),  # its end is in year 10000
    ("2027-11-28T12:01:00Z", 15),  # beyond the horizon (366 days)
])
async def test_a_slot_beyond_the_horizon_is_refused_when_the_call_is_requested(api, slot, duration):
    rt, client, headers = api
    r = await client.post(f"{P}/calls", headers=headers,
                          json=CALL | {"slots": [slot], "duration_minutes": duration})
    assert is_problem(r, 422, "within 366 days"), r.text
    assert await all_rows(rt, call_requests) == []


async def test_a_slot_a_year_ahead_is_accepted(api):
    rt, client, headers = api
    r = await client.post(f"{P}/calls", headers=headers,
                          json=CALL | {"slots": ["2027-11-27T11:00:00Z"]})
    assert r.status_code == 201, r.text


async def test_confirming_a_stored_year_9999_slot_is_a_422_not_a_500(api):
    rt, client, headers = api
    async with rt.db.unit_of_work() as uow:  # stored before slots were bounded
        await uow.session.execute(call_requests.insert().values(
            id="old-call", practice="acme", provider_id="doc-1", patient=None, reason="r",
            requester_name="RN", requester_email="rn@acme.test",
            slots=["9999-12-31T22:00:00+00:00"], duration_minutes=240, status="proposed",
            created_at=NOW))
        await uow.commit()
    r = await client.post(f"{P}/calls/old-call/confirm", headers=headers, json={"slot": 0})
    assert is_problem(r, 422, "cannot be represented"), r.text


# -- N2 and N7: templates that fail or run away when rendered ----------------------------------

@pytest.mark.parametrize("source, fragment", [
    (RAISES, "ZeroDivisionError"),
    (PERCENT_D, "TypeError"),
    (NESTED_LOOPS, "range() of more than"),
    (LOOPS_UNDER_RANGE_CAP, "steps"),
])
async def test_a_template_that_fails_or_runs_away_when_rendered_is_refused_on_upload(
    api, source, fragment
):
    rt, client, headers = api
    started = time.monotonic()
    r = await client.put(f"{P}/templates/care-gap-alert", headers=headers, json={"source": source})
    assert time.monotonic() - started < 5
    assert is_problem(r, 422, fragment), r.text
    assert await all_rows(rt, template_overrides) == []


@pytest.mark.parametrize("subject, fragment", [
    ("{{ gap|nosuchfilter }}", "No filter named 'nosuchfilter'"),  # was a 500
    ("{{ gap is nosuchtest }}", "No test named 'nosuchtest'"),
    ("{% if gap %}" * 2000 + "{% endif %}" * 2000, "nested too deeply"),  # was a 500
])
async def test_a_template_that_does_not_compile_is_refused_on_upload(api, subject, fragment):
    rt, client, headers = api
    source = (f"{{% block subject %}}{subject}{{% endblock %}}{{% block text %}}x{{% endblock %}}"
              "{% block html %}x{% endblock %}")
    r = await client.put(f"{P}/templates/care-gap-alert", headers=headers, json={"source": source})
    assert is_problem(r, 422, "template refused"), r.text
    assert fragment in r.json()["detail"]
    assert await all_rows(rt, template_overrides) == []


@pytest.mark.parametrize("source, fragment", [
    (RAISES, "ZeroDivisionError"),
    (PERCENT_D, "TypeError"),
    (LOOPS_UNDER_RANGE_CAP, "steps"),
])
async def test_a_stored_template_that_fails_when_rendered_is_a_422_for_the_api_caller(
    api, source, fragment
):
    rt, client, headers = api
    await store_override(rt, "care-gap-alert", source)
    started = time.monotonic()
    r = await client.post(f"{P}/notifications", headers=headers, json=GAP)
    assert time.monotonic() - started < 5
    assert is_problem(r, 422, fragment), r.text
    assert await all_rows(rt, messages) == []


async def test_a_stored_template_that_fails_when_rendered_makes_an_event_a_failed_message(api):
    rt, client, headers = api
    await store_override(rt, "review-overdue", RAISES.replace("{{ gap }}", "{{ patient }}"))
    alerts = next(c for c in rt.consumers if c.name == "notification-alerts")
    event = CloudEvent(source="/ccm/careplan", type="careplan.review.overdue.v1", tenant="acme",
                       subject="Patient/p1",
                       data={"tracker": "tr-1", "carePlan": "CarePlan/cp1", "patient": "Patient/p1",
                             "dueDate": "2026-11-01", "daysOverdue": 5,
                             "responsibleProvider": "Practitioner/doc-1", "supervisor": None,
                             "step": 1, "idempotencyKey": "acme:tr-1:overdue:2026-11-01:1"})
    await alerts.process(to_message(event.type, event))
    [message] = await all_rows(rt, messages)
    assert message.status == "failed" and "ZeroDivisionError" in message.last_error
    assert alerts.stats.dead_lettered == 0


async def test_a_running_away_render_does_not_stall_the_event_loop(api, monkeypatch):
    """Renders run in a worker thread, not on the event loop's (whose other requests and jobs
    would wait for it), and stop at the limits."""
    rt, client, headers = api
    await store_override(rt, "care-gap-alert", LOOPS_UNDER_RANGE_CAP)
    loop_thread, rendered_in = threading.get_ident(), []
    render = Renderer.render

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        rendered_in.append(threading.get_ident())
        return render(self, *args, **kwargs)

    monkeypatch.setattr(Renderer, "render", recording)
    r = await client.post(f"{P}/notifications", headers=headers, json=GAP)
    assert r.status_code == 422
    assert rendered_in and loop_thread not in rendered_in


# -- N5: one idempotency key, concurrent requests ----------------------------------------------

async def test_concurrent_requests_with_one_idempotency_key_record_one_message(api):
    rt, client, headers = api
    body = GAP | {"idempotency_key": "same-key"}
    answers = await asyncio.gather(
        *[client.post(f"{P}/notifications", headers=headers, json=body) for _ in range(8)]
    )
    assert sorted(r.status_code for r in answers) == [200] * 7 + [201], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert len(await all_rows(rt, messages)) == 1


async def test_a_request_that_lost_the_race_for_its_key_answers_with_the_winner(api):
    """The window of the race, made deterministic: the key was free when this request looked,
    and taken when it inserted (a concurrent request with the same key committed between)."""
    rt, client, headers = api
    body = GAP | {"idempotency_key": "raced-key"}
    winner = await client.post(f"{P}/notifications", headers=headers, json=body)
    assert winner.status_code == 201
    notifier = rt.state["notifier"]
    find_by_key, looked = notifier.find_by_key, []

    async def stale_first_look(uow, key):  # noqa: ANN001, ANN202
        looked.append(key)
        return None if len(looked) == 1 else await find_by_key(uow, key)

    notifier.find_by_key = stale_first_look
    try:
        loser = await client.post(f"{P}/notifications", headers=headers, json=body)
    finally:
        del notifier.find_by_key
    assert loser.status_code == 200, loser.text
    assert loser.json()["id"] == winner.json()["id"]
    assert len(await all_rows(rt, messages)) == 1


# -- N6: concurrent confirmations of one call --------------------------------------------------

async def test_concurrent_confirmations_of_different_slots_confirm_exactly_one(api):
    rt, client, headers = api
    call = (await client.post(f"{P}/calls", headers=headers, json=CALL)).json()
    answers = await asyncio.gather(*[
        client.post(f"{P}/calls/{call['id']}/confirm", headers=headers, json={"slot": i % 3})
        for i in range(9)
    ])
    won = {r.json()["chosen_slot"] for r in answers if r.status_code == 200}
    assert len(won) == 1, [r.text for r in answers]
    assert all(r.status_code in (200, 409) for r in answers)
    [chosen] = won
    stored = (await client.get(f"{P}/calls/{call['id']}", headers=headers)).json()
    assert stored["chosen_slot"] == chosen
    confirmations = await all_rows(rt, messages, messages.c.kind == "call-confirmed")
    assert len(confirmations) == 2  # the provider and the requester, once each
    start = datetime.fromisoformat(chosen).strftime("DTSTART:%Y%m%dT%H%M%SZ")
    assert all(start in m.attachments[0]["content"] for m in confirmations)  # the stored time


async def test_a_confirmed_call_is_idempotent_for_its_slot_and_a_conflict_for_another(api):
    rt, client, headers = api
    call = (await client.post(f"{P}/calls", headers=headers, json=CALL)).json()
    url = f"{P}/calls/{call['id']}/confirm"
    first = await client.post(url, headers=headers, json={"slot": 1})
    assert first.status_code == 200 and first.json()["chosen_slot"] == call["slots"][1]
    again = await client.post(url, headers=headers, json={"slot": 1})
    assert again.status_code == 200 and again.json() == first.json()
    other = await client.post(url, headers=headers, json={"slot": 0})
    assert is_problem(other, 409, "another time")


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("webhook_url", "http://", "absolute"),
    ("webhook_url", "https://user:pw@h.example/x", "credentials"),
    ("fhir_endpoint", "https://h.example:99999/fhir", "not a valid URL"),
    ("fhir_endpoint", "https://h.exa mple/fhir", "spaces"),
    ("webhook_url", "https://127.0.0.1:8082/hook", "not a public internet address"),
    ("fhir_endpoint", "https://169.254.169.254/fhir", "not a public internet address"),
])
async def test_a_provider_address_deliveries_cannot_use_is_refused(api, field, value, fragment):
    """A webhook or FHIR endpoint is checked as subscriptions' and the EHR's are (it took any
    text starting http://), and where outgoing requests may not reach the platform's own network
    (production's default) an address there is refused when given, not at every delivery."""
    rt, client, headers = api
    rt.settings = rt.settings.model_copy(update={"outbound_allow_private": False})
    r = await client.put(f"{P}/providers/doc-1", json={field: value}, headers=headers)
    assert r.status_code == 422 and fragment in r.text, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (await client.get(f"{P}/providers/doc-1", headers=headers)).json()[field] is None


# -- the alert's patient is given once ----------------------------------------------------------


async def test_the_top_level_patient_is_the_templates_patient_field(api):
    """It answered 422 "missing field(s) patient" unless fields.patient repeated it."""
    rt, client, headers = api
    body = {"kind": "care-gap-alert", "provider": "doc-1", "patient": "Patient/p-7",
            "fields": {"gap": "HbA1c not measured in 6 months"}}
    r = await client.post(f"{P}/notifications", headers=headers, json=body)
    assert r.status_code == 201, r.text
    [row] = await all_rows(rt, messages)
    assert row.patient == "Patient/p-7" and row.fields["patient"] == "Patient/p-7"
    assert "Patient/p-7" in row.subject


@pytest.mark.parametrize("fields, patient, status", [
    ({"patient": "Patient/p-7"}, "Patient/p-7", 201),  # both, the same: as before
    ({"patient": "Patient/p-7"}, None, 201),  # only in fields: as before
    ({"patient": "Patient/p-8"}, "Patient/p-7", 422),  # which one?
    ({}, None, 422),  # none: the field is missing
])
async def test_a_patient_given_twice_must_agree(api, fields, patient, status):
    rt, client, headers = api
    body = {"kind": "care-gap-alert", "provider": "doc-1", "patient": patient,
            "fields": {"gap": "HbA1c not measured in 6 months"} | fields}
    r = await client.post(f"{P}/notifications", headers=headers, json=body)
    assert r.status_code == status, r.text
    if status == 422:
        assert r.headers["content-type"].startswith("application/problem+json")
        assert await all_rows(rt, messages) == []


async def test_a_pause_notice_is_the_services_own_to_send(api):
    rt, client, headers = api
    r = await client.post(f"{P}/notifications", headers=headers, json={
        "kind": "subscription-paused", "provider": "doc-1", "fields": {}})
    assert r.status_code == 422 and "created by the service itself" in r.text
