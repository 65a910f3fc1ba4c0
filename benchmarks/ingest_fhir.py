"""Ingest FHIR throughput: durable single-resource POSTs and transaction Bundles against
validate-only requests ($validate) in the same run, over real HTTP.

Needs real PostgreSQL and Kafka: `deploy/local/up.sh && source .ccm-local/env` first.
Usage: uv run python benchmarks/ingest_fhir.py [--posts 2000] [--bundles 10] [--bundle-size 500]
       [--concurrency 32] [--bundle-concurrency 2] [--workers 1] [--patients 200]
       [--rounds 5]

Method. The service runs as it does in production (k8s/), `ccm serve ingest` processes: the API
(no consumers, no schedulers) in ``--workers`` separate processes, and the outbox relay
publishing to Kafka with the background jobs (audit sealer, messaging retention) in one
more, each on its own loopback port; this process is only the load generator: a minimal
keep-alive HTTP/1.1 client over asyncio streams with the request bodies serialised
beforehand, so the client takes as little of the 2 cores as it can and never shares the
server's event loop. (Earlier versions ran uvicorn and httpx clients in one process: the
clients stole the server's loop.) Every figure and its baseline come from the same servers,
client and run, so the ratios are like for like:
- durable POST /fhir/Encounter vs POST /fhir/Encounter/$validate?mode=profile (target >= 0.6,
  >= 1,000/s): bare validation, as in every earlier round (the default mode also applies the
  CCM mapping's rules, part of what the write costs).
  A durable POST is validated (fhir.resources R4B + our rules), stored as a version with its
  hash, mapped, and its events written to the outbox in one PostgreSQL transaction.
- transaction Bundle POST /fhir vs POST /fhir/Bundle/$validate?mode=profile of the same Bundles, in
  resources/s (target >= 0.55, >= 2,000/s); Bundles go 2 at a time (``--bundle-concurrency``).
Rounds alternate baseline and write; the medians of the rounds are reported, latencies over all
rounds, and where each phase's CPU went (/proc: the API process(es), the relay process, this load
generator, PostgreSQL, Kafka and the rest of the machine's busy time). A ratio is the median of
the rounds' own ratios, each write phase against the baseline phase just before it: the host's
speed drifts within minutes, which a ratio of medians taken from different rounds would carry
into the figure. Peak memory is the servers' own (VmHWM). After the run the outbox must drain
to Kafka; the time it took after the last write is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid

from sqlalchemy import func, select

from ccm_shared.db import Database
from ccm_shared.migrate import upgrade_async, upgrade_platform
from ccm_shared.service import discover_services
from ccm_shared.tables import messaging_tables
from ccm_shared.tenancy import Pricing, create_practice, create_token

CPT = "http://www.ama-assn.org/go/cpt"
# The baselines: bare validation (the content only), as in every earlier round.
VALIDATE_POST = "/fhir/Encounter/$validate?mode=profile"
VALIDATE_BUNDLE = "/fhir/Bundle/$validate?mode=profile"


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
    """A Synthea-like transaction: per patient a Patient (urn:uuid) and 9 CCM-time Encounters."""
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


class Connection:
    """One keep-alive HTTP/1.1 connection; just enough protocol for a load generator."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.head = (f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/fhir+json\r\nConnection: keep-alive\r\n")
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        message = (f"{method} {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}"
                   f"\r\n\r\n".encode() + body)
        line = b""
        for _ in range(2):  # the server closes idle keep-alive connections: reconnect once
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.write(message)
            try:
                line = await self.reader.readline()
            except ConnectionError:
                line = b""
            if line:
                break
            self.writer.close()
            self.writer = None
        status = int(line.split()[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        data = b""
        while size := int((await self.reader.readline()).strip(), 16):
            data += await self.reader.readexactly(size + 2)
        await self.reader.readline()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_requests(connections: list[Connection], requests, concurrency: int):
    """(elapsed seconds, latencies) for all requests, ``concurrency`` in flight."""
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def worker(conn: Connection) -> None:
        while queue:
            method, path, body, expect = queue.pop()
            t = time.perf_counter()
            status, answer = await conn.request(method, path, body)
            latencies.append(time.perf_counter() - t)
            if status != expect:
                raise SystemExit(f"{method} {path}: {status} {answer[:300]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections[:concurrency]))
    return time.perf_counter() - started, latencies


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def start_servers(args: argparse.Namespace, env: dict[str, str]) -> list[tuple[subprocess.Popen,
                                                                                 int]]:
    """API processes (``--workers``), plus the outbox relay in a process of its own unless
    ``--relay-in-api``; the last entry is the relay process when it has one."""
    ccm = os.path.join(os.path.dirname(sys.executable), "ccm")
    env = {**env, "CCM_LOG_LEVEL": "WARNING", "CCM_DB_POOL_SIZE": str(args.pool)}
    # As in k8s/: API processes run no schedulers, and the other process runs the relay and the
    # background jobs (audit sealer, messaging retention); with --relay-in-api every process
    # runs all of it, as a bare `ccm serve ingest` does.
    in_api = ["--relay", "--background"] if args.relay_in_api else ["--no-relay", "--no-background"]
    servers = []
    for n in range(args.workers + (0 if args.relay_in_api else 1)):
        port = free_port()
        api = ["--api", *in_api] if n < args.workers else ["--no-api", "--relay", "--background"]
        proc = subprocess.Popen(
            [ccm, "serve", "ingest", "--port", str(port), "--host", "127.0.0.1",
             "--no-consumers", *api],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.append((proc, port))
    return servers


async def wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the ingest server exited with {proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if b" 200 " in await reader.readline():
                writer.close()
                return
            writer.close()
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the ingest server did not become ready in 60 s")


TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> float:
    """CPU seconds all cores have spent busy (not idle or waiting for I/O) since boot."""
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / TICK  # not steal/guest


def listener_pid(port: int) -> int | None:
    """The process listening on a local TCP port (by /proc: socket inode, then its owner)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes
                   for fd in os.listdir(f"/proc/{entry}/fd")):
                return int(entry)
        except OSError:
            continue
    return None


def with_children(pid: int | None) -> list[int]:
    """``pid`` and its child processes (a PostgreSQL postmaster and its backends)."""
    if pid is None:
        return []
    found = [pid]
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry))
        except OSError:
            continue
    return found


def port_of(url: str) -> int:
    return int(url.rsplit("@", 1)[-1].split("/")[0].split(",")[0].rsplit(":", 1)[1])


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        try:
            found[pid] = cpu_of(pid)
        except OSError:  # ended meanwhile
            pass
    return found


class CpuMeter:
    """Where the CPU of a phase went: the API process(es), the relay, this load generator,
    PostgreSQL (the postmaster behind CCM_DATABASE_URL and its backends: other users of the
    database count too), Kafka (the broker behind CCM_KAFKA_BOOTSTRAP_SERVERS) and the rest of
    the machine's busy time. A process that ends during a phase is left out of it."""

    def __init__(self, api: list[int], relay: list[int], database_url: str, kafka: str) -> None:
        self.api, self.relay = api, relay
        self.postmaster = listener_pid(port_of(database_url))
        self.kafka = [p for p in [listener_pid(port_of(kafka))] if p is not None]
        self.totals: dict[str, dict[str, float]] = {}

    def snapshot(self) -> dict[str, dict[int, float] | float]:
        return {"api": cpu_by_pid(self.api), "relay": cpu_by_pid(self.relay),
                "postgres": cpu_by_pid(with_children(self.postmaster)),
                "kafka": cpu_by_pid(self.kafka), "client": sum(os.times()[:2]),
                "machine": machine_busy()}

    def add(self, phase: str, before: dict, units: int) -> None:
        after = self.snapshot()
        spent: dict[str, float] = {}
        for key, value in after.items():
            if isinstance(value, dict):  # per process, from 0 for one that started meanwhile
                spent[key] = sum(v - before[key].get(pid, 0.0) for pid, v in value.items())
            else:
                spent[key] = value - before[key]
        spent["other"] = spent["machine"] - sum(
            spent[k] for k in ("api", "relay", "client", "postgres", "kafka"))
        total = self.totals.setdefault(phase, {"units": 0})
        total["units"] += units
        for key, value in spent.items():
            total[key] = total.get(key, 0.0) + value

    def line(self, phase: str, unit: str) -> str:
        t = self.totals[phase]
        ms = {k: t[k] / t["units"] * 1000
              for k in ("api", "relay", "client", "postgres", "kafka", "other")}
        return (f"    CPU per {unit}: API {ms['api']:.2f} ms, relay {ms['relay']:.2f}, "
                f"PostgreSQL {ms['postgres']:.2f}, Kafka {ms['kafka']:.2f}, load generator "
                f"{ms['client']:.2f}, rest of the machine {ms['other']:.2f}")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def unsent(db: Database, practice: str) -> int:
    outbox = messaging_tables(discover_services()["ingest"].metadata)[0]
    async with db.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(outbox).where(
            outbox.c.tenant == practice, outbox.c.sent_at.is_(None)))).scalar_one()


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
    db = Database(url, schema=definition.schema, pool_size=1)
    practice = f"bench-{uuid.uuid4().hex[:8]}"
    await create_practice(db.engine, practice_id=practice, name="Bench",
                          timezone="America/New_York", pricing=Pricing())
    token = await create_token(db.engine, practice_id=practice, label="bench")
    servers = start_servers(args, dict(os.environ))
    connections: list[Connection] = []
    try:
        for proc, port in servers:
            await wait_ready(port, proc)
        api_ports = [port for _, port in servers[:args.workers]]
        connections = [Connection(api_ports[i % len(api_ports)], token)
                       for i in range(args.concurrency)]
        def patient(i: int) -> str:
            return f"Patient/bench-p{i % args.patients}"

        def posts(path: str, bodies: list[bytes], expect: int) -> list:
            return [("POST", path, b, expect) for b in bodies]

        warm = [json.dumps(encounter(i, patient(i))).encode() for i in range(300)]
        await run_requests(connections, posts(VALIDATE_POST, warm, 200),
                           args.concurrency)
        await run_requests(connections, posts("/fhir/Encounter", warm, 201), args.concurrency)
        await run_requests(connections, posts("/fhir", [json.dumps(bundle(50, "warm")).encode()],
                                              200), 1)
        results: dict[str, list[float]] = {}
        pids = [proc.pid for proc, _ in servers]
        cpu = CpuMeter(pids[:args.workers], pids[args.workers:], url, kafka)
        resources = args.bundles * args.bundle_size

        async def measured(phase: str, requests: list, concurrency: int, units: int):
            before = cpu.snapshot()
            outcome = await run_requests(connections, requests, concurrency)
            cpu.add(phase, before, units)
            return outcome

        for rnd in range(args.rounds):
            bodies = [json.dumps(encounter(i, patient(i))).encode() for i in range(args.posts)]
            v_t, v_lat = await measured("validate", posts(VALIDATE_POST, bodies,
                                                          200), args.concurrency, args.posts)
            w_t, w_lat = await measured("post", posts("/fhir/Encounter", bodies, 201),
                                        args.concurrency, args.posts)
            bundles = [json.dumps(bundle(args.bundle_size, f"{rnd}x{i}")).encode()
                       for i in range(args.bundles)]
            bv_t, bv_lat = await measured("bvalidate", posts(VALIDATE_BUNDLE, bundles,
                                                             200), args.bundle_concurrency,
                                             resources)
            bw_t, b_lat = await measured("bundle", posts("/fhir", bundles, 200),
                                         args.bundle_concurrency, resources)
            for key, value in (("validate", args.posts / v_t), ("post", args.posts / w_t),
                               ("bvalidate", resources / bv_t), ("bundle", resources / bw_t),
                               ("post_ratio", v_t / w_t), ("bundle_ratio", bv_t / bw_t)):
                results.setdefault(key, []).append(value)
            for key, lat in (("vlat", v_lat), ("lat", w_lat), ("bvlat", bv_lat),
                             ("blat", b_lat)):
                results.setdefault(key, []).extend(lat)
            print(f"  round {rnd + 1}: validate {args.posts / v_t:.0f}/s, POST "
                  f"{args.posts / w_t:.0f}/s (ratio {v_t / w_t:.2f}), Bundle validation "
                  f"{resources / bv_t:.0f} res/s, Bundle {resources / bw_t:.0f} res/s (ratio "
                  f"{bv_t / bw_t:.2f})", file=sys.stderr)
        last_write = time.perf_counter()
        while await unsent(db, practice):
            if time.perf_counter() - last_write > 120:
                raise SystemExit("the outbox did not drain to Kafka within 120 s")
            await asyncio.sleep(0.2)
        drained = time.perf_counter() - last_write
        peak = [peak_rss_mb(proc.pid) for proc, _ in servers]
    finally:
        for c in connections:
            await c.close()
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            proc.wait(timeout=30)
        await db.dispose()
    med = {k: statistics.median(v) for k, v in results.items() if "lat" not in k}

    def lat(key: str) -> str:
        return f"p50 {pct(results[key], .5):7.1f} ms  p99 {pct(results[key], .99):7.1f} ms"

    relay = "in the API process" if args.relay_in_api else "and jobs in a process of their own"
    print(f"ingest FHIR benchmark: {args.rounds} rounds (median), {args.workers} API "
          f"process(es) `ccm serve ingest`, relay {relay}, {args.concurrency} connections, "
          f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}")
    print(f"  validate-only POST      {med['validate']:8.0f} req/s   {lat('vlat')}")
    print(cpu.line("validate", "request"))
    print(f"  durable POST (+events)  {med['post']:8.0f} req/s   {lat('lat')}"
          f"   ratio {med['post_ratio']:.2f} (target >= 0.6; >= 1000/s)")
    print(cpu.line("post", "request"))
    print(f"  Bundle validation       {med['bvalidate']:8.0f} resources/s   {lat('bvlat')}")
    print(cpu.line("bvalidate", "resource"))
    print(f"  transaction Bundle      {med['bundle']:8.0f} resources/s   {lat('blat')}"
          f"   ratio {med['bundle_ratio']:.2f} (target >= 0.55; >= 2000/s)")
    print(cpu.line("bundle", "resource"))
    print(f"  outbox drained to Kafka {drained:.1f} s after the last write")
    print(f"  peak RSS per service process (API…, relay): "
          f"{', '.join(f'{p:.0f} MB' for p in peak)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posts", type=int, default=2000, help="POSTs per round")
    parser.add_argument("--bundles", type=int, default=10, help="transaction Bundles per round")
    parser.add_argument("--bundle-size", type=int, default=500, help="entries per Bundle")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--bundle-concurrency", type=int, default=2,
                        help="transaction Bundles in flight")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (each with its own port)")
    parser.add_argument("--relay-in-api", action="store_true",
                        help="run the outbox relay and the background jobs inside the API "
                        "process(es) instead of a process of their own "
                        "(`ccm serve ingest --no-api --relay`)")
    parser.add_argument("--pool", type=int, default=10,
                        help="database connections per server process (CCM_DB_POOL_SIZE)")
    parser.add_argument("--patients", type=int, default=200,
                        help="patients the POSTed Encounters are spread over (round robin); "
                        "1 measures the hot-patient case, where each batch of writes waits for the "
                        "previous one's commit (events of one patient are sequenced)")
    parser.add_argument("--rounds", type=int, default=5)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
