"""The demo's flow against a running platform, over the services' public HTTP APIs only.

Push the synthetic practice through ingest's FHIR API, wait until billing has applied all of it,
close the month, then read back what each service made of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import httpx

from ccm_shared.demo.generate import SUPERVISOR, DemoPractice, generate, previous_month

SERVICES = ("ingest", "billing", "careplan", "notification")
FHIR_JSON = "application/fhir+json"


class DemoError(Exception):
    """Something the user can fix (platform not running, bad token, …), said plainly."""


@dataclass(frozen=True)
class Endpoints:
    ingest: str
    billing: str
    careplan: str
    notification: str

    @classmethod
    def derive(cls, ingest: str, **given: str | None) -> Endpoints:
        """Services not given sit on ingest's host at ingest's port + 1, + 2, + 3 (the
        8081–8084 layout of ``ccm up`` and ``ccm serve all``)."""
        parts = urlsplit(ingest.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DemoError(f"--url must be like http://127.0.0.1:8081, got {ingest!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        urls = {"ingest": urlunsplit(parts)}
        for offset, name in enumerate(SERVICES[1:], start=1):
            netloc = f"{parts.hostname}:{port + offset}"
            urls[name] = (
                given.get(name) or urlunsplit((parts.scheme, netloc, parts.path, "", ""))
            ).rstrip("/")
        return cls(**urls)


@dataclass
class DemoConfig:
    endpoints: Endpoints
    token: str
    practice: str
    patients: int = 200
    month: str | None = None
    seed: int = 0
    wait_timeout: float = 300.0
    per_bundle: int = 10


@dataclass
class DemoOutcome:
    """Everything the report writes, as the services answered it."""

    practice: dict
    demo: DemoPractice
    close: dict
    report: dict
    report_csv: str
    worklist: dict
    invoice: dict | None
    charge_items: list[dict]
    tracker: list[dict]
    tracker_counts: dict
    overdue_csv: str
    notifications: list[dict]
    audit_patient: str
    audit_packet: dict
    timings: dict[str, float] = field(default_factory=dict)
    edge_results: list[dict] = field(default_factory=list)
    # billing's FHIR base, as the demo reached it: the charge items' fullUrl in the report
    billing_fhir: str = ""


Progress = Callable[[str, int, int], None]  # (stage, done, total)


class Platform:
    """A thin client of the four services for one practice."""

    def __init__(self, config: DemoConfig, client: httpx.AsyncClient) -> None:
        self.cfg = config
        self.http = client
        self.p = config.practice

    def url(self, service: str, path: str) -> str:
        return getattr(self.cfg.endpoints, service) + path

    async def call(
        self, method: str, service: str, path: str, *, ok=(200,), **kw
    ) -> httpx.Response:  # noqa: ANN001
        try:
            resp = await self.http.request(method, self.url(service, path), **kw)
        except httpx.TransportError as exc:
            raise DemoError(
                f"{service} did not answer at {self.url(service, '')} ({exc!r}); is "
                "the platform running? Start it with `uv run ccm up`"
            ) from None
        if resp.status_code not in ok:
            raise DemoError(
                f"{method} {service} {path} answered {resp.status_code}: {_brief(resp)}"
            )
        return resp

    async def check_reachable(self) -> None:
        for name in SERVICES:
            await self.call("GET", name, "/healthz")

    async def practice(self) -> dict:
        resp = await self.call("GET", "ingest", f"/v1/practices/{self.p}", ok=(200, 401, 404))
        if resp.status_code == 401:
            raise DemoError(
                "the API token was refused (401): pass --token, or use the token "
                "`ccm up` printed (kept in .ccm-data/<practice>.token)"
            )
        if resp.status_code == 404:
            raise DemoError(
                f"practice {self.p!r} is not the token's practice (or does not "
                "exist): pass --practice with the practice the token belongs to"
            )
        return resp.json()

    async def push(self, bundle: dict) -> dict:
        resp = await self.call(
            "POST",
            "ingest",
            "/fhir",
            json=bundle,
            ok=(200, 201, 422, 400),
            headers={"Content-Type": FHIR_JSON},
        )
        if resp.status_code != 200:
            raise DemoError(
                f"ingest refused a transaction Bundle ({resp.status_code}): {_brief(resp)}"
            )
        return resp.json()

    async def providers(self) -> set[str]:
        resp = await self.call("GET", "notification", f"/v1/practices/{self.p}/providers")
        return {p["id"] for p in resp.json()}

    async def server_time(self) -> str:
        """The platform's clock (HTTP Date header) as naive UTC ISO text, like message times."""
        from email.utils import parsedate_to_datetime

        stamp = (await self.call("GET", "notification", "/healthz")).headers.get("date")
        moment = parsedate_to_datetime(stamp) if stamp else datetime.now(UTC)
        return _naive_utc(moment.isoformat())

    async def metrics(self, service: str) -> str:
        return (await self.call("GET", service, "/metrics")).text

    async def worklist(self, month: str) -> dict:
        path = f"/v1/practices/{self.p}/billing-periods/{month}/worklist"
        return (await self.call("GET", "billing", path)).json()

    async def tracker(self) -> tuple[list[dict], dict]:
        items, offset, counts = [], 0, {}
        while True:
            page = (
                await self.call(
                    "GET",
                    "careplan",
                    f"/v1/practices/{self.p}/care-plans",
                    params={"limit": 500, "offset": offset, "sort": "next_review_due"},
                )
            ).json()
            counts = page.get("counts", counts)
            batch = page.get("items", [])
            items += batch
            if len(batch) < 500:
                return items, counts
            offset += 500


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of a Prometheus metric's samples whose labels match; None when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                seen = True
    return total if seen else None


