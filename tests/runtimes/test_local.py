"""The local runtime with real processes: a fake engine, a fake nvidia-smi, a stand-in service."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

from overnight.errors import GpusBusy, OvernightError, RuntimeStartError
from overnight.runtimes import runtime_class
from overnight.runtimes.gpus import GpuPool
from overnight.runtimes.local import ID_ENV, OWNER_ENV, LocalRuntime, LocalSpec, _log_name, read_tail

HERE = Path(__file__).parent
FAKE = str(HERE / "fake_engine.py")


def marked(prefix: str) -> list[psutil.Process]:
    """Live processes whose owner marker starts with ``prefix``."""
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(OWNER_ENV, "").startswith(prefix):
                out.append(proc)
        except psutil.Error:
            continue
    return out


def wait_until(cond, timeout_s: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


@pytest.fixture
def installation() -> str:
    """A fresh installation id; afterwards no process may carry its marker."""
    inst = "test-" + uuid.uuid4().hex[:10]
    yield inst
    left = marked(inst + "/")
    if left:
        wait_until(lambda: not marked(inst + "/"), 3.0)
        left = marked(inst + "/")
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    assert not left, f"processes survived: {[(p.pid, p.cmdline()) for p in left]}"


@pytest.fixture
def runtime(tmp_path: Path, installation: str) -> LocalRuntime:
    return LocalRuntime(log_dir=tmp_path / "engines", installation_id=installation, gpus=GpuPool(gpus=[]))


def fake(*args: str, **kw) -> dict:
    spec = {"name": "fake-model", "command": [sys.executable, FAKE, "--port", "{port}", *args], "stop_grace_seconds": 3}
    spec.update(kw)
    return spec


def group_pids(pgid: int) -> list[int]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return out


# -- spec -----------------------------------------------------------------------


def test_registry_maps_local() -> None:
    assert runtime_class("local") is LocalRuntime
    assert LocalRuntime.spec_model is LocalSpec


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "m", "command": []}, "command"),
        ({"name": "m"}, "command"),
        ({"name": "", "command": ["x"]}, "name"),
        ({"name": "m", "command": ["x"], "gpus": -1}, "gpus"),
        ({"name": "m", "command": ["x"], "health_endpoint": "health"}, "health_endpoint"),
        ({"name": "m", "command": ["x"], "ready_timeout_seconds": 0}, "ready_timeout_seconds"),
        ({"name": "m", "command": ["x"], "env": {OWNER_ENV: "x"}}, "env"),
        ({"name": "m", "command": ["x"], "colour": "blue"}, "colour"),
        ({"type": "endpoint", "name": "m", "command": ["x"]}, "type"),
    ],
)
def test_spec_errors_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        LocalSpec.model_validate(body)
    assert field in str(exc.value)


async def test_unknown_command_is_a_clear_error(runtime: LocalRuntime) -> None:
    with pytest.raises(RuntimeStartError, match="no-such-engine-binary"):
        await runtime.acquire({"name": "m", "command": ["no-such-engine-binary"]}, owner="b1")


# -- start, ready, failures -----------------------------------------------------


async def test_ready_then_release(runtime: LocalRuntime, installation: str) -> None:
    recorded: list[dict] = []

    async def record(handle: dict) -> None:
        # The process exists when the handle is recorded.
        assert psutil.pid_exists(handle["pid"])
        recorded.append(dict(handle))

    handle = await runtime.acquire(fake("--lines", "3"), owner="batch_1", record=record)
    assert recorded == [handle]
    assert json.loads(json.dumps(handle)) == handle
    assert handle["type"] == "local" and handle["owner"] == "batch_1" and handle["pgid"] == handle["pid"]
    assert handle["url"] == f"http://127.0.0.1:{handle['port']}"
    assert handle["gpus"] == [] and handle["host"]
    endpoint = await runtime.wait_ready(handle, timeout_s=20)
    assert endpoint.url == handle["url"]
    assert await runtime.alive(handle)
    # Own session and group, away from the test's.
    assert os.getpgid(handle["pid"]) == handle["pid"] != os.getpgrp()
    assert os.getsid(handle["pid"]) == handle["pid"]
    tail = runtime.log_tail(handle)
    assert "fake engine line 3" in tail and "starting engine 'fake-model' for batch_1" in tail
    await runtime.release(handle)
    assert not await runtime.alive(handle)
    assert not marked(installation + "/")
    await runtime.release(handle)  # idempotent


async def test_the_port_is_held_until_the_engine_listens(runtime: LocalRuntime) -> None:
    # vLLM imports for seconds before it binds: meanwhile nothing else may get its
    # port, neither another program nor another replica's engine (whose health
    # answer would pass for this one's).
    import socket

    handle = await runtime.acquire(fake("--sleep", "1.5"), owner="b_hold")
    try:
        other = socket.socket()
        with pytest.raises(OSError) as exc:
            other.bind(("127.0.0.1", handle["port"]))
        other.close()
        assert exc.value.errno == errno.EADDRINUSE
        await runtime.wait_ready(handle, timeout_s=20)  # the engine could bind it all the same
        assert not runtime._holds
    finally:
        await runtime.release(handle)
    # An engine that never listens gives its port back when it is released.
    handle = await runtime.acquire(fake("--never-listen"), owner="b_hold2")
    assert list(runtime._holds) == [handle["id"]]
    await runtime.release(handle)
    assert not runtime._holds


def test_where_ports_cannot_be_held_one_is_picked_and_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    # BSD and macOS share a port between two sockets only when both set SO_REUSEPORT:
    # a held port would keep a uvicorn-style engine (SO_REUSEADDR only) from binding.
    import socket

    from overnight.runtimes import local

    monkeypatch.setattr(local, "HOLDS_PORTS", False)
    port, hold = local.reserve_port()
    assert hold is None and 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


async def test_ready_timeout_quotes_the_log(runtime: LocalRuntime) -> None:
    handle = await runtime.acquire(fake("--never-listen", "--lines", "30"), owner="b_timeout")
    t0 = time.monotonic()
    with pytest.raises(RuntimeStartError) as exc:
        await runtime.wait_ready(handle, timeout_s=1.5)
    assert time.monotonic() - t0 < 5
    msg = str(exc.value)
    assert "not ready within 1.5 s" in msg
    assert "fake engine line 30" in msg and "fake engine line 11" in msg and "fake engine line 10\n" not in msg
    # wait_ready leaves the engine to the caller's release.
    assert await runtime.alive(handle)
    await runtime.release(handle)


async def test_a_503_health_is_not_ready(runtime: LocalRuntime) -> None:
    # SGLang answers /health with 503 while it warms up.
    handle = await runtime.acquire(fake("--health-status", "503"), owner="b_503")
    try:
        with pytest.raises(RuntimeStartError, match="not ready within 1 s"):
            await runtime.wait_ready(handle, timeout_s=1)
    finally:
        await runtime.release(handle)


def test_logs_are_per_owner_and_tails_are_bounded(tmp_path: Path) -> None:
    assert _log_name("batch_abc") == "batch_abc.log"
    assert _log_name("tenant/a") != _log_name("tenant_a") != _log_name("tenant:a")
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert read_tail(log, 3) == "line 99997\nline 99998\nline 99999"
    assert read_tail(tmp_path / "missing.log", 3) == ""


async def test_engine_exiting_at_start_names_code_and_log(runtime: LocalRuntime) -> None:
    handle = await runtime.acquire(fake("--never-listen", "--lines", "2", "--exit-after", "0.2", "--exit-code", "3"), owner="b_exit")
    with pytest.raises(RuntimeStartError) as exc:
        await runtime.wait_ready(handle, timeout_s=20)
    msg = str(exc.value)
    assert "exited with code 3" in msg
    assert "fake engine line 2" in msg and "fake engine exiting with 3" in msg
    assert runtime.exit_info(handle)["exit_code"] == 3
    await runtime.release(handle)


async def test_crash_is_seen_by_alive(runtime: LocalRuntime) -> None:
    handle = await runtime.acquire(fake("--exit-after", "1.0", "--exit-code", "7", "--child"), owner="b_crash")
    await runtime.wait_ready(handle, timeout_s=20)
    assert await runtime.alive(handle)
    deadline = time.monotonic() + 10
    while await runtime.alive(handle) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not await runtime.alive(handle)
    info = runtime.exit_info(handle)
    assert info["exit_code"] == 7 and "fake engine exiting with 7" in info["log_tail"]
    # The guard took the engine's child down with it.
    assert group_pids(handle["pgid"]) == []
    await runtime.release(handle)


# -- release --------------------------------------------------------------------


async def test_release_kills_grandchildren(runtime: LocalRuntime, installation: str) -> None:
    handle = await runtime.acquire(fake("--child"), owner="b_tree")
    await runtime.wait_ready(handle, timeout_s=20)
    assert wait_until(lambda: len(group_pids(handle["pgid"])) >= 3, 5)  # guard, engine, grandchild
    await runtime.release(handle)
    assert group_pids(handle["pgid"]) == []
    assert not marked(installation + "/")


async def test_sigterm_to_the_guard_stops_the_group(runtime: LocalRuntime) -> None:
    handle = await runtime.acquire(fake("--child"), owner="b_term")
    await runtime.wait_ready(handle, timeout_s=20)
    os.kill(handle["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 5
    while await runtime.alive(handle) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not await runtime.alive(handle)
    assert wait_until(lambda: group_pids(handle["pgid"]) == [], 2)
    assert "stopping the engine (SIGTERM)" in runtime.log_tail(handle)
    await runtime.release(handle)


async def test_release_escalates_to_sigkill(runtime: LocalRuntime, installation: str) -> None:
    handle = await runtime.acquire(fake("--child", "--ignore-term", stop_grace_seconds=0.5), owner="b_stubborn")
    await runtime.wait_ready(handle, timeout_s=20)
    t0 = time.monotonic()
    await runtime.release(handle)
    assert time.monotonic() - t0 < 5
    assert group_pids(handle["pgid"]) == []
    assert not marked(installation + "/")


async def test_release_finds_a_process_that_left_the_group(runtime: LocalRuntime, installation: str) -> None:
    handle = await runtime.acquire(fake(), owner="b_escape")
    await runtime.wait_ready(handle, timeout_s=20)
    # A descendant in its own session: only the id marker in its environment finds it.
    env = {**os.environ, OWNER_ENV: f"{installation}/b_escape", ID_ENV: handle["id"]}
    escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    try:
        await runtime.release(handle)
        assert escaped.wait(5) is not None
    finally:
        if escaped.poll() is None:
            escaped.kill()


async def test_reused_pid_is_never_signalled(runtime: LocalRuntime) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        # A stale handle whose pid now belongs to someone else (other start time, no marker).
        handle = {
            "type": "local", "owner": "b_old", "id": uuid.uuid4().hex, "name": "m", "pid": bystander.pid,
            "pgid": bystander.pid, "start_time": psutil.Process(bystander.pid).create_time() - 1000,
            "port": 1, "url": "http://127.0.0.1:1", "log_path": "/nonexistent", "gpus": [],
            "host": runtime.hostname, "stop_grace_seconds": 0.2,
        }
        assert not await runtime.alive(handle)
        await runtime.release(handle)
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def test_a_handle_of_another_host(runtime: LocalRuntime) -> None:
    handle = {"type": "local", "owner": "b", "id": "x", "pid": os.getpid(), "pgid": os.getpgrp(),
              "start_time": psutil.Process().create_time(), "port": 1, "url": "http://127.0.0.1:1",
              "log_path": "/nonexistent", "gpus": [], "host": "elsewhere.example"}
    assert not await runtime.alive(handle)
    with pytest.raises(OvernightError, match="elsewhere.example"):
        await runtime.release(handle)


async def test_record_failure_stops_the_engine(runtime: LocalRuntime, installation: str) -> None:
    async def record(_: dict) -> None:
        raise OSError("store down")

    with pytest.raises(OSError, match="store down"):
        await runtime.acquire(fake(), owner="b_unrecorded", record=record)
    assert not marked(installation + "/")


# -- the service dies -----------------------------------------------------------


def test_sigkill_of_the_service_takes_the_engine_down(tmp_path: Path, installation: str) -> None:
    out = tmp_path / "handle.json"
    spec = fake("--child", stop_grace_seconds=1)
    service = subprocess.Popen(
        [sys.executable, str(HERE / "service_stub.py"), str(tmp_path / "engines"), installation, str(out), json.dumps(spec)]
    )
    try:
        assert wait_until(lambda: out.exists() or service.poll() is not None, 30)
        assert out.exists(), f"service exited with {service.returncode}"
        handle = json.loads(out.read_text())
        assert wait_until(lambda: len(marked(installation + "/")) >= 3, 5)
        service.send_signal(signal.SIGKILL)
        service.wait()
        t0 = time.monotonic()
        # (A process on its way out may no longer show its environment: check the group too.)
        gone = wait_until(lambda: not marked(installation + "/") and not group_pids(handle["pgid"]), 5)
        assert gone, "engine survived the service"
        assert time.monotonic() - t0 < 5
    finally:
        if service.poll() is None:
            service.kill()


async def test_sweep_releases_orphans_only(tmp_path: Path, installation: str) -> None:
    # Engines started by a runtime object that is then forgotten (a previous process).
    old = LocalRuntime(log_dir=tmp_path / "engines", installation_id=installation, gpus=GpuPool(gpus=[]))
    orphan = await old.acquire(fake("--child"), owner="batch_dead")
    live = await old.acquire(fake(), owner="batch_live")
    foreign_inst = installation + "x"
    other = LocalRuntime(log_dir=tmp_path / "engines", installation_id=foreign_inst, gpus=GpuPool(gpus=[]))
    foreign = await other.acquire(fake(), owner="batch_dead")
    try:
        await old.wait_ready(orphan, timeout_s=20)
        await old.wait_ready(live, timeout_s=20)
        await other.wait_ready(foreign, timeout_s=20)
        fresh = LocalRuntime(log_dir=tmp_path / "engines", installation_id=installation, gpus=GpuPool(gpus=[]))
        released = await fresh.sweep({"batch_live"})
        assert [h["owner"] for h in released] == ["batch_dead"]
        assert released[0]["id"] == orphan["id"] and released[0]["pgid"] == orphan["pgid"]
        assert group_pids(orphan["pgid"]) == []
        assert await fresh.alive(live)
        assert await other.alive(foreign)  # another installation's engine is left alone
        assert await fresh.sweep({"batch_live"}) == []
    finally:
        await old.release(live)
        await other.release(foreign)
        await old.release(orphan)
    assert not marked(foreign_inst + "/")


# -- GPUs -----------------------------------------------------------------------


@pytest.fixture
def two_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559'\necho '1, NVIDIA H100 80GB HBM3, 81559'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def env_of(path: Path) -> dict[str, str]:
    assert wait_until(path.exists, 10)
    return json.loads(path.read_text())["env"]


async def test_gpus_are_assigned_apart(tmp_path: Path, installation: str, two_gpus: None) -> None:
    rt = LocalRuntime(log_dir=tmp_path / "engines", installation_id=installation)
    assert rt.gpus.total == 2 and rt.gpus.gpus[0].name == "NVIDIA H100 80GB HBM3"
    a = await rt.acquire(fake("--env-file", str(tmp_path / "a.json"), gpus=1), owner="ba")
    b = await rt.acquire(fake("--env-file", str(tmp_path / "b.json"), gpus=1), owner="bb")
    try:
        env_a, env_b = env_of(tmp_path / "a.json"), env_of(tmp_path / "b.json")
        assert {env_a["CUDA_VISIBLE_DEVICES"], env_b["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
        assert env_a["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env_a[OWNER_ENV] == f"{installation}/ba"
        assert sorted(a["gpus"] + b["gpus"]) == [0, 1]
        with pytest.raises(GpusBusy) as busy:
            await rt.acquire(fake(gpus=1), owner="bc")
        assert busy.value.retryable and busy.value.free == 0 and busy.value.total == 2
        await rt.release(a)
        c = await rt.acquire(fake("--env-file", str(tmp_path / "c.json"), gpus=1), owner="bc")
        assert env_of(tmp_path / "c.json")["CUDA_VISIBLE_DEVICES"] == str(a["gpus"][0])
        await rt.release(c)
    finally:
        await rt.release(a)
        await rt.release(b)
    assert rt.gpus.free == 2


async def test_more_gpus_than_the_host_has(tmp_path: Path, installation: str, two_gpus: None) -> None:
    rt = LocalRuntime(log_dir=tmp_path / "engines", installation_id=installation)
    with pytest.raises(RuntimeStartError, match="needs 4 GPUs but this host has 2"):
        rt.check(fake(gpus=4))
    with pytest.raises(RuntimeStartError, match="needs 4 GPUs but this host has 2"):
        await rt.acquire(fake(gpus=4), owner="b4")
    assert rt.gpus.free == 2


async def test_overnight_gpus_restricts(tmp_path: Path, installation: str, two_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_GPUS", "1")
    rt = LocalRuntime(log_dir=tmp_path / "engines", installation_id=installation)
    assert rt.gpus.total == 1
    with pytest.raises(RuntimeStartError, match=r"needs 2 GPUs but this host has 1 usable \(per OVERNIGHT_GPUS=1\)"):
        rt.check(fake(gpus=2))
    a = await rt.acquire(fake("--env-file", str(tmp_path / "a.json"), gpus=1), owner="ba")
    try:
        assert env_of(tmp_path / "a.json")["CUDA_VISIBLE_DEVICES"] == "1"
    finally:
        await rt.release(a)


async def test_reattach_adopts_gpus(tmp_path: Path, installation: str, two_gpus: None) -> None:
    old = LocalRuntime(log_dir=tmp_path / "engines", installation_id=installation)
    a = await old.acquire(fake(gpus=2), owner="ba")
    try:
        fresh = LocalRuntime(log_dir=tmp_path / "engines", installation_id=installation)
        assert fresh.gpus.free == 2
        assert await fresh.alive(a)  # the next process finds it running ...
        assert fresh.gpus.free == 0  # ... and counts its GPUs as taken
        with pytest.raises(GpusBusy):
            await fresh.acquire(fake(gpus=1), owner="bb")
        await fresh.release(a)
        assert fresh.gpus.free == 2
    finally:
        await old.release(a)


def test_no_nvidia_smi_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    pool = GpuPool()
    assert pool.total == 0
    pool.check_fits(0)
    with pytest.raises(RuntimeStartError, match="needs 1 GPU but this host has 0"):
        pool.reserve("x", 1)


def test_overnight_gpus_naming_a_missing_gpu(two_gpus: None) -> None:
    with pytest.raises(RuntimeStartError, match="OVERNIGHT_GPUS names GPU 5"):
        _ = GpuPool(allowed=[0, 5]).total


# -- the real mock engine -------------------------------------------------------


async def test_the_mock_engine_as_a_local_engine(runtime: LocalRuntime, installation: str) -> None:
    spec = {
        "name": "mock",
        "command": [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--host", "{host}", "--port", "{port}"],
        "stop_grace_seconds": 5,
    }
    handle = await runtime.acquire(spec, owner="b_mock")
    try:
        endpoint = await runtime.wait_ready(handle, timeout_s=60)
        import httpx

        async with httpx.AsyncClient() as client:
            r = await client.get(endpoint.url + "/v1/models")
        assert r.status_code == 200
    finally:
        await runtime.release(handle)
    assert not marked(installation + "/")
