"""The ``local`` provider in process: real engine processes on this host through the
local runtime, GPUs from a pool with a fake host's GPUs, records in a state
directory a second provider (a restarted service) reads. Every test ends with
no process carrying its installation's marker."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from overnight.console.provisioners.base import ProvisionError, ProvisionRequest
from overnight.console.provisioners.local import JOB_ENV, MARKER, LocalProvisioner
from overnight.runtimes.gpus import Gpu, GpuPool
from overnight.runtimes.local import ID_ENV, OWNER_ENV
from overnight.templates.resolve import resolve
from overnight.templates.source import StaticSource

GPU_ENGINE = """\
import os, sys
port, out = sys.argv[1], sys.argv[2]
with open(out + "." + port, "w") as f:
    f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
os.execvp(sys.executable, [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", port])
"""


def _template(name: str = "tiny", *, command: list[str] | None = None, gpus: int = 0, ready: float = 30) -> dict:
    engine: dict[str, Any] = {"type": "mock", "ready_timeout_seconds": ready}
    if command is not None:
        engine["command"] = command
    return {"kind": "ModelDeploymentTemplate", "name": name, "version": "1", "spec": {
        "engine": engine, "model_source": {"type": "local", "uri": "mock"},
        "accelerator": {"type": "H100" if gpus else "cpu", "count": gpus}, "parallelism": {"tp": max(1, gpus)},
        "supported_endpoints": ["/v1/chat/completions"]}}


def _request(job_id: str, installation: str, template: dict | None = None) -> ProvisionRequest:
    t = template or _template()
    resolved = resolve(StaticSource([t]), {"name": t["name"]}, None)
    return ProvisionRequest(job_id=job_id, tenant="t", installation_id=installation, idempotency_key=job_id,
                            template=resolved.to_record())


def _procs(installation: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and \
                    p.environ().get(OWNER_ENV, "").startswith(f"{MARKER}/{installation}/"):
                out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


@pytest.fixture
def inst():
    installation = "test-" + uuid.uuid4().hex[:8]
    yield installation
    left = _procs(installation)
    for p in left:
        p.kill()
    assert not left, left


async def _until(p: LocalProvisioner, pid: str, status: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        s = await p.status(pid)
        if s.status == status or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.1)


async def test_a_provision_runs_an_engine_that_is_released_for_good(tmp_path: Path, inst: str) -> None:
    p = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=[]))
    a = await p.provision(_request("job_a", inst))
    assert a.status == "provisioning" and a.job_id == "job_a" and a.installation_id == inst
    assert (await p.provision(_request("job_a", inst))).provision_id == a.provision_id  # idempotent
    s = await _until(p, a.provision_id, "running")
    assert s.status == "running" and s.endpoint.startswith("http://127.0.0.1:")
    procs = _procs(inst)
    assert procs and {pr.environ()[JOB_ENV] for pr in procs} == {"job_a"}
    assert len({pr.environ()[ID_ENV] for pr in procs}) == 1  # one engine for the key
    assert await p.release(a.provision_id) is True
    assert _procs(inst) == []
    assert (await p.status(a.provision_id)).status == "released"
    assert await p.release(a.provision_id) is True
    assert await p.list_owned(inst) == []
    await p.aclose()


async def test_the_engine_outlives_the_provider_and_a_new_one_finds_it(tmp_path: Path, inst: str) -> None:
    first = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=[]))
    a = await first.provision(_request("job_a", inst))
    await _until(first, a.provision_id, "running")
    await first.aclose()  # the service stops (its guard does not watch the service: detached)
    second = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=[]))
    s = await second.status(a.provision_id)
    assert s.status == "running" and s.raw["pid"] == a.raw["pid"]
    again = await second.provision(_request("job_a", inst))
    assert again.provision_id == a.provision_id and again.raw["pid"] == a.raw["pid"]
    assert [o.provision_id for o in await second.list_owned(inst)] == [a.provision_id]
    assert await second.release(a.provision_id)
    assert _procs(inst) == []
    await second.aclose()


async def test_gpus_are_reserved_shared_out_and_adopted_after_a_restart(tmp_path: Path, inst: str) -> None:
    script = tmp_path / "gpu_engine.py"
    script.write_text(GPU_ENGINE)
    seen = tmp_path / "seen"
    t = _template("g", command=[sys.executable, str(script), "{port}", str(seen)], gpus=1)
    host = [Gpu(0, "NVIDIA H100 80GB HBM3", 81559)]
    p = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=host))
    assert await p.catalog() == [{"provider": "local", "gpu_type": "NVIDIA H100 80GB HBM3", "region": p.runtime.hostname,
                                  "count": 1, "free": 1, "memory_mib": 81559, "price_per_hour": None}]
    a = await p.provision(_request("job_a", inst, t))
    assert (await _until(p, a.provision_id, "running")).raw["gpus"] == [0]
    assert (await p.catalog())[0]["free"] == 0
    with pytest.raises(ProvisionError) as busy:
        await p.provision(_request("job_b", inst, t))
    assert busy.value.retryable and busy.value.code == "no_capacity"
    with pytest.raises(ProvisionError) as never:
        await p.provision(_request("job_c", inst, _template("g2", gpus=2)))
    assert not never.value.retryable and "needs 2 GPUs but this host has 1" in never.value.message
    # a restarted service: a fresh pool learns GPU 0 is held from the running engine's record
    await p.aclose()
    p2 = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=host))
    with pytest.raises(ProvisionError) as busy:
        await p2.provision(_request("job_b", inst, t))
    assert busy.value.retryable
    assert await p2.release(a.provision_id)
    b = await p2.provision(_request("job_b", inst, t))
    await _until(p2, b.provision_id, "running")
    assert sorted(x.read_text() for x in tmp_path.glob("seen.*")) == ["0", "0"]
    assert await p2.release(b.provision_id)
    assert p2.gpus.free == 1
    await p2.aclose()


async def test_list_owned_finds_an_unrecorded_engine_and_the_sweep_keeps_to_this_installation(
        tmp_path: Path, inst: str) -> None:
    from overnight.console.planner import Planner, PlannerConfig
    from overnight.store.memory import MemoryStore

    p = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=[]))
    other = f"{inst}-other"
    a = await p.provision(_request("job_a", inst))
    b = await p.provision(_request("job_b", other))
    (tmp_path / "state" / f"{a.provision_id}.json").unlink()  # a service killed before the record was written
    owned = await p.list_owned(inst)
    assert [(o.provision_id, o.status, o.job_id) for o in owned] == [(a.provision_id, "failed", "job_a")]
    planner = Planner(store=MemoryStore(), storage=None, provisioners={"local": p}, limits=None,
                      config=PlannerConfig(installation_id=inst))
    assert await planner.sweep() == [a.provision_id]  # its job is unknown here
    assert _procs(inst) == [] and _procs(other)  # the other installation's engine runs on
    assert await p.release(b.provision_id)
    assert _procs(other) == []
    await p.aclose()


async def test_an_engine_that_exits_or_never_gets_ready_is_failed_with_its_log(tmp_path: Path, inst: str) -> None:
    p = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=[]))
    crash = _template("crash", command=[sys.executable, "-c", "import sys; print('out of memory'); sys.exit(3)",
                                               "{port}"])
    a = await p.provision(_request("job_a", inst, crash))
    s = await _until(p, a.provision_id, "failed")
    assert s.status == "failed" and "exited with code 3" in s.error and "out of memory" in s.error
    assert await p.release(a.provision_id)
    slow = _template("slow", command=[sys.executable, "-c", "import time; print('loading'); time.sleep(60)",
                                             "{port}"], ready=1)
    b = await p.provision(_request("job_b", inst, slow))
    s = await _until(p, b.provision_id, "failed", timeout_s=10)
    assert s.status == "failed" and "not ready within 1 s" in s.error
    t0 = time.monotonic()
    assert await p.release(b.provision_id)
    assert time.monotonic() - t0 < 15 and _procs(inst) == []
    await p.aclose()


async def test_a_command_that_does_not_exist_is_refused_and_leaves_no_record(tmp_path: Path, inst: str) -> None:
    p = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=[]))
    with pytest.raises(ProvisionError) as err:
        await p.provision(_request("job_a", inst, _template("x", command=["/nonexistent/engine", "{port}"])))
    assert not err.value.retryable and "not found" in err.value.message
    assert list((tmp_path / "state").glob("*.json")) == []
    with pytest.raises(ProvisionError) as err:
        await p.status("local_nope")
    assert err.value.code == "not_found"
    await p.aclose()


async def test_a_start_recorded_without_its_handle_is_started_again_never_twice(tmp_path: Path, inst: str) -> None:
    p = LocalProvisioner(tmp_path / "state", gpus=GpuPool(gpus=[]))
    a = await p.provision(_request("job_a", inst))
    await _until(p, a.provision_id, "running")
    # the record as a crash between the process start and the handle's write leaves it
    path = tmp_path / "state" / f"{a.provision_id}.json"
    import json

    rec = json.loads(path.read_text())
    rec["handle"], rec["status"] = None, "starting"
    path.write_text(json.dumps(rec))
    assert (await p.status(a.provision_id)).status == "failed"
    old = {pr.pid for pr in _procs(inst)}
    b = await p.provision(_request("job_a", inst))
    assert b.provision_id == a.provision_id
    await _until(p, b.provision_id, "running")
    now = {pr.pid for pr in _procs(inst)}
    assert now and not now & old  # the unrecorded engine was stopped, one new one runs
    assert len({pr.environ()[ID_ENV] for pr in _procs(inst)}) == 1
    assert await p.release(b.provision_id)
    await p.aclose()


def test_the_guard_of_a_detached_engine_ignores_its_parents_death(tmp_path: Path) -> None:
    import subprocess

    from overnight.runtimes.local import GUARD

    # a parent that starts the guard with --parent 0 and exits at once
    code = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-I', {GUARD!r}, '--parent', '0', "
            f"'--grace', '1', '--', sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    pid = int(parent.stdout)
    try:
        time.sleep(1.0)  # the parent is long gone: a watching guard would have stopped by now
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert [c.cmdline()[-1] for c in psutil.Process(pid).children()] == ["import time; time.sleep(60)"]
    finally:
        os.killpg(pid, 15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                pr.status() != psutil.STATUS_ZOMBIE for pr in psutil.process_iter() if _in_group(pr, pid)):
            time.sleep(0.1)


def _in_group(pr: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(pr.pid) == pgid
    except OSError:
        return False
