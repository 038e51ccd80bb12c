"""Shared pieces of the benchmarks: processes, input files, measurements.

Benchmarks run real processes (``overnight mock-engine`` and ``overnight serve``)
on this machine and drive them the way a user would: aiohttp for the direct-load
bound, the official ``openai`` SDK for batches.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ENDPOINT = "/v1/chat/completions"
MODEL = "mock-model"

#: Server settings for benchmarks: the defaults, with scheduler polling fast enough
#: that a batch starts right after ``create`` (the tests use the same values).
SERVE_ENV = {
    "OVERNIGHT_SCHEDULER_POLL_S": "0.1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


@dataclass
class Proc:
    """A child process serving HTTP on ``port``."""

    name: str
    args: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Proc:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
        )
        wait_http(self.url + "/health", self.proc)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Procs:
    """Starts processes and stops them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def mock_engine(self, *args: str) -> Proc:
        port = free_port()
        p = Proc("mock", [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", str(port), *args],
                 port, self.workdir / f"mock-{port}.log")
        self.procs.append(p)
        return p.start()

    def server(self, *, engine_url: str, data_dir: Path | None = None, env: dict[str, str] | None = None,
               port: int | None = None) -> Proc:
        port = port or free_port()
        data_dir = data_dir or self.workdir / "data"
        args = [sys.executable, "-m", "overnight.cli.main", "serve", "--port", str(port),
                "--data-dir", str(data_dir), "--engine-url", engine_url, "--log-level", "warning"]
        p = Proc("serve", args, port, self.workdir / f"serve-{port}.log", env={**SERVE_ENV, **(env or {})})
        self.procs.append(p)
        return p.start()

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@contextmanager
def workspace(keep: bool = False) -> Iterator[Procs]:
    tmp = Path(tempfile.mkdtemp(prefix="overnight-bench-"))
    procs = Procs(tmp)
    try:
        yield procs
    finally:
        procs.close()
        if not keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"(kept {tmp})")


# --------------------------------------------------------------------------- input


def request_body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 16}


def write_input(path: Path, n: int) -> Path:
    """``n`` chat-completion request lines (about 150 bytes each)."""
    with path.open("wb") as f:
        chunk: list[bytes] = []
        for i in range(n):
            line = {"custom_id": f"req-{i}", "method": "POST", "url": ENDPOINT, "body": request_body(i)}
            chunk.append(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            if len(chunk) >= 10_000:
                f.write(b"".join(chunk))
                chunk.clear()
        f.write(b"".join(chunk))
    return path


# --------------------------------------------------------------------------- measurements


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (``VmHWM``), exact, from the kernel."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def mock_stats(engine_url: str) -> dict[str, Any]:
    return httpx.get(engine_url + "/stats", timeout=10).json()


def reset_stats(engine_url: str) -> None:
    httpx.post(engine_url + "/stats/reset", timeout=10)


# --------------------------------------------------------------------------- direct load


async def _direct(url: str, n: int, concurrency: int) -> tuple[float, dict[int, int]]:
    import aiohttp
    import orjson

    bodies = [orjson.dumps(request_body(i)) for i in range(n)]
    statuses: dict[int, int] = {}
    next_i = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:
        target = url + ENDPOINT

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                while True:
                    async with session.post(target, data=bodies[i]) as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.05)  # only on 429: a fixed-concurrency client just retries

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, statuses


async def _direct_http1(url: str, n: int, concurrency: int) -> tuple[float, dict[int, int]]:
    import orjson

    from overnight.executor.http1 import HttpPool

    bodies = [orjson.dumps(request_body(i)) for i in range(n)]
    statuses: dict[int, int] = {}
    next_i = 0
    pool = HttpPool(url)

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            while True:
                r = await pool.request("POST", ENDPOINT, bodies[i])
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 200:
                    break
                await asyncio.sleep(0.05)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await pool.aclose()
    return elapsed, statuses


def direct_load_http1(url: str, n: int, concurrency: int) -> tuple[float, dict[int, int]]:
    """Like ``direct_load`` but with overnight's own HTTP/1.1 client (``executor/http1.py``):
    the stricter bound, isolating what the batch machinery costs beyond the client."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_direct_http1(url, n, concurrency))


def direct_load(url: str, n: int, concurrency: int) -> tuple[float, dict[int, int]]:
    """Send ``n`` requests straight to the engine with ``concurrency`` in flight;
    returns (seconds, replies by status). Uses uvloop, as the service does."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_direct(url, n, concurrency))


# --------------------------------------------------------------------------- batches


TERMINAL = {"completed", "failed", "expired", "cancelled"}


def sdk_client(url: str):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="bench", max_retries=2, timeout=120)


def upload(client, path: Path):  # type: ignore[no-untyped-def]
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="batch")


def wait_batch(client, batch_id: str, *, poll_s: float = 0.1, timeout_s: float = 3600,  # type: ignore[no-untyped-def]
               phases: dict[str, float] | None = None):
    """Poll until the batch is terminal; ``phases`` receives the (perf_counter) time
    each status was first seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if phases is not None and b.status not in phases:
            phases[b.status] = time.perf_counter()
        if b.status in TERMINAL:
            return b
        time.sleep(poll_s)
    raise TimeoutError(f"batch {batch_id} not finished after {timeout_s}s")


def fmt_bytes(n: float) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"
