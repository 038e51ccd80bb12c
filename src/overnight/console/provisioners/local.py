"""The ``local`` provider: this host's GPUs, through the local runtime.

A provision starts the job's template engine as a local process
(``templates/commands.py`` ``local_spec`` run by ``runtimes/local.py``
``LocalRuntime``), with GPUs reserved from the host's ``GpuPool`` (the same pool
the service's own template engines use, so the two never hand out one GPU
twice). Its record is a JSON file in the provider's state directory, written
*before* the process starts and again with the runtime's handle (pid and start
time, process group, port, GPUs, log file), so a restarted service finds it.

**Engines outlive the service.** The local runtime's guard normally stops an
engine when the service dies; here it is started detached (``--parent 0``), so a
console job whose service is SIGKILLed and restarted carries on with the same
engine (the planner continues from its stored state), as it would on a cloud
GPU. What keeps a detached engine from leaking is the planner's side of the
contract: ``release`` when the job ends, and the sweep at start-up and
periodically over ``list_owned``. The price: an engine whose service never
comes back keeps its GPUs until someone runs the service again (or stops the
process group, whose members carry ``OVERNIGHT_RUNTIME_OWNER=overnight-console/...``).

Tags: every process of an engine carries the local runtime's markers,
``OVERNIGHT_RUNTIME_OWNER=overnight-console/<installation id>/<provision id>``
and ``OVERNIGHT_RUNTIME_ID``, plus ``OVERNIGHT_CONSOLE_JOB_ID``; ``list_owned``
reads the records and also scans processes for the marker (an engine started
by a service killed before it could record the handle is found and released).

The provision id is derived from the installation and the idempotency key, so a
repeated ``provision`` finds the same record. Statuses: ``provisioning`` until
the engine's health endpoint answers 200 (``running``), ``failed`` when its
process is gone or it was not ready within the template's
``ready_timeout_seconds``, ``released`` once ``release`` has stopped the whole
process group (SIGTERM, SIGKILL after the grace period) and a re-scan finds no
process left. No GPU free now is a retryable ``no_capacity``; more GPUs than
the host has, a missing command or a secret that cannot be read here are not.
The template's accelerator ``type`` is not matched against the host's GPU model
(as with the local runtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psutil

from overnight.console.provisioners.base import ProvisionError, ProvisionRequest, ProvisionState
from overnight.errors import GpusBusy, OvernightError, RuntimeStartError
from overnight.runtimes.base import RuntimeHandle
from overnight.runtimes.gpus import GpuPool
from overnight.runtimes.local import START_TIME_TOLERANCE_S, LocalRuntime

__all__ = ["JOB_ENV", "MARKER", "LocalProvisioner", "provision_id_for"]

log = logging.getLogger("overnight.console")

#: The local runtime's installation prefix for console engines (the service's own
#: template engines use its replica id, so neither sweeps the other's).
MARKER = "overnight-console"
#: The job an engine process was started for (read back for unrecorded engines).
JOB_ENV = "OVERNIGHT_CONSOLE_JOB_ID"


def provision_id_for(installation_id: str, key: str) -> str:
    """The same id for the same installation and idempotency key."""
    return "local_" + hashlib.sha256(f"{installation_id}\x00{key}".encode()).hexdigest()[:24]


def _alive(handle: RuntimeHandle) -> bool:
    """The guard the handle names still runs (not a reused pid)."""
    try:
        p = psutil.Process(int(handle["pid"]))
        return (abs(p.create_time() - float(handle["start_time"])) <= START_TIME_TOLERANCE_S
                and p.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False


class LocalProvisioner:
    name: ClassVar[str] = "local"

    def __init__(self, state_dir: Path, *, gpus: GpuPool | None = None, ready_timeout_s: float = 3600.0,
                 health_timeout_s: float = 2.0) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        #: The planner's cap; each engine's own limit is its template's ready_timeout_seconds.
        self.ready_timeout_s = ready_timeout_s
        self.gpus = gpus if gpus is not None else GpuPool.from_env()
        self.runtime = LocalRuntime(log_dir=self.dir / "logs", installation_id=MARKER, gpus=self.gpus, detach=True)
        self._lock = asyncio.Lock()
        self._http = httpx.AsyncClient(timeout=health_timeout_s)
        self._adopt_running()

    # -- the provider's database ----------------------------------------------------------
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
        for p in sorted(self.dir.glob("local_*.json")):
            rec = self._read(p.stem)
            if rec is not None:
                out.append(rec)
        return out

    def _adopt_running(self) -> None:
        """After a restart: the GPUs of engines still running are held again, before
        anything else on this host can reserve them."""
        for rec in self._all():
            h = rec.get("handle")
            if rec["status"] != "released" and h and h.get("gpus") and _alive(h):
                self.gpus.adopt(h["id"], h["gpus"])

    # -- the API ------------------------------------------------------------------------------
    async def provision(self, request: ProvisionRequest) -> ProvisionState:
        async with self._lock:
            pid = provision_id_for(request.installation_id, request.idempotency_key)
            rec = self._read(pid)
            if rec is not None and rec.get("handle") is not None:
                return await self._state(rec)  # the same request again: the same engine
            if rec is not None:
                # Recorded, but the service stopped before the handle was: whatever
                # carries its marker is stopped, then it starts afresh (one engine per key).
                if not await self._stop_marked(pid):
                    raise ProvisionError("local provider: an earlier start of this engine is still stopping",
                                         retryable=True)
            spec = self._spec(request)
            rec = {"id": pid, "key": request.idempotency_key, "job_id": request.job_id,
                   "installation": request.installation_id, "status": "starting", "handle": None,
                   "name": spec["name"], "created_at": time.time()}
            self._write(rec)  # recorded before the process exists: a crash leaves a trace

            async def record(handle: RuntimeHandle) -> None:
                rec["handle"], rec["status"] = dict(handle), "started"
                self._write(rec)

            try:
                await self.runtime.acquire(spec, owner=f"{request.installation_id}/{pid}", record=record)
            except GpusBusy as exc:
                self._path(pid).unlink(missing_ok=True)  # nothing was started
                raise ProvisionError(f"local provider: no capacity: {exc.message}", retryable=True,
                                     code="no_capacity") from exc
            except RuntimeStartError as exc:
                self._path(pid).unlink(missing_ok=True)
                raise ProvisionError(f"local provider: {exc.message}", retryable=False) from exc
            return await self._state(rec)

    def _spec(self, request: ProvisionRequest) -> dict[str, Any]:
        """The local runtime's spec for the job's template (secrets read now, never stored)."""
        from overnight.templates.commands import local_spec
        from overnight.templates.resolve import Resolved

        try:
            resolved = Resolved.from_record(request.template)
            spec = local_spec(resolved)
            spec["env"][JOB_ENV] = request.job_id
            self.runtime.check(spec)  # more GPUs than this host has: never
        except OvernightError as exc:  # a bad template record, an unreadable secret, too many GPUs
            raise ProvisionError(f"local provider: {exc.message}", retryable=False) from exc
        except ValueError as exc:  # the runtime's spec model refused it (names the field)
            raise ProvisionError(f"local provider: the engine spec is invalid: {exc}", retryable=False) from exc
        return spec

    async def _state(self, rec: dict[str, Any]) -> ProvisionState:
        h = rec.get("handle")
        status, endpoint, error = "provisioning", None, None
        if rec["status"] == "released":
            status = "released"
        elif h is None:
            status, error = "failed", "the service stopped while starting the engine (no handle was recorded)"
        elif h.get("host") != self.runtime.hostname:
            status, error = "failed", f"the engine runs on host {h.get('host')!r}, not on this one"
        elif not await self.runtime.alive(h):
            info = self.runtime.exit_info(h)
            how = f"exited with code {info['exit_code']}" if info["exit_code"] is not None else "is gone"
            status, error = "failed", f"the engine {how}; last lines of {h['log_path']}:\n{info['log_tail']}"
        else:
            try:
                ok = (await self._http.get(h["url"] + h.get("health_endpoint", "/health"))).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                status, endpoint = "running", h["url"]
            else:
                limit = float(h.get("ready_timeout_seconds") or self.ready_timeout_s)
                if time.time() - float(h["start_time"]) > limit and not rec.get("ready_once"):
                    status = "failed"
                    error = (f"the engine was not ready within {limit:g} s (ready_timeout_seconds); last lines of "
                             f"{h['log_path']}:\n{self.runtime.log_tail(h, 20)}")
            if ok and not rec.get("ready_once"):
                rec["ready_once"] = True
                self._write(rec)
        return ProvisionState(
            provision_id=rec["id"], provider=self.name, status=status, endpoint=endpoint,
            resource_ids=[f"pid:{h['pid']}"] if h else [], job_id=rec["job_id"], installation_id=rec["installation"],
            error=error,
            raw={k: h.get(k) for k in ("pid", "port", "gpus", "log_path", "host")} if h else {},
        )

    async def status(self, provision_id: str) -> ProvisionState:
        rec = self._read(provision_id)
        if rec is None:
            raise ProvisionError(f"local provider: no such resource {provision_id}", code="not_found")
        return await self._state(rec)

    async def _stop_marked(self, provision_id: str) -> bool:
        """Stop every engine carrying this provision's marker; True once none is left."""
        try:
            for h in await self.runtime.running():
                if h["owner"].rsplit("/", 1)[-1] == provision_id:
                    await self.runtime.release(h)
        except OvernightError as exc:
            log.warning("local provider: stopping %s: %s", provision_id, exc.message)
            return False
        return not [h for h in await self.runtime.running() if h["owner"].rsplit("/", 1)[-1] == provision_id]

    async def release(self, provision_id: str) -> bool:
        rec = self._read(provision_id)
        if rec is not None and rec["status"] == "released":
            return True
        h = rec.get("handle") if rec is not None else None
        if h is not None:
            if h.get("host") != self.runtime.hostname:
                raise ProvisionError(f"local provider: the engine runs on host {h.get('host')!r}; only that "
                                     "host can stop it", retryable=True)
            try:
                await self.runtime.release(h)  # group SIGTERM, SIGKILL after the grace; waits until gone
            except OvernightError as exc:
                log.warning("local provider: releasing %s: %s", provision_id, exc.message)
                return False
        if not await self._stop_marked(provision_id):  # anything of it not in the handle's group
            return False
        if rec is not None:
            rec["status"], rec["released_at"] = "released", time.time()
            self._write(rec)
        return True

    async def list_owned(self, installation_id: str) -> list[ProvisionState]:
        async with self._lock:  # not while a provision is between its two writes
            recs = [r for r in self._all() if r["installation"] == installation_id]
            out = [await self._state(r) for r in recs if r["status"] != "released"]
            listed = {s.provision_id for s in out}
            for h in await self.runtime.running():
                inst, _, pid = h["owner"].rpartition("/")
                if inst != installation_id or pid in listed:
                    continue
                listed.add(pid)
                job_id = None
                with contextlib.suppress(psutil.Error, OSError):
                    job_id = psutil.Process(h["pid"]).environ().get(JOB_ENV)
                out.append(ProvisionState(
                    provision_id=pid, provider=self.name, status="failed", job_id=job_id,
                    installation_id=installation_id, resource_ids=[f"pid:{h['pid']}"],
                    error="an engine of this installation that its record does not hold", raw={"pid": h["pid"]}))
            return out

    async def catalog(self) -> list[dict[str, Any]]:
        """The host's GPUs by model: how many overnight may use, how many are free now."""
        gpus = await asyncio.to_thread(lambda: self.gpus.gpus)
        usable, free = set(self.gpus.usable), set(self.gpus.free_indices)
        host = self.runtime.hostname
        if not gpus:
            return [{"provider": self.name, "gpu_type": "cpu", "region": host, "count": 0, "free": 0,
                     "price_per_hour": None,
                     "note": "nvidia-smi reports no GPUs here: only templates with accelerator type cpu (or count 0) "
                             "can run"}]
        out = []
        for name in dict.fromkeys(g.name for g in gpus):
            mine = [g for g in gpus if g.name == name]
            out.append({"provider": self.name, "gpu_type": name, "region": host,
                        "count": sum(1 for g in mine if g.index in usable),
                        "free": sum(1 for g in mine if g.index in free),
                        "memory_mib": mine[0].memory_mib, "price_per_hour": None})
        return out

    async def aclose(self) -> None:
        # Engines are not stopped: they outlive the service (see the module docstring).
        await self.runtime.aclose()
        await self._http.aclose()
