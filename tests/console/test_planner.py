"""The planner step by step, in process, on the memory store with a provider written
for the tests: what it calls and when, at every stage a cancel or a crash can meet."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from overnight.console import jobs
from overnight.console.planner import Planner, PlannerConfig
from overnight.console.provisioners.base import (
    ProvisionError,
    ProvisionRequest,
    ProvisionState,
)
from overnight.errors import ConflictError
from overnight.store.memory import MemoryStore
from overnight.store.records import DocRecord
from overnight.templates.source import StaticSource

TEMPLATE = {"kind": "ModelDeploymentTemplate", "name": "tiny", "version": "1", "spec": {
    "engine": {"type": "mock"}, "model_source": {"type": "local", "uri": "mock"},
    "accelerator": {"type": "cpu", "count": 0}, "supported_endpoints": ["/v1/chat/completions"]}}


class Provider:
    """A provider that records every call; resources run when the test says so."""

    name = "fake"
    ready_timeout_s = 60.0

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.running = True

    async def provision(self, req: ProvisionRequest) -> ProvisionState:
        self.calls.append(("provision", req.idempotency_key))
        for rid, r in self.resources.items():
            if r["key"] == req.idempotency_key:
                return self._state(rid)
        rid = f"res-{len(self.resources)}"
        self.resources[rid] = {"key": req.idempotency_key, "job": req.job_id, "inst": req.installation_id,
                               "gone": False}
        return self._state(rid)

    def _state(self, rid: str) -> ProvisionState:
        r = self.resources[rid]
        status = "released" if r["gone"] else ("running" if self.running else "provisioning")
        return ProvisionState(provision_id=rid, provider="fake", status=status, job_id=r["job"],
                              installation_id=r["inst"], endpoint="http://127.0.0.1:9" if status == "running" else None)

    async def status(self, pid: str) -> ProvisionState:
        self.calls.append(("status", pid))
        return self._state(pid)

    async def release(self, pid: str) -> bool:
        self.calls.append(("release", pid))
        self.resources[pid]["gone"] = True
        return True

    async def list_owned(self, inst: str) -> list[ProvisionState]:
        return [self._state(rid) for rid, r in self.resources.items() if r["inst"] == inst and not r["gone"]]

    async def catalog(self) -> list[dict[str, Any]]:
        return []

    async def aclose(self) -> None:
        return None

    def live(self) -> list[str]:
        return [rid for rid, r in self.resources.items() if not r["gone"]]


@pytest.fixture
def env():
    store, provider = MemoryStore(), Provider()
    planner = Planner(store=store, storage=None, provisioners={"fake": provider}, limits=None,
                      config=PlannerConfig(installation_id="inst-a", poll_s=0, retry_base_s=0))
    return store, provider, planner


async def _job(store: MemoryStore, **body: Any) -> DocRecord:
    from overnight.templates.resolve import resolve

    resolved = resolve(StaticSource([TEMPLATE]), {"name": "tiny"}, None)
    req = jobs.JobCreate({"input_dataset": "file-x", "endpoint": "/v1/chat/completions", **body})
    return await jobs.create_job(store=store, tenant="t", req=req, resolved=resolved.to_record(), provider="fake",
                                 installation_id="inst-a")


async def _release_all(store: MemoryStore, planner: Planner) -> None:
    for prov in await store.list_docs(jobs.PROVISION, statuses=("release_pending",), limit=100):
        await planner.release(prov.id)


async def test_a_job_cancelled_while_queued_never_reaches_the_provider(env) -> None:
    store, provider, planner = env
    job = await _job(store)
    rec = await jobs.cancel_job(store=store, tenant="t", job_id=job.id)
    assert rec.status == "cancelled"
    await planner.step(job.id)
    assert provider.calls == [] and (await store.get_doc(jobs.JOB, job.id)).status == "cancelled"


async def test_a_cancel_racing_the_planners_take_leaves_nothing_behind(env) -> None:
    # The planner wrote the provisioning record, then lost its compare-and-set to
    # the cancel: the record is adopted and released at the next tick.
    store, provider, planner = env
    job = await _job(store)
    original = planner._write

    async def cancel_first(j, change, **kw):
        await jobs.cancel_job(store=store, tenant="t", job_id=job.id)
        planner._write = original
        return await original(j, change, **kw)

    planner._write = cancel_first
    with pytest.raises(ConflictError):
        await planner.step(job.id)
    assert (await store.get_doc(jobs.JOB, job.id)).status == "cancelled"
    await planner.tick()
    await _drain(planner)
    await _release_all(store, planner)
    assert provider.calls == [] or all(c[0] != "provision" for c in provider.calls)
    assert not provider.live()


async def _drain(planner: Planner) -> None:
    while planner._steps:
        await asyncio.gather(*list(planner._steps), return_exceptions=True)


async def test_provisioning_is_idempotent_across_a_crash_before_the_id_was_stored(env) -> None:
    store, provider, planner = env
    provider.running = False
    job = await _job(store)
    await planner.step(job.id)  # queued -> resource_preparing (the record is written first)
    # a crash right after the provider accepted, before its id was stored:
    await provider.provision(planner._request(await store.get_doc(jobs.JOB, job.id)))
    await planner.step(job.id)  # asks again with the same key
    assert len(provider.resources) == 1
    prov = await store.get_doc(jobs.PROVISION, (await store.get_doc(jobs.JOB, job.id)).body["provision_id"])
    assert prov.body["provider_id"] == "res-0"


async def test_a_cancel_while_submitting_releases_without_creating_a_batch(env) -> None:
    store, provider, planner = env
    job = await _job(store)
    await planner.step(job.id)  # take
    await planner.step(job.id)  # provision: running at once -> submitting
    assert (await store.get_doc(jobs.JOB, job.id)).status == "submitting"
    await jobs.cancel_job(store=store, tenant="t", job_id=job.id)
    await planner.step(job.id)
    j = await store.get_doc(jobs.JOB, job.id)
    assert j.status == "cancelled" and j.body["batch_id"] is None
    await _release_all(store, planner)
    assert not provider.live() and ("release", "res-0") in provider.calls
    types = [e["type"] for e in (await store.get_doc(jobs.JOB, job.id)).body["events"]]
    assert types[-2:] == ["release_requested", "release_confirmed"] or "release_confirmed" in types


async def test_retryable_provider_errors_are_retried_then_fail_at_the_deadline(env) -> None:
    store, provider, planner = env
    calls = []

    async def no_capacity(req):
        calls.append(req)
        raise ProvisionError("no capacity", retryable=True)

    provider.provision = no_capacity
    job = await _job(store, provision_resource_deadline=time.time() + 0.3)
    await planner.step(job.id)
    await planner.step(job.id)
    assert (await store.get_doc(jobs.JOB, job.id)).status == "resource_preparing"
    await asyncio.sleep(0.35)
    await planner.step(job.id)
    j = await store.get_doc(jobs.JOB, job.id)
    assert j.status == "resource_failed" and "provision_resource_deadline" in j.body["error_message"]
    assert len(calls) == 2


async def test_the_sweep_releases_only_this_installations_orphans(env) -> None:
    store, provider, planner = env
    done = await _job(store)
    await planner.step(done.id)
    await planner.step(done.id)  # submitting, with a live resource
    # the job ends without its provision being marked (a crash between the writes)
    j = await store.get_doc(jobs.JOB, done.id)
    j.status = "failed"
    await store.update_doc(j)
    provider.resources["other"] = {"key": "x", "job": "job_of_another_installation", "inst": "inst-b", "gone": False}
    provider.resources["unknown"] = {"key": "y", "job": "job_gone", "inst": "inst-a", "gone": False}
    released = await planner.sweep()
    assert sorted(released) == ["res-0", "unknown"]
    assert provider.live() == ["other"]


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_a_submit_pause_that_is_not_seconds_is_refused_naming_the_setting(value: str, tmp_path: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from overnight.console.provisioners.fake import FakeProvisioner

    monkeypatch.setenv("OVERNIGHT_FAKE_SUBMIT_PAUSE_S", value)
    want = f"OVERNIGHT_FAKE_SUBMIT_PAUSE_S must be a number of seconds >= 0, not '{value}'"
    with pytest.raises(ValueError, match=want):
        FakeProvisioner(tmp_path)
    monkeypatch.setenv("OVERNIGHT_FAKE_SUBMIT_PAUSE_S", "2.5")
    assert FakeProvisioner(tmp_path).submit_pause_s == 2.5
    monkeypatch.delenv("OVERNIGHT_FAKE_SUBMIT_PAUSE_S")
    assert FakeProvisioner(tmp_path).submit_pause_s == 0.0


async def test_the_fake_providers_engine_port_is_held_until_the_engine_answers(tmp_path: Path) -> None:
    # The engine (a mock-engine process) binds its port a second after it is picked:
    # meanwhile nothing else may take it (another job's engine would answer for it).
    import errno
    import socket

    from overnight.console.provisioners.fake import FakeProvisioner

    from overnight.runtimes.local import HOLDS_PORTS

    if not HOLDS_PORTS:
        pytest.skip("ports are held only on Linux")
    prov = FakeProvisioner(tmp_path / "fake")
    st = await prov.provision(ProvisionRequest(job_id="job_1", tenant="t", installation_id="inst",
                                               idempotency_key="job_1", template={}))
    port = st.raw["port"]
    try:
        assert st.status == "provisioning" and list(prov._holds) == [st.provision_id]
        probe = socket.socket()
        with pytest.raises(OSError) as exc:
            probe.bind(("127.0.0.1", port))
        probe.close()
        assert exc.value.errno == errno.EADDRINUSE
        deadline = time.monotonic() + 30
        while (st := await prov.status(st.provision_id)).status == "provisioning" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert st.status == "running" and st.endpoint == f"http://127.0.0.1:{port}"  # it bound the held port
        assert not prov._holds
    finally:
        while not await prov.release(st.provision_id):
            pass
        await prov.aclose()
    assert not prov._holds


async def test_the_fake_provider_stops_its_engine_though_the_start_time_read_again_differs(tmp_path: Path) -> None:
    # A restarted service reads the engine's start time anew; it may differ by more
    # than the 10 ms resolution. The engine is still found (marker) and stopped.
    import json

    import psutil

    from overnight.console.provisioners.fake import FakeProvisioner

    prov = FakeProvisioner(tmp_path / "fake")
    st = await prov.provision(ProvisionRequest(job_id="job_3", tenant="t", installation_id="inst",
                                               idempotency_key="job_3", template={}))
    path = tmp_path / "fake" / f"{st.provision_id}.json"
    rec = json.loads(path.read_text())
    pid = rec["pid"]
    rec["create_time"] += 0.5
    path.write_text(json.dumps(rec))
    deadline = time.monotonic() + 30
    while not await prov.release(st.provision_id):
        assert time.monotonic() < deadline
    await prov.aclose()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_the_fake_providers_engine_whose_environment_reads_empty_is_not_taken_for_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Just after its start a process's environment reads empty for a moment (the
    # parent resumes inside execve; about one start in ten on Python 3.13): the
    # resource was "failed, the process is gone" at its first
    # status, and the job resource_failed. Empty means unreadable; the start time
    # decides. An environment without the marker is still another process.
    import psutil

    from overnight.console.provisioners.fake import FakeProvisioner

    prov = FakeProvisioner(tmp_path / "fake")
    st = await prov.provision(ProvisionRequest(job_id="job_4", tenant="t", installation_id="inst",
                                               idempotency_key="job_4", template={}))
    rec = prov._read(st.provision_id)
    assert rec is not None
    try:
        monkeypatch.setattr(psutil.Process, "environ", lambda self: {})
        assert prov._process(rec) is not None
        assert (await prov.status(st.provision_id)).status != "failed"
        monkeypatch.setattr(psutil.Process, "environ", lambda self: {"PATH": "/usr/bin"})
        assert prov._process(rec) is None  # readable, and not ours
    finally:
        monkeypatch.undo()
        deadline = time.monotonic() + 30
        while not await prov.release(st.provision_id):
            assert time.monotonic() < deadline
        await prov.aclose()


async def test_after_a_restart_submitted_jobs_machines_are_trusted_before_any_tick() -> None:
    """serve trusts these before its scheduler starts (composition.py), so a console
    batch claimed right after a restart is not refused as a tenant-named endpoint."""
    from overnight.console.planner import trusted_targets
    from overnight.runtimes.egress import EndpointPolicy

    store = MemoryStore()
    await store.open()
    ssh_rt = {"type": "ssh", "host": "203.0.113.7", "port": 22022, "user": "root"}
    cases = [("in_progress", {"runtime": ssh_rt}), ("validating", {"endpoint": "http://10.1.2.3:8000"}),
             ("resource_preparing", {"endpoint": "http://10.9.9.9:8000"}),  # not submitted yet
             ("completed", {"endpoint": "http://10.8.8.8:8000"})]  # over
    for i, (status, prov) in enumerate(cases):
        await store.insert_doc(DocRecord(kind=jobs.JOB, id=f"job_{i}", tenant="t", created_at=time.time(),
                                         status=status, body={"provision": prov}))
    targets = await trusted_targets(store)
    assert sorted(targets) == ["http://10.1.2.3:8000", "ssh://root@203.0.113.7:22022"]
    policy = EndpointPolicy(None, keyed=True)
    for t in targets:
        policy.trust(t)
    assert policy.is_trusted("ssh://root@203.0.113.7:22022") and policy.is_trusted("http://10.1.2.3:8000")
    assert not policy.is_trusted("http://10.9.9.9:8000")


async def _until(check: Any, timeout: float = 5.0) -> None:
    import inspect

    end = time.monotonic() + timeout
    while not ((await r) if inspect.isawaitable(r := check()) else r):
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


async def _started(planner: Planner) -> list[float]:
    """Start it; returns the times of the ticks (scans of every job) after its first."""
    planner.start()
    await asyncio.sleep(0.05)  # its first tick (of every job) is over; the next is an hour away
    ticks: list[float] = []
    tick = planner.tick

    async def counted() -> None:
        ticks.append(time.time())
        await tick()

    planner.tick = counted  # type: ignore[method-assign]
    return ticks


async def _quiet_planner(provider: Provider, **cfg: Any) -> tuple[MemoryStore, Planner, list[float]]:
    """A started planner on a new store whose next tick and polls are an hour away
    (and the list of any tick that runs all the same)."""
    store = MemoryStore()
    planner = Planner(store=store, storage=None, provisioners={"fake": provider}, limits=None,
                      config=PlannerConfig(installation_id="inst-a", tick_s=3600, poll_s=3600, **cfg))
    return store, planner, await _started(planner)


async def test_a_kicked_job_is_stepped_at_once_not_at_the_next_tick() -> None:
    provider = Provider()
    provider.running = False
    store, planner, ticks = await _quiet_planner(provider)
    try:
        job = await _job(store)
        planner.kick(job.id, queued=True)

        async def provisioning() -> bool:
            return (await store.get_doc(jobs.JOB, job.id)).status == "resource_preparing" and bool(provider.calls)

        await _until(provisioning)
        assert provider.calls == [("provision", job.id)] and ticks == []
    finally:
        await planner.aclose()


async def test_a_kick_during_the_jobs_step_steps_it_again_when_that_step_ends() -> None:
    provider = Provider()
    provider.running = False
    gate = asyncio.Event()
    provision = provider.provision

    async def slow_provision(req: ProvisionRequest) -> ProvisionState:
        await gate.wait()
        return await provision(req)

    provider.provision = slow_provision
    store, planner, ticks = await _quiet_planner(provider)
    try:
        job = await _job(store)
        planner.kick(job.id)
        await _until(lambda: job.id in planner._busy)
        planner.kick(job.id)  # e.g. its batch moved while the step was at the provider: not lost
        assert job.id in planner._again
        gate.set()

        async def looked_again() -> bool:
            return any(c[0] == "status" for c in provider.calls)

        await _until(looked_again)  # without a tick, and before the hour-long poll
        assert provider.calls[0] == ("provision", job.id) and job.id not in planner._again and ticks == []
    finally:
        await planner.aclose()


async def test_a_new_job_waits_for_the_tick_under_max_provisioning() -> None:
    provider = Provider()
    provider.running = False
    store, planner, _ = await _quiet_planner(provider, max_provisioning=1)
    try:
        first, second = await _job(store), await _job(store)
        planner.kick(first.id, queued=True)  # a wake: the tick takes queued jobs in order while there is room
        planner.kick(second.id, queued=True)

        async def first_taken() -> bool:
            return (await store.get_doc(jobs.JOB, first.id)).status == "resource_preparing"

        await _until(first_taken)
        await asyncio.sleep(0.2)
        assert (await store.get_doc(jobs.JOB, second.id)).status == "queued"
        assert [c for c in provider.calls if c[0] == "provision"] == [("provision", first.id)]
    finally:
        await planner.aclose()