async def run_demo(
    config: DemoConfig,
    progress: Progress,
    say: Callable[[str], None],
    *,
    now: datetime | None = None,
) -> DemoOutcome:
    headers = {"Authorization": f"Bearer {config.token}"}
    timings: dict[str, float] = {}
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        api = Platform(config, client)
        await api.check_reachable()
        practice = await api.practice()
        tz = practice.get("timezone") or "UTC"
        now = now or datetime.now(UTC)
        month = config.month or previous_month(now.astimezone(ZoneInfo(tz)).date())
        try:
            demo = generate(
                practice=config.practice,
                month=month,
                timezone=tz,
                now=now,
                patients=config.patients,
                seed=config.seed,
            )
        except ValueError as exc:
            raise DemoError(str(exc)) from None
        say(
            f"practice {config.practice!r} ({practice.get('name')}, {tz}); month {month}; "
            f"{config.patients} patients, {demo.resource_count} FHIR resources (seed {config.seed})"
        )

        if (await api.worklist(month)).get("period") == "closed":
            raise DemoError(
                f"{month} is already closed for practice {config.practice!r}; pass "
                "another --month (or start `ccm up` with a fresh --data-dir)"
            )
        started = time.monotonic()
        run_started = await api.server_time()
        await api.push(demo.directory)
        await _configure_contacts(api, say)
        bundles = demo.patient_bundles(config.per_bundle)
        done = 0
        progress("push", 0, config.patients)
        for count, bundle in bundles:
            await api.push(bundle)
            done += count
            progress("push", done, config.patients)
        corrections = demo.correction_bundle()
        if corrections is not None:
            await api.push(corrections)
        timings["push"] = time.monotonic() - started

        started = time.monotonic()
        await wait_for_billing(api, demo, config.wait_timeout, progress)
        timings["billing"] = time.monotonic() - started

        started = time.monotonic()
        base = f"/v1/practices/{config.practice}/billing-periods/{month}"
        close = (await api.call("POST", "billing", f"{base}/close")).json()
        timings["close"] = time.monotonic() - started
        report = (await api.call("GET", "billing", f"{base}/report.json")).json()
        report_csv = (await api.call("GET", "billing", f"{base}/report.csv")).text
        closed = await api.worklist(month)
        await wait_for_tracker(api, demo, timeout=config.wait_timeout)
        invoice, items = await _invoice_and_items(api, config.practice, month)
        tracker, counts = await api.tracker()
        overdue_csv = (
            await api.call(
                "GET", "careplan", f"/v1/practices/{config.practice}/care-plans/overdue.csv"
            )
        ).text
        notes = await _notifications(
            api,
            expect_kinds=("invoice-issued", "utilization-summary"),
            timeout=min(config.wait_timeout, 30),
            since=run_started,
        )
        patient = _audit_patient(demo, closed)
        packet = await _audit_packet(api, patient, closed, items, tracker)
    outcome = DemoOutcome(
        practice=practice,
        demo=demo,
        close=close,
        report=report,
        report_csv=report_csv,
        worklist=closed,
        invoice=invoice,
        charge_items=items,
        billing_fhir=api.url("billing", "/fhir"),
        tracker=tracker,
        tracker_counts=counts,
        overdue_csv=overdue_csv,
        notifications=notes,
        audit_patient=patient,
        audit_packet=packet,
        timings=timings,
    )
    outcome.edge_results = check_edge_cases(demo, closed)
    return outcome


