"""Start and stop `ccm` commands as real processes for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    """A `ccm …` subprocess with its output in a log file (dumped when a test fails)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = field(default=0)

    def start(self) -> None:
        self.starts += 1
        handle = self.log.open("a")
        handle.write(f"\n===== start {self.starts}: {' '.join(self.args)}\n")
        handle.flush()
        self.proc = subprocess.Popen(
            ["uv", "run", "--frozen", "--no-sync", *self.args], cwd=ROOT, env=self.env,
            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush — as a crashed pod."""
        self.stop(signal.SIGKILL)

    def tail(self, chars: int = 6000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]


def wait_ready(url: str, process: Process, timeout: float = 90, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process.proc is not None and process.proc.poll() is not None:
            raise AssertionError(f"{process.name} exited ({process.proc.returncode}):\n"
                                 f"{process.tail()}")
        try:
            resp = httpx.get(url + path, timeout=2)
            if resp.status_code == 200:
                return
            last = f"{resp.status_code} {resp.text[:300]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise AssertionError(f"{process.name} not ready at {url}{path} after {timeout}s ({last}):\n"
                         f"{process.tail()}")
