"""The ``fake`` provider: for tests and demos, a provider that behaves like a cloud.

A resource is a real ``overnight mock-engine`` process on this host, started in its
own session so that it **outlives the planner** (a cloud's GPU does not vanish
when overnight crashes). Its record is a JSON file in the provider's state
directory (the provider's own database), tagged with the job id and the
installation id. It is ``provisioning`` until ``delay_s`` after the request and
its engine answers ``/health``, then ``running``.

Failures to inject, counted per process from the environment (so a test can make
a planner process meet them):

* ``OVERNIGHT_FAKE_FAIL_PROVISION=N``: the first N provision calls fail with a
  retryable "no capacity" error (``=always``: every call, as a region that never
  has the GPU);
* ``OVERNIGHT_FAKE_FAIL_RELEASE=N``: the first N release calls fail (the API is
  down), so the planner must retry them;
* ``OVERNIGHT_FAKE_REFUSE=1``: provision fails with a non-retryable error;
* ``OVERNIGHT_FAKE_SUBMIT_PAUSE_S=S``: the planner waits S seconds after creating
  the batch of a job on this provider and before recording it on the job (the job
  stays ``submitting`` with its batch already made: the window a cancel or a crash
  must get right; ``submit_pause_s``, which the planner reads);
* ``OVERNIGHT_FAKE_SPAWN_PAUSE_S=S``: provision waits S seconds after starting a
  resource's process and before recording its pid (the window in which a crash
  leaves a running process on a record without one: the process is then found by
  its marker, ``OVERNIGHT_FAKE_RESOURCE``, and released like any other).

How it differs from a real provider: no quota, region or price (a flat
``price_per_hour`` can be set for cost tests), the "GPU" is a mock engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psutil

from overnight.console.provisioners.base import ProvisionError, ProvisionRequest, ProvisionState
from overnight.ids import new_id
from overnight.runtimes.local import START_TIME_TOLERANCE_S, reserve_port

__all__ = ["FakeProvisioner"]


def _seconds(env: str) -> float:
    v = os.environ.get(env, "").strip()
    try:
        out = float(v or 0)
    except ValueError:
        out = -1.0
    if not out >= 0 or out == float("inf"):
        raise ValueError(f"{env} must be a number of seconds >= 0, not {v!r}")
    return out


def _count(env: str) -> int:
    v = os.environ.get(env, "").strip()
    if v == "always":
        return 1 << 30
    return int(v) if v.isdigit() else 0


def _marker(p: psutil.Process) -> str | None:
    """The resource id a process carries (``OVERNIGHT_FAKE_RESOURCE``; "" when it
    carries none), or None when its environment cannot be read. Empty counts as
    unreadable: a process just started reads empty for a moment (its parent resumes
    inside execve, before the kernel has laid out the new program's arguments and
    environment; about one start in ten on Python 3.13, none seen on 3.11)."""
    try:
        env = p.environ()
    except (psutil.AccessDenied, OSError):
        return None
    return env.get("OVERNIGHT_FAKE_RESOURCE", "") if env else None


class FakeProvisioner:
    name: ClassVar[str] = "fake"

    def __init__(self, state_dir: Path, *, delay_s: float = 0.0, ready_timeout_s: float = 60.0,
                 engine_args: tuple[str, ...] = ("--latency-ms", "5"), price_per_hour: float | None = None,
                 engine_url: str | None = None) -> None:
        #: Set: every resource is a record pointing at this engine, ready at once, no
        #: process (a provider that answers instantly: what the console's benchmark measures against).
        self.engine_url = engine_url
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.delay_s = delay_s
        self.ready_timeout_s = ready_timeout_s
        self.engine_args = engine_args
        self.price_per_hour = price_per_hour
        self._fail_provision = _count("OVERNIGHT_FAKE_FAIL_PROVISION")
        self._fail_release = _count("OVERNIGHT_FAKE_FAIL_RELEASE")
        self._refuse = os.environ.get("OVERNIGHT_FAKE_REFUSE") == "1"
        #: Seconds the planner waits between creating a job's batch and recording it (tests).
        self.submit_pause_s = _seconds("OVERNIGHT_FAKE_SUBMIT_PAUSE_S")
        self._spawn_pause_s = _seconds("OVERNIGHT_FAKE_SPAWN_PAUSE_S")
        self._lock = asyncio.Lock()
        self._http = httpx.AsyncClient(timeout=2.0)
        #: Ports held for engines that do not answer yet, by resource id (``reserve_port``).
        self._holds: dict[str, socket.socket] = {}

    # -- the provider's database ------------------------------------------------------------
    def _path(self, provision_id: str) -> Path:
        return self.dir / f"{provision_id}.json"

    def _read(self, provision_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(provision_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self, rec: dict[str, Any]) -> None:
        tmp = self._path(rec["id"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(self._path(rec["id"]))

    def _all(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            rec = self._read(p.stem)
            if rec is not None:
                out.append(rec)
        return out

    # -- the API ------------------------------------------------------------------------------
    async def provision(self, request: ProvisionRequest) -> ProvisionState:
        async with self._lock:
            for rec in self._all():
                if rec["key"] == request.idempotency_key and rec["installation"] == request.installation_id:
                    return await self._state(rec)  # the same request again: the same resource
            if self._refuse:
                raise ProvisionError(f"fake provider: GPU type {request.gpu_type!r} is not offered",
                                     retryable=False, code="no_gpu_type")
            if self._fail_provision > 0:
                self._fail_provision -= 1
                raise ProvisionError("fake provider: no capacity for this GPU type right now", retryable=True,
                                     code="no_capacity")
            port, hold = reserve_port()  # kept until the engine answers: nothing else takes the port meanwhile
            rec = {"id": new_id("fake"), "key": request.idempotency_key, "job_id": request.job_id,
                   "installation": request.installation_id, "port": port, "pid": None, "create_time": None,
                   "status": "provisioning", "ready_at": time.time() + self.delay_s, "created_at": time.time()}
            if self.engine_url:
                if hold is not None:
                    hold.close()
                rec["url"] = self.engine_url
                self._write(rec)
                return await self._state(rec)
            try:
                self._write(rec)  # recorded before the process exists: a crash leaves a trace
                proc = subprocess.Popen(
                    [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", str(port), *self.engine_args],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                    env={**os.environ, "OVERNIGHT_FAKE_RESOURCE": rec["id"]},
                )
            except BaseException:
                if hold is not None:
                    hold.close()
                raise
            if hold is not None:
                self._holds[rec["id"]] = hold
            if self._spawn_pause_s:
                await asyncio.sleep(self._spawn_pause_s)
            rec["pid"], rec["create_time"] = proc.pid, psutil.Process(proc.pid).create_time()
            self._write(rec)
            return await self._state(rec)

    def _process(self, rec: dict[str, Any]) -> psutil.Process | None:
        """The resource's live process, or None. A record without a pid (its
        provision call died between starting the process and recording it) is
        looked for by the process's marker; one found is recorded on it."""
        if not rec.get("pid"):
            return None if rec.get("url") else self._adopt(rec)
        try:
            p = psutil.Process(rec["pid"])
            # A start time read by another process can differ by more than its 10 ms
            # resolution (the boot time it is counted from follows clock adjustments):
            # a tight match took a live engine, after a restart, for gone, and left it
            # running. The resource's own marker settles who it is.
            if abs(p.create_time() - rec["create_time"]) > START_TIME_TOLERANCE_S or p.status() == psutil.STATUS_ZOMBIE:
                return None
            marker = _marker(p)
            return p if marker is None or marker == rec["id"] else None  # None: the start time has to do
        except psutil.Error:
            return None

    def _adopt(self, rec: dict[str, Any]) -> psutil.Process | None:
        for p in psutil.process_iter():
            try:
                if _marker(p) != rec["id"] or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                rec["pid"], rec["create_time"] = p.pid, p.create_time()
            except psutil.Error:  # gone meanwhile, or another user's (unreadable): not ours
                continue
            self._write(rec)
            return p
        return None

    async def _state(self, rec: dict[str, Any]) -> ProvisionState:
        status = rec["status"]
        endpoint = None
        if status not in ("released", "failed") and rec.get("url"):
            if time.time() >= rec["ready_at"]:
                status, endpoint = "running", rec["url"]
        elif status not in ("released", "failed"):
            if self._process(rec) is None and rec.get("pid"):
                status = "failed"
            elif time.time() >= rec["ready_at"]:
                try:
                    ok = (await self._http.get(f"http://127.0.0.1:{rec['port']}/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    status, endpoint = "running", f"http://127.0.0.1:{rec['port']}"
            if status != "provisioning":
                self._unhold(rec["id"])  # it listens, or never will
        return ProvisionState(provision_id=rec["id"], provider=self.name, status=status, endpoint=endpoint,
                              resource_ids=[f"pid:{rec['pid']}"] if rec.get("pid") else [],
                              job_id=rec["job_id"], installation_id=rec["installation"],
                              price_per_hour=self.price_per_hour,
                              error="the resource's process is gone" if status == "failed" else None,
                              raw={"port": rec["port"], "pid": rec["pid"]})

    def _unhold(self, provision_id: str) -> None:
        hold = self._holds.pop(provision_id, None)
        if hold is not None:
            hold.close()

    async def status(self, provision_id: str) -> ProvisionState:
        rec = self._read(provision_id)
        if rec is None:
            raise ProvisionError(f"fake provider: no such resource {provision_id}", code="not_found")
        return await self._state(rec)

    async def release(self, provision_id: str) -> bool:
        if self._fail_release > 0:
            self._fail_release -= 1
            raise ProvisionError("fake provider: the API is unavailable (503)", retryable=True)
        rec = self._read(provision_id)
        if rec is None or rec["status"] == "released":
            return True
        p = self._process(rec)
        if p is not None:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(p.wait, 10)
            except psutil.TimeoutExpired:
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                return False  # asked; the next call confirms
            except psutil.Error:
                pass
        if self._process(rec) is not None:
            return False
        self._unhold(provision_id)
        rec["status"] = "released"
        rec["released_at"] = time.time()
        self._write(rec)
        return True

    async def list_owned(self, installation_id: str) -> list[ProvisionState]:
        return [await self._state(r) for r in self._all()
                if r["installation"] == installation_id and r["status"] != "released"]

    async def catalog(self) -> list[dict[str, Any]]:
        return [{"provider": self.name, "gpu_type": "fake-gpu", "region": "local", "price_per_hour":
                 self.price_per_hour}]

    async def aclose(self) -> None:
        for rid in list(self._holds):
            self._unhold(rid)
        await self._http.aclose()