async def _configure_contacts(api: Platform, say: Callable[[str], None]) -> None:
    """Name the clinical supervisor: summaries, invoices and escalations need a recipient.
    The directory fills from ingest's events, so wait for the provider first."""
    deadline = time.monotonic() + 60
    while SUPERVISOR.id not in await api.providers():
        if time.monotonic() > deadline:
            say("warning: the provider directory did not fill within 60 s; contacts not set")
            return
        await asyncio.sleep(0.5)
    p = api.p
    await api.call(
        "PUT",
        "notification",
        f"/v1/practices/{p}/contacts",
        json={"supervisor": SUPERVISOR.id, "summary_recipients": [SUPERVISOR.id]},
    )
    resp = await api.call("GET", "careplan", f"/v1/practices/{p}/care-plan-rules")
    rules = resp.json()
    body = rules.get("rules", rules)
    if body.get("clinical_supervisor") != f"Practitioner/{SUPERVISOR.id}":
        body = {k: v for k, v in body.items() if k in RULE_FIELDS}
        body["clinical_supervisor"] = f"Practitioner/{SUPERVISOR.id}"
        etag = resp.headers.get("ETag")
        await api.call(
            "PUT",
            "careplan",
            f"/v1/practices/{p}/care-plan-rules",
            json=body,
            headers={"If-Match": etag} if etag else {},
        )


RULE_FIELDS = (
    "review_interval_months",
    "reminder_days_before_due",
    "overdue_reminder_every_days",
    "escalate_after_days_overdue",
    "escalate_after_reminders",
    "escalation_repeat_days",
    "early_review_within_days",
    "early_review_on_plan_revision",
    "early_review_on_new_chronic_condition",
    "clinical_supervisor",
)


def expected_entries(demo: DemoPractice) -> dict[str, int]:
    return {f"Patient/{p.id}": p.entries_in_month for p in demo.patients}


def entries_seen(row: dict) -> int:
    explanation = row.get("explanation") or {}
    return len(explanation.get("counted") or []) + len(explanation.get("notCounted") or [])


