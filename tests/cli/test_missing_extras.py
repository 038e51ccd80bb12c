"""A backend whose extra is not installed is one clear line naming the extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs the CLI with the named top-level modules made unimportable, as on a
# machine where the extra was never installed.
_BLOCKED_RUNNER = textwrap.dedent(
    """
    import sys

    class _Blocker:
        def __init__(self, names):
            self.names = set(names)

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Blocker(sys.argv[1].split(",")))
    sys.argv = ["overnight", *sys.argv[2:]]
    from overnight.cli.main import main

    main()
    """
)


def _run_without(modules: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUNNER, modules, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "60", "HOME": str(Path.home())},
    )


CASES = [
    ("asyncpg", ["--store", "postgresql://u:p@127.0.0.1:1/db"], "postgres"),
    ("alembic", ["--store", "postgresql://u:p@127.0.0.1:1/db"], "postgres"),
    ("redis", ["--store", "redis://127.0.0.1:1/0"], "redis"),
    ("pymongo,bson", ["--store", "mongodb://127.0.0.1:1/db"], "mongo"),
    ("obstore", ["--storage", "s3://bucket/prefix"], "s3"),
]


def _assert_one_clear_line(proc: subprocess.CompletedProcess[str], extra: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if f"overnight[{extra}]" in line]
    # One line that names the extra, printed whole (not wrapped, not eaten as markup).
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'overnight[{extra}]'" in lines[0]


@pytest.mark.parametrize(("blocked", "args", "extra"), CASES, ids=[c[0] for c in CASES])
def test_serve_names_the_missing_extra(blocked: str, args: list[str], extra: str, tmp_path: Path) -> None:
    proc = _run_without(blocked, "serve", "--data-dir", str(tmp_path), "--engine-url", "http://127.0.0.1:1", *args)
    _assert_one_clear_line(proc, extra)


@pytest.mark.parametrize(
    ("blocked", "args", "extra"), [c for c in CASES if c[1][0] == "--store"], ids=[c[0] for c in CASES if c[1][0] == "--store"]
)
@pytest.mark.parametrize("command", ["upgrade", "current"])
def test_db_names_the_missing_extra(blocked: str, args: list[str], extra: str, command: str) -> None:
    proc = _run_without(blocked, "db", command, *args)
    _assert_one_clear_line(proc, extra)


def test_serve_runs_with_no_extra_installed(tmp_path: Path) -> None:
    # What `pip install -e . && overnight serve` gives on a fresh machine: no extra at
    # all. Every optional module is made unimportable; the service must start, answer
    # /health and run the console (whose default provider needs no extra).
    import os
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocked = "asyncpg,alembic,redis,pymongo,bson,obstore,kubernetes_asyncio,openai,aiohttp,moto"
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_RUNNER, blocked, "serve", "--port", str(port), "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **{k: v for k, v in os.environ.items()
                                                                    if k.startswith("PYTHON")}},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise TimeoutError("serve did not answer /health")
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/jobs", headers={"Authorization": "Bearer k"}, timeout=5)
        assert r.status_code == 200 and r.json()["object"] == "list"
    finally:
        proc.terminate()
        proc.wait(30)
