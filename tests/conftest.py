"""Shared fixtures: real processes for the service and the mock engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.sshd import Sshd

#: Fast timings so process tests finish in seconds.
# A CI runner may start the suite in the background, where SIGINT is ignored, and an
# ignored signal is inherited by every process a test starts: the tests that press
# Ctrl-C (the CLI's live view, `overnight run`) need it delivered, as on a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FAST_ENV = {
    "OVERNIGHT_CHECKPOINT_INTERVAL_S": "0.2",
    "OVERNIGHT_HEARTBEAT_S": "0.2",
    "OVERNIGHT_LEASE_S": "3",
    "OVERNIGHT_BACKOFF_BASE_S": "0.05",
    "OVERNIGHT_BACKOFF_MAX_S": "0.5",
    "OVERNIGHT_SCHEDULER_POLL_S": "0.1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
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
    args: list[str]
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    health: str = "/health"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Proc:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + self.health, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; log tail:\n{self.log()[-3000:]}") from None
        return self

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    """Starts processes and stops them all at teardown."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def mock_engine(self, *args: str, port: int | None = None) -> Proc:
        port = port or free_port()
        p = Proc(
            [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", str(port), *args],
            port, dict(os.environ), self.tmp / f"mock-{port}.log",
        )
        self.procs.append(p)
        return p.start()

    def server(self, *, engine_url: str | None, data_dir: Path | None = None, env: dict[str, str] | None = None,
               port: int | None = None, extra: tuple[str, ...] = ()) -> Proc:
        port = port or free_port()
        data_dir = data_dir or self.tmp / "data"
        args = [sys.executable, "-m", "overnight.cli.main", "serve", "--port", str(port), "--data-dir", str(data_dir), *extra]
        if engine_url:
            args += ["--engine-url", engine_url]
        p = Proc(args, port, {**os.environ, **FAST_ENV, **(env or {})}, self.tmp / f"serve-{port}.log")
        self.procs.append(p)
        return p.start()

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A real sshd on 127.0.0.1 with vllm/docker/sudo/nvidia-smi shims (``tests/sshd.py``),
    started; afterwards everything started through it is killed."""
    s = Sshd(tmp_path)
    try:
        s.start()
        s.check_path()
        yield s
    finally:
        s.close()