async def wait_for_billing(
    api: Platform, demo: DemoPractice, timeout: float, progress: Progress
) -> dict:
    """Until billing has applied everything pushed: every patient on the worklist with all of
    its time entries, and the worklist unchanged between two polls. The (costly) worklist is
    computed when ingest's outbox is empty and billing's consumer has caught up (cheap metrics
    first), and every fifth poll regardless: on a busy shared deployment lag never reaches 0."""
    expected = expected_entries(demo)
    total = len(expected)
    deadline = time.monotonic() + timeout
    previous, complete, backlog, lag, polls, applied0 = None, 0, None, None, 0, None
    while True:
        polls += 1
        backlog = metric_sum(await api.metrics("ingest"), "ccm_outbox_backlog", service="ingest")
        billing = await api.metrics("billing")
        lag = metric_sum(billing, "ccm_consumer_lag", group="billing-projections")
        applied = (
            metric_sum(
                billing, "ccm_consumer_events_total", group="billing-projections", outcome="applied"
            )
            or 0
        )
        applied0 = applied if applied0 is None else applied0
        done = int(applied - applied0)
        progress("billing", done, done + int((lag or 0) + (backlog or 0)))
        if (not backlog and not lag) or polls % 5 == 0:
            worklist = await api.worklist(demo.month)
            rows = {r["patient"]: r for r in worklist["patients"]}
            complete = sum(
                1 for p, n in expected.items() if p in rows and entries_seen(rows[p]) >= n
            )
            digest = hashlib.sha256(json.dumps(worklist, sort_keys=True).encode()).hexdigest()
            if complete == total and digest == previous:
                progress("billing", done, done)
                return worklist
            previous = digest if complete == total else None
        if time.monotonic() > deadline:
            raise DemoError(
                f"billing had not applied everything after {timeout:.0f} s: {complete}/{total} "
                f"patients complete on the worklist, ingest outbox backlog {backlog}, billing "
                f"consumer lag {lag}. Check the services' logs; raise --wait-timeout on a slow "
                "machine"
            )
        await asyncio.sleep(1.5)


async def wait_for_tracker(api: Platform, demo: DemoPractice, timeout: float) -> None:
    """Until careplan tracks every care plan pushed (its consumer runs beside billing's)."""
    wanted = {
        f"CarePlan/{r['id']}"
        for p in demo.patients
        for r in p.resources
        if r["resourceType"] == "CarePlan"
    }
    deadline = time.monotonic() + timeout
    while True:
        items, _ = await api.tracker()
        missing = wanted - {t.get("care_plan") for t in items}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise DemoError(
                f"careplan tracks {len(wanted) - len(missing)} of the {len(wanted)} care plans "
                f"pushed after {timeout:.0f} s; check the careplan service's log"
            )
        await asyncio.sleep(1.0)


async def _search_all(api: Platform, service: str, path: str, params: dict | None = None) -> list:
    """Every match of a paged FHIR search (the searches give at most 1,000 a page)."""
    found: list = []
    while True:
        page = (await api.call("GET", service, path, params={
            **(params or {}), "_count": 1000, "_offset": len(found)})).json()
        found += [e["resource"] for e in page.get("entry", [])]
        if not page.get("entry") or len(found) >= page.get("total", 0):
            return found


async def _invoice_and_items(api: Platform, practice: str, month: str) -> tuple[dict | None, list]:
    found = await _search_all(api, "billing", "/fhir/Invoice",
                              {"recipient": f"Organization/{practice}"})
    invoices = [
        resource
        for resource in found
        if any(
            i.get("value", "").startswith(f"{practice}:{month}")
            for i in resource.get("identifier", [])
        )
    ]
    current = [i for i in invoices if i.get("status") != "cancelled"] or invoices
    invoice = current[-1] if current else None
    if invoice is None:
        return None, []
    wanted = {
        li["chargeItemReference"]["reference"].removeprefix("ChargeItem/")
        for li in invoice.get("lineItem", [])
        if "chargeItemReference" in li
    }
    items = [r for r in await _search_all(api, "billing", "/fhir/ChargeItem") if r["id"] in wanted]
    return invoice, items


async def _notifications(
    api: Platform, *, expect_kinds: tuple[str, ...], timeout: float, since: str
) -> list[dict]:
    """The messages notification rendered for the practice during this run, with their text.
    Waits a little for the month-close messages, which follow the close as events."""
    path = f"/v1/practices/{api.p}/notifications"
    deadline = time.monotonic() + timeout
    while True:
        everything = (await api.call("GET", "notification", path, params={"limit": 500})).json()
        listed = [m for m in everything if _naive_utc(m["created_at"]) >= since]
        kinds = {m["kind"] for m in listed}
        if all(k in kinds for k in expect_kinds) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    out = []
    for m in listed:
        out.append((await api.call("GET", "notification", f"{path}/{m['id']}")).json())
    return out


