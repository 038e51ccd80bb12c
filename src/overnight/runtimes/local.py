"""The ``local`` runtime: the engine as a child process of this host.

``acquire`` reserves GPUs (``runtimes/gpus.py``), picks a free port and starts

    python -I runtimes/_guard.py --parent <service pid> --grace <s> -- <command>

as the leader of a new session and process group, with stdout and stderr appended
to ``<log_dir>/<owner>.log``, ``CUDA_VISIBLE_DEVICES`` set to the reserved GPUs and
two markers in its environment, which every process the engine spawns inherits:
``OVERNIGHT_RUNTIME_OWNER=<installation id>/<owner>`` and
``OVERNIGHT_RUNTIME_ID=<handle id>``. The guard (see its docstring) stops the
whole group when the service dies, even by SIGKILL, and when the engine exits.
With ``detach=True`` (the console's ``local`` provider) the guard does not watch
the service: the engine outlives it, and whoever holds the handle releases it.

The handle names the guard's pid and start time (so a reused pid is never
signalled), the process group, the port and URL, the log file, the GPUs and the
host. ``release`` stops the group (SIGTERM, SIGKILL after the grace period) and
returns once no process carrying the handle's id, nor any of its process group,
is left; ``sweep`` finds such processes of owners that are not live.

``wait_ready`` does not stop an engine that failed to come up: the caller
releases the handle on every path, as with any runtime.

Linux only (``prctl``, ``/proc``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import psutil
from pydantic import Field, field_validator

from overnight.errors import OvernightError, RuntimeStartError
from overnight.executor.http1 import ConnectionFailed, HttpPool, RequestTimedOut, ResponseTooLarge
from overnight.runtimes.base import Endpoint, RecordHandle, RuntimeHandle, RuntimeSpec, _ignore
from overnight.runtimes.gpus import GpuPool

__all__ = ["HOLDS_PORTS", "ID_ENV", "OWNER_ENV", "LocalRuntime", "LocalSpec", "reserve_port"]

log = logging.getLogger("overnight.runtimes.local")

OWNER_ENV = "OVERNIGHT_RUNTIME_OWNER"
ID_ENV = "OVERNIGHT_RUNTIME_ID"
HOST = "127.0.0.1"
GUARD = str(Path(__file__).with_name("_guard.py"))
#: A process whose start time is this close to the handle's is the one it names:
#: psutil derives start times from the boot time, which clock steps can move a bit.
START_TIME_TOLERANCE_S = 1.0
#: How long ``release`` waits for processes to vanish after SIGKILL (a process
#: tearing down GPU memory can take seconds) before it gives up and says so.
KILL_WAIT_S = 60.0
#: Lines of the engine log quoted in start errors.
ERROR_TAIL_LINES = 20


class LocalSpec(RuntimeSpec):
    """How to start one engine on this host."""

    type: Literal["local"] = "local"
    #: The served model name (for logs and messages).
    name: str = Field(min_length=1)
    #: argv; ``{port}`` and ``{host}`` inside items become the chosen port and 127.0.0.1.
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    health_endpoint: str = "/health"
    ready_timeout_seconds: float = Field(600.0, gt=0)
    #: GPUs of its own (``CUDA_VISIBLE_DEVICES``); 0 = none.
    gpus: int = Field(0, ge=0)
    #: Where the engine log goes; default: the runtime's ``log_dir``.
    log_dir: str | None = None
    stop_grace_seconds: float = Field(15.0, ge=0)

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        for i, item in enumerate(v):
            if "\x00" in item:
                raise ValueError(f"item {i} contains a NUL byte")
        if not v[0].strip():
            raise ValueError("the program (item 0) is empty")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key or "=" in key or "\x00" in key or "\x00" in value:
                raise ValueError(f"{key!r} is not a valid environment variable")
            if key in (OWNER_ENV, ID_ENV):
                raise ValueError(f"{key} is set by overnight")
        return v

    @field_validator("health_endpoint")
    @classmethod
    def _health(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must be a path starting with '/', got {v!r}")
        return v


#: Where a bound socket that never listens can hold a port the engine then binds as
#: well. BSD and macOS let two sockets share an address and port only when both set
#: SO_REUSEPORT, which most servers do not: there the port is picked and let go.
HOLDS_PORTS = sys.platform.startswith("linux")


def reserve_port() -> tuple[int, socket.socket | None]:
    """A free port, and (Linux) the socket that holds it until the engine listens.

    The socket is bound with SO_REUSEADDR and SO_REUSEPORT and never listens. The
    engine can bind the same port if it sets either (vLLM sets both, SGLang's uvicorn
    and nearly every server SO_REUSEADDR), and meanwhile the kernel gives the port
    to no other bind(0) or outgoing connection.
    A port picked and closed at once could be taken during the seconds an engine
    imports before it binds, by another replica's engine too, whose health answer
    would then pass for this one's. The caller closes the socket once the engine
    answers (or is gone).
    """
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if HOLDS_PORTS:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, 0))
        port = int(sock.getsockname()[1])
    except BaseException:
        sock.close()
        raise
    if not HOLDS_PORTS:
        sock.close()
        return port, None
    return port, sock


def _log_name(owner: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", owner)[:100] or "engine"
    if safe != owner:
        # Two owners must never share a log: the tail is shown to the owner's tenant.
        safe += "-" + hashlib.sha256(owner.encode()).hexdigest()[:12]
    return safe + ".log"


def read_tail(path: str | Path, lines: int) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    if lines <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos, data = end, b""
            # Read backwards in blocks until enough lines (at most 1 MiB).
            while pos > 0 and data.count(b"\n") <= lines and end - pos < (1 << 20):
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])


def _same_start(a: float, b: float) -> bool:
    return abs(a - b) <= START_TIME_TOLERANCE_S


def _environ(proc: psutil.Process) -> dict[str, str] | None:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return None


class LocalRuntime:
    type: ClassVar[str] = "local"
    spec_model: ClassVar[type[RuntimeSpec]] = LocalSpec

    def __init__(
        self,
        *,
        log_dir: Path,
        installation_id: str,
        gpus: GpuPool | None = None,
        sweep_grace_seconds: float = 10.0,
        detach: bool = False,
    ) -> None:
        if not installation_id or "/" in installation_id:
            raise ValueError(f"installation_id must be non-empty without '/', got {installation_id!r}")
        self.log_dir = Path(log_dir)
        self.installation_id = installation_id
        self.gpus = gpus if gpus is not None else GpuPool.from_env()
        self.sweep_grace_seconds = sweep_grace_seconds
        #: Engines outlive this process (the guard gets ``--parent 0``).
        self.detach = detach
        self.hostname = socket.gethostname()
        #: Guards this process started, by pid: reaped here, and their exit codes known.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        #: Exit codes of guards reaped here, by handle id.
        self._exit_codes: dict[str, int] = {}
        self._ports: set[int] = set()
        #: Ports held for engines that do not listen yet, by handle id (``reserve_port``).
        self._holds: dict[str, socket.socket] = {}

    # -- checks -------------------------------------------------------------
    def parse_spec(self, spec: RuntimeSpec | dict[str, Any]) -> LocalSpec:
        if isinstance(spec, LocalSpec):
            return spec
        if isinstance(spec, RuntimeSpec):
            spec = spec.model_dump()
        return LocalSpec.model_validate(spec)

    def check(self, spec: RuntimeSpec | dict[str, Any]) -> LocalSpec:
        """Validate ``spec`` and raise ``RuntimeStartError`` if this host can never
        run it (more GPUs than it has): for a 400 when the batch is created."""
        parsed = self.parse_spec(spec)
        self.gpus.check_fits(parsed.gpus)
        return parsed

    def _marker(self, owner: str) -> str:
        return f"{self.installation_id}/{owner}"

    def _check_host(self, handle: RuntimeHandle) -> bool:
        return handle.get("host") == self.hostname

    # -- acquire ------------------------------------------------------------
    async def acquire(
        self, spec: RuntimeSpec | dict[str, Any], *, owner: str, record: RecordHandle = _ignore
    ) -> RuntimeHandle:
        spec = self.parse_spec(spec)
        hid = uuid.uuid4().hex
        gpus = self.gpus.reserve(hid, spec.gpus)  # RuntimeStartError / GpusBusy
        try:
            proc, handle = self._start(spec, owner=owner, hid=hid, gpus=gpus)
        except BaseException:
            self.gpus.release(hid)
            raise
        try:
            await record(handle)
        except BaseException:
            # Unrecorded, nobody could ever release it: stop it now.
            await asyncio.shield(self.release(handle))
            raise
        log.info(
            "started engine %r for %s: pid %d, port %d, GPUs %s, log %s",
            spec.name, owner, proc.pid, handle["port"], gpus or "none", handle["log_path"],
        )
        return handle

    def _start(
        self, spec: LocalSpec, *, owner: str, hid: str, gpus: list[int]
    ) -> tuple[subprocess.Popen[bytes], RuntimeHandle]:
        port, hold = reserve_port()
        # Never a port this process gave another engine (one adopted holds none).
        while port in self._ports:
            if hold is not None:
                hold.close()
            port, hold = reserve_port()
        try:
            return self._start_on(spec, owner=owner, hid=hid, gpus=gpus, port=port, hold=hold)
        except BaseException:
            if hold is not None:
                hold.close()
            raise

    def _start_on(
        self, spec: LocalSpec, *, owner: str, hid: str, gpus: list[int], port: int, hold: socket.socket | None
    ) -> tuple[subprocess.Popen[bytes], RuntimeHandle]:
        argv = [a.replace("{port}", str(port)).replace("{host}", HOST) for a in spec.command]
        env = {**os.environ, **spec.env}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
            # CUDA's default order is fastest first; nvidia-smi's indices follow the bus.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env[OWNER_ENV] = self._marker(owner)
        env[ID_ENV] = hid
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            raise RuntimeStartError(f"engine {spec.name!r}: command {argv[0]!r} not found (PATH={env.get('PATH', '')})")
        log_dir = Path(spec.log_dir) if spec.log_dir else self.log_dir
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = (log_dir / _log_name(owner)).resolve()
            with open(log_path, "ab") as out:
                stamp = datetime.now(UTC).isoformat(timespec="seconds")
                out.write(
                    f"\n=== {stamp} overnight: starting engine {spec.name!r} for {owner} on port {port}, "
                    f"GPUs {','.join(map(str, gpus)) or 'none'} ===\n".encode()
                )
                out.flush()
                # Started from the event loop's thread: PR_SET_PDEATHSIG fires when the
                # thread that forked the guard ends, so never from a short-lived worker.
                proc = subprocess.Popen(
                    [sys.executable, "-I", GUARD, "--parent", "0" if self.detach else str(os.getpid()),
                     "--grace", repr(spec.stop_grace_seconds), "--", *argv],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, close_fds=True,
                )
        except OSError as exc:
            raise RuntimeStartError(f"engine {spec.name!r}: cannot start it: {exc}") from exc
        self._children[proc.pid] = proc
        self._ports.add(port)
        if hold is not None:
            self._holds[hid] = hold
        try:
            start_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            start_time = time.time()
        handle: RuntimeHandle = {
            "type": self.type,
            "owner": owner,
            "id": hid,
            "name": spec.name,
            "pid": proc.pid,
            "pgid": proc.pid,
            "start_time": start_time,
            "port": port,
            "url": f"http://{HOST}:{port}",
            "health_endpoint": spec.health_endpoint,
            "ready_timeout_seconds": spec.ready_timeout_seconds,
            "log_path": str(log_path),
            "gpus": gpus,
            "host": self.hostname,
            "stop_grace_seconds": spec.stop_grace_seconds,
            "detached": self.detach,
        }
        return proc, handle

    # -- state --------------------------------------------------------------
    def _leader_state(self, handle: RuntimeHandle) -> tuple[bool, int | None]:
        """(running, exit code if known) of the guard the handle names."""
        pid = int(handle["pid"])
        child = self._children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return True, None
            self._children.pop(pid, None)
            self._exit_codes[handle["id"]] = code
            return False, code
        try:
            proc = psutil.Process(pid)
            if not _same_start(proc.create_time(), float(handle["start_time"])):
                return False, self._exit_codes.get(handle.get("id", ""))
            return proc.status() != psutil.STATUS_ZOMBIE, None
        except psutil.Error:
            return False, self._exit_codes.get(handle.get("id", ""))

    async def alive(self, handle: RuntimeHandle) -> bool:
        # An engine on another host listens on that host's 127.0.0.1: not for us.
        if not self._check_host(handle):
            return False
        running = self._leader_state(handle)[0]
        if running:
            self._adopt(handle)
        return running

    def _unhold(self, handle: RuntimeHandle) -> None:
        hold = self._holds.pop(handle.get("id", ""), None)
        if hold is not None:
            hold.close()

    def _adopt(self, handle: RuntimeHandle) -> None:
        hid = handle["id"]
        if handle.get("gpus") and hid not in self.gpus.held():
            self.gpus.adopt(hid, handle["gpus"])
        self._ports.add(int(handle["port"]))

    def exit_info(self, handle: RuntimeHandle) -> dict[str, Any]:
        """``{"exit_code": int | None, "log_tail": str}``: for crash messages. The
        exit code is known only for engines this process started."""
        _, code = self._leader_state(handle)
        return {"exit_code": code, "log_tail": self.log_tail(handle, ERROR_TAIL_LINES)}

    def log_tail(self, handle: RuntimeHandle, lines: int = 100) -> str:
        return read_tail(handle["log_path"], lines)

    # -- ready --------------------------------------------------------------
    async def wait_ready(self, handle: RuntimeHandle, *, timeout_s: float) -> Endpoint:
        name = handle.get("name", handle["owner"])
        if not self._check_host(handle):
            raise RuntimeStartError(f"engine {name!r} runs on host {handle.get('host')!r}, not on {self.hostname!r}")
        url, path = handle["url"], handle.get("health_endpoint", "/health")
        start = time.monotonic()
        deadline = start + timeout_s
        pool = HttpPool(url, timeout_s=5.0, connect_timeout_s=2.0, max_connections=1, max_body_bytes=1 << 20)
        delay = 0.02
        try:
            while True:
                running, code = self._leader_state(handle)
                if not running:
                    raise RuntimeStartError(self._start_failure(handle, code))
                remaining = deadline - time.monotonic()
                try:
                    reply = await pool.request("GET", path, content_type=b"text/plain", timeout_s=max(0.1, min(5.0, remaining)))
                    if reply.status == 200:
                        self._unhold(handle)  # it listens: the port is its own
                        break
                except (ConnectionFailed, RequestTimedOut, ResponseTooLarge, OSError):
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeStartError(
                        f"engine {name!r} was not ready within {timeout_s:g} s (no 200 from {url}{path}); "
                        f"last lines of {handle['log_path']}:\n{self.log_tail(handle, ERROR_TAIL_LINES)}"
                    )
                await asyncio.sleep(min(delay, remaining))
                # Capped low: the poll interval adds to every batch's time to first request.
                delay = min(delay * 1.5, 0.25)
        finally:
            await pool.aclose()
        self._adopt(handle)
        log.info("engine %r for %s ready in %.1f s at %s", name, handle["owner"], time.monotonic() - start, url)
        return Endpoint(url)

    def _start_failure(self, handle: RuntimeHandle, code: int | None) -> str:
        name = handle.get("name", handle["owner"])
        how = f"exited with code {code}" if code is not None else "is gone"
        if code is not None and code > 128:
            try:
                how += f" ({signal.Signals(code - 128).name})"
            except ValueError:
                pass
        return (
            f"engine {name!r} {how} before it was ready; last lines of {handle['log_path']}:\n"
            f"{self.log_tail(handle, ERROR_TAIL_LINES)}"
        )

    # -- release ------------------------------------------------------------
    def _members(self, handle: RuntimeHandle, group_is_ours: bool) -> list[psutil.Process]:
        """Live processes of the handle: those carrying its id in their environment
        and, while the group is known to be its own, every member of its group."""
        hid, pgid = handle.get("id"), int(handle["pgid"])
        since = float(handle["start_time"]) - START_TIME_TOLERANCE_S
        out = []
        for proc in psutil.process_iter(["create_time", "status"]):
            info = proc.info
            if info["create_time"] is None or info["create_time"] < since or info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                in_group = os.getpgid(proc.pid) == pgid
            except OSError:
                continue
            if in_group and group_is_ours:
                out.append(proc)
                continue
            env = _environ(proc)
            if env is not None and hid and env.get(ID_ENV) == hid:
                out.append(proc)
        return out

    def _signal(self, handle: RuntimeHandle, members: Iterable[psutil.Process], sig: int) -> None:
        pgid = int(handle["pgid"])
        group_signalled = False
        for proc in members:
            try:
                in_group = os.getpgid(proc.pid) == pgid
            except OSError:
                continue
            try:
                if in_group:
                    # killpg reaches at once what the group forks meanwhile.
                    if not group_signalled:
                        os.killpg(pgid, sig)
                        group_signalled = True
                else:
                    proc.send_signal(sig)  # psutil checks the pid was not reused
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass

    def _reap(self, handle: RuntimeHandle) -> None:
        self._leader_state(handle)

    async def release(self, handle: RuntimeHandle) -> None:
        name = handle.get("name", handle.get("owner"))
        if not self._check_host(handle):
            raise OvernightError(
                f"engine {name!r} runs on host {handle.get('host')!r}; only that host can stop it",
                code="runtime_wrong_host",
            )
        grace = float(handle.get("stop_grace_seconds", 15.0))
        # The group is the handle's if its leader is still the process it started
        # (a process group id is not reused while the group has a member).
        group_is_ours = self._leader_state(handle)[0]
        members = await asyncio.to_thread(self._members, handle, group_is_ours)
        if members:
            self._signal(handle, members, signal.SIGTERM)
            members = await self._wait_gone(handle, group_is_ours, grace)
        if members:
            log.warning("engine %r for %s: SIGKILL after %g s", name, handle.get("owner"), grace)
            deadline = time.monotonic() + KILL_WAIT_S
            while members:
                self._signal(handle, members, signal.SIGKILL)
                members = await self._wait_gone(handle, group_is_ours, 0.5)
                if members and time.monotonic() > deadline:
                    raise OvernightError(
                        f"engine {name!r}: processes {[p.pid for p in members]} still exist "
                        f"{KILL_WAIT_S:g} s after SIGKILL",
                        code="runtime_stop_failed",
                    )
        self._reap(handle)
        self._unhold(handle)
        self.gpus.release(handle.get("id", ""))
        self._ports.discard(int(handle.get("port", 0)))

    async def _wait_gone(self, handle: RuntimeHandle, group_is_ours: bool, within_s: float) -> list[psutil.Process]:
        deadline = time.monotonic() + within_s
        delay = 0.02
        while True:
            self._reap(handle)
            members = await asyncio.to_thread(self._members, handle, group_is_ours)
            if not members or time.monotonic() >= deadline:
                return members
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    # -- sweep --------------------------------------------------------------
    def _orphans(self, live_owners: set[str]) -> list[RuntimeHandle]:
        prefix = self.installation_id + "/"
        found: dict[str, list[tuple[psutil.Process, str, float]]] = {}
        for proc in psutil.process_iter(["create_time", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            env = _environ(proc)
            if not env:
                continue
            marker = env.get(OWNER_ENV, "")
            if not marker.startswith(prefix) or marker[len(prefix):] in live_owners:
                continue
            found.setdefault(env.get(ID_ENV, marker), []).append((proc, marker[len(prefix):], proc.info["create_time"]))
        handles = []
        for hid, procs in found.items():
            first = min(procs, key=lambda p: p[2])
            try:
                pgid = os.getpgid(first[0].pid)
            except OSError:
                continue
            env = _environ(first[0]) or {}
            gpus = [int(x) for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip().isdigit()]
            handles.append({
                "type": self.type, "owner": first[1], "id": hid, "name": first[1],
                "pid": first[0].pid, "pgid": pgid, "start_time": first[2], "port": 0, "url": "",
                "log_path": "", "gpus": gpus, "host": self.hostname,
                "stop_grace_seconds": self.sweep_grace_seconds,
            })
        return handles

    async def running(self) -> list[RuntimeHandle]:
        """One handle per engine on this host carrying this installation's marker
        (found by process environment, recorded or not): enough to ``release`` it."""
        return await asyncio.to_thread(self._orphans, set())

    async def sweep(self, live_owners: set[str]) -> list[RuntimeHandle]:
        handles = await asyncio.to_thread(self._orphans, set(live_owners))
        for handle in handles:
            log.warning("releasing an orphaned engine of %s (pid %d)", handle["owner"], handle["pid"])
        await asyncio.gather(*(self.release(h) for h in handles))
        return handles

    async def aclose(self) -> None:
        # Reap guards that ended; engines themselves are the caller's to release.
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                self._children.pop(pid, None)
