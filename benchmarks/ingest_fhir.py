"""Ingest FHIR throughput: durable single-resource POSTs and transaction Bundles against
validate-only requests ($validate) in the same run, over real HTTP.

Needs real PostgreSQL and Kafka: `deploy/local/up.sh && source .ccm-local/env` first.
Usage: uv run python benchmarks/ingest_fhir.py [--posts 3000] [--bundles 20] [--bundle-size 500]
       [--concurrency 32]

The service runs in this process under uvicorn on a free loopback port (relay publishing to
Kafka); clients are httpx over TCP in the same process, so client and server share the 2 cores:
figures are a floor, the ratios are like for like. Each POST is validated (fhir.resources R4B +
our rules), stored as a version with its hash, mapped, and its events written to the outbox in
one PostgreSQL transaction. Targets (issue 3): >= 1,000 POSTs/s and >= 0.6 of validate-only;
Bundles >= 2,000 resources/s and >= 0.55 of bare Bundle validation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import sys
import time
import uuid

import httpx
import uvicorn

from ccm_shared.migrate import upgrade_async, upgrade_platform
from ccm_shared.service import ServiceRuntime, discover_services
from ccm_shared.settings import load_settings
from ccm_shared.tenancy import Pricing, create_practice, create_token

CPT = "http://www.ama-assn.org/go/cpt"


def encounter(i: int, patient: str) -> dict:
    return {
        "resourceType": "Encounter", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": CPT, "code": "99490"}]}],
        "subject": {"reference": patient},
        "period": {"start": f"2026-03-{1 + i % 28:02d}T14:00:00-05:00",
                   "end": f"2026-03-{1 + i % 28:02d}T14:{10 + i % 40:02d}:00-05:00"},
        "identifier": [{"system": "urn:bench", "value": f"{i}-{uuid.uuid4().hex[:6]}"}],
    }


def bundle(n: int, seed: str) -> dict:
    entries = []
    for p in range(max(1, n // 10)):
        full = f"urn:uuid:{uuid.uuid4()}"
        entries.append({"fullUrl": full, "request": {"method": "POST", "url": "Patient"},
                        "resource": {"resourceType": "Patient", "active": True,
                                     "name": [{"family": f"Bench{seed}{p}"}]}})
        for i in range(9):
            if len(entries) < n:
                entries.append({"request": {"method": "POST", "url": "Encounter"},
                                "resource": encounter(p * 9 + i, full)})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries[:n]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_requests(client: httpx.AsyncClient, requests, concurrency: int):
    """(elapsed seconds, latencies) for all requests, ``concurrency`` in flight."""
    queue = list(requests)
    latencies: list[float] = []

    async def worker():
        while queue:
            method, url, body, expect = queue.pop()
            t = time.perf_counter()
            r = await client.request(method, url, json=body)
            latencies.append(time.perf_counter() - t)
            if r.status_code != expect:
                raise SystemExit(f"{method} {url}: {r.status_code} {r.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


async def main(args: argparse.Namespace) -> int:
    url = os.environ.get("CCM_DATABASE_URL")
    kafka = os.environ.get("CCM_KAFKA_BOOTSTRAP_SERVERS")
    if not url or not kafka:
        print("set CCM_DATABASE_URL and CCM_KAFKA_BOOTSTRAP_SERVERS (source .ccm-local/env)",
              file=sys.stderr)
        return 2
    await asyncio.to_thread(upgrade_platform, url)
    definition = discover_services()["ingest"]
    await upgrade_async(url, definition.schema, definition.migrations_package)
    settings = load_settings(database_url=url, kafka_bootstrap_servers=kafka, log_level="WARNING",
                             db_pool_size=args.concurrency // 2 or 1)
    runtime = ServiceRuntime.build(definition, settings)
    practice = f"bench-{uuid.uuid4().hex[:8]}"
    await create_practice(runtime.db.engine, practice_id=practice, name="Bench",
                          timezone="America/New_York", pricing=Pricing())
    token = await create_token(runtime.db.engine, practice_id=practice, label="bench")
    await runtime.start(consumers=False, background=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(runtime.app(), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    limits = httpx.Limits(max_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers,
                                     limits=limits, timeout=120) as client:
            patient = "Patient/bench-p"
            warm = [("POST", "/fhir/Encounter", encounter(i, patient), 201) for i in range(200)]
            await run_requests(client, warm, args.concurrency)
            results = {}
            for rnd in range(args.rounds):
                posts = [encounter(i, patient) for i in range(args.posts)]
                v_t, v_lat = await run_requests(
                    client, [("POST", "/fhir/Encounter/$validate", b, 200) for b in posts],
                    args.concurrency)
                w_t, w_lat = await run_requests(
                    client, [("POST", "/fhir/Encounter", b, 201) for b in posts],
                    args.concurrency)
                bundles = [bundle(args.bundle_size, f"{rnd}x{i}") for i in range(args.bundles)]
                bv_t, _ = await run_requests(
                    client, [("POST", "/fhir/Bundle/$validate", b, 200) for b in bundles], 2)
                bw_t, b_lat = await run_requests(
                    client, [("POST", "/fhir", b, 200) for b in bundles], 2)
                results.setdefault("validate", []).append(args.posts / v_t)
                results.setdefault("post", []).append(args.posts / w_t)
                results.setdefault("bvalidate", []).append(args.bundles * args.bundle_size / bv_t)
                results.setdefault("bundle", []).append(args.bundles * args.bundle_size / bw_t)
                results.setdefault("lat", []).extend(w_lat)
                results.setdefault("blat", []).extend(b_lat)
                results.setdefault("vlat", []).extend(v_lat)
            await runtime.relay.drain()
    finally:
        server.should_exit = True
        await serving
        await runtime.stop()
    med = {k: statistics.median(v) for k, v in results.items() if k not in ("lat", "blat",
                                                                           "vlat")}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"ingest FHIR benchmark: {args.rounds} rounds, median; uvicorn on loopback, "
          f"{args.concurrency} concurrent clients, {os.cpu_count()} cores")
    print(f"  validate-only POST      {med['validate']:8.0f} req/s   "
          f"p50 {pct(results['vlat'], .5):6.1f} ms  p99 {pct(results['vlat'], .99):6.1f} ms")
    print(f"  durable POST (+events)  {med['post']:8.0f} req/s   "
          f"p50 {pct(results['lat'], .5):6.1f} ms  p99 {pct(results['lat'], .99):6.1f} ms"
          f"   ratio {med['post'] / med['validate']:.2f} (target >= 0.6; >= 1000/s)")
    print(f"  Bundle validation       {med['bvalidate']:8.0f} resources/s")
    print(f"  transaction Bundle      {med['bundle']:8.0f} resources/s   "
          f"p50 {pct(results['blat'], .5):6.0f} ms  p99 {pct(results['blat'], .99):6.0f} ms"
          f"   ratio {med['bundle'] / med['bvalidate']:.2f} (target >= 0.55; >= 2000/s)")
    print(f"  peak RSS of the process (service + clients): {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posts", type=int, default=2000, help="POSTs per round")
    parser.add_argument("--bundles", type=int, default=10, help="transaction Bundles per round")
    parser.add_argument("--bundle-size", type=int, default=500, help="entries per Bundle")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=3)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