def _audit_patient(demo: DemoPractice, worklist: dict) -> str:
    """The patient of the packet: a billed edge case with both roles' time if there is one."""
    billed = {r["patient"] for r in worklist["patients"] if r.get("codes")}
    for p in demo.edge_cases:
        if p.scenario == "physician-30-staff-25" and f"Patient/{p.id}" in billed:
            return f"Patient/{p.id}"
    return sorted(billed)[0] if billed else f"Patient/{demo.patients[0].id}"


async def _audit_packet(
    api: Platform, patient: str, worklist: dict, items: list[dict], tracker: list[dict]
) -> dict:
    """One patient's month for an auditor: the decision with its explanation, the ChargeItems,
    the care-plan tracker entry and the platform's audit trail (FHIR AuditEvents)."""
    audit = (
        await api.call(
            "GET",
            "billing",
            f"/v1/practices/{api.p}/audit-events",
            params={"patient": patient, "limit": 1000},
        )
    ).json()
    # billing's compliance audit packet (a FHIR collection Bundle), where the deployment has it
    packet = await api.call(
        "GET",
        "billing",
        f"/v1/practices/{api.p}/patients/{patient.removeprefix('Patient/')}/audit-packet",
        params={"from": worklist["month"], "format": "fhir"},
        ok=(200, 404, 405),
    )
    return {
        "patient": patient,
        "month": worklist["month"],
        "billingAuditPacket": packet.json() if packet.status_code == 200 else None,
        "decision": next((r for r in worklist["patients"] if r["patient"] == patient), None),
        "chargeItems": [i for i in items if i.get("subject", {}).get("reference") == patient],
        "carePlan": [t for t in tracker if t.get("patient") == patient],
        "auditEvents": audit,
    }


def check_edge_cases(demo: DemoPractice, worklist: dict) -> list[dict]:
    """Each edge case's decision against what the rules expect."""
    rows = {r["patient"]: r for r in worklist["patients"]}
    out = []
    for p in demo.edge_cases:
        row = rows.get(f"Patient/{p.id}")
        codes = _codes(row.get("codes")) if row else None
        problems = []
        if row is None:
            problems.append("not on the worklist")
        else:
            if codes != p.expect.codes:
                problems.append(f"codes {codes}, expected {p.expect.codes}")
            problems += [
                f"blocker {b} missing" for b in p.expect.blockers if b not in row["blockers"]
            ]
            problems += [
                f"warning {w} missing" for w in p.expect.warnings if w not in row["warnings"]
            ]
        out.append(
            {
                "patient": f"Patient/{p.id}",
                "scenario": p.scenario,
                "description": p.description,
                "ok": not problems,
                "problems": problems,
                "codes": codes,
                "blockers": row["blockers"] if row else None,
                "warnings": row["warnings"] if row else None,
            }
        )
    return out


def _codes(codes) -> dict[str, int]:  # noqa: ANN001
    """Worklist codes as {code: units}, whichever shape billing uses (list of objects or map)."""
    if isinstance(codes, dict):
        return {k: int(v) for k, v in codes.items()}
    out: dict[str, int] = {}
    for c in codes or []:
        if isinstance(c, str):
            out[c] = out.get(c, 0) + 1
        else:
            out[c["code"]] = out.get(c["code"], 0) + int(c.get("units", 1))
    return out


def _naive_utc(text: str) -> str:
    """ISO text → naive UTC ISO text, comparable as strings."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat()


def _brief(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return "; ".join(
            f"{i.get('diagnostics', '')} ({', '.join(i.get('expression', []))})"
            for i in body.get("issue", [])[:5]
        )
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return json.dumps(body)[:300]


def run(config: DemoConfig, progress: Progress, say: Callable[[str], None]) -> DemoOutcome:
    return asyncio.run(run_demo(config, progress, say))
