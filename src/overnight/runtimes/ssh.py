"""The ``ssh`` runtime: an engine started over SSH on a rented machine (a RunPod pod,
a Lambda Cloud instance) and reached through an SSH local port-forward.

What runs where (``docs/ssh-runtime.md`` has the exact commands):

- The provisioner (console side) rents the machine, waits for sshd to accept our key,
  pins the host key it saw and reports a spec (``ssh_common.SshSpec``).
- This runtime, in the process that dispatches (``overnight serve``), connects with
  the client key (``OVERNIGHT_SSH_KEY_FILE``), accepting only the pinned host key, and
  runs plain non-login exec sessions (``sh -s`` with the script on stdin, so nothing
  secret is on a command line that ``ps`` shows).
- ``launch: process``: ``setsid nohup <command>`` detached on the machine, bound to
  127.0.0.1:<engine_port>, output to ``~/.overnight/engines/<name>/engine.log``, every
  process of it carrying ``OVERNIGHT_ENGINE_NAME=<name>`` in its environment (how it is
  found again: after a restart of this service, and to stop it whole).
  ``launch: docker``: ``sudo -n docker run -d --name <name> ... -p 127.0.0.1:P:P``.
- The engine's output is streamed back (``tail -F`` / ``docker logs -f``) into
  ``<log_dir>/<name>.log`` here, which ``log_tail`` and the batch's engine-log route read.
- ``wait_ready`` opens ``forward_local_port('127.0.0.1', 0, '127.0.0.1', engine_port)``
  and polls the health endpoint through it; the batch dispatches to
  ``http://127.0.0.1:<local port>``. The engine port is never exposed on the machine.

The engine name is deterministic (``overnight-<provision id>-<hash of owner>``): a
second ``acquire`` for the same owner (this service restarted) adopts the engine that
still runs instead of starting another.

``alive`` reconnects when the connection dropped and re-opens the forward on the same
local port (the executor holds its URL); a machine that does not answer counts as alive
for ``unreachable_grace_s`` (requests meanwhile fail to connect and are retried), then
not. ``release`` stops the engine (process group TERM, KILL after the grace period, or
``docker rm -f``); a machine that no longer answers counts as released (its provider
terminates it), with a warning. ``sweep`` finds nothing: machines and what runs on them
are swept by the provisioners, which own them. ``aclose`` closes connections, never
engines.

asyncssh (the ``ssh`` extra) is imported only when a connection is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from overnight.errors import OvernightError, RuntimeStartError
from overnight.executor.http1 import (
    ConnectionFailed,
    HttpPool,
    RequestTimedOut,
    ResponseTooLarge,
)
from overnight.runtimes.base import (
    Endpoint,
    RecordHandle,
    RuntimeHandle,
    RuntimeSpec,
    _ignore,
)
from overnight.runtimes.local import read_tail
from overnight.runtimes.ssh_common import (
    SshKeyError,
    SshSpec,
    key_file_from_env,
    load_client_key,
)

__all__ = ["ENGINE_NAME_ENV", "REMOTE_DIR", "SshRuntime", "engine_name"]

log = logging.getLogger("overnight.runtimes.ssh")

#: Every process of an engine started with ``launch: process`` carries ``<this>=<name>``;
#: a docker engine has it in its container's environment.
ENGINE_NAME_ENV = "OVERNIGHT_ENGINE_NAME"
#: Where an engine's log, pid and exit code live on the machine (relative to the home).
REMOTE_DIR = ".overnight/engines"
LOCAL_HOST = "127.0.0.1"
#: Lines of the engine log quoted in start errors.
ERROR_TAIL_LINES = 20
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def engine_name(provision_id: str, owner: str) -> str:
    """``overnight-<provision id>-<hash of owner>``: the engine's container / directory
    name, the same for the same owner on the same machine (so it can be adopted)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", provision_id).strip("-._")[:40] or "engine"
    return f"overnight-{safe}-{hashlib.sha256(owner.encode()).hexdigest()[:10]}"


class _Unreachable(RuntimeStartError):
    """The machine did not answer (no connection, a command timed out)."""


@dataclass
class _Machine:
    """One SSH connection to ``user@host:port`` (with its pinned host key), shared by the
    engines on that machine."""

    user: str
    host: str
    port: int
    host_key: str
    conn: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Since when (monotonic) it has not answered; None while it does.
    unreachable_since: float | None = None
    #: When ``alive`` last tried to reach it while it did not answer.
    last_try: float = 0.0

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def connected(self) -> Any:
        conn = self.conn
        return conn if conn is not None and not conn.is_closed() else None


@dataclass
class _Live:
    """What this process holds for one engine: the forward, the log stream, the last state."""

    handle: RuntimeHandle
    machine: _Machine
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    listener: Any = None
    #: The connection the listener belongs to (it dies with it).
    listener_conn: Any = None
    #: The forward's local port, kept across reconnects (the executor holds the URL).
    local_port: int | None = None
    stream: asyncio.Task[None] | None = None
    stream_conn: Any = None
    #: Bytes of the remote log copied so far (``launch: process``).
    offset: int = 0
    #: The next stream starts with the last lines only (adopted, or after a reconnect).
    catch_up: str = "all"
    exit_code: int | None = None
    released: bool = False

    @property
    def name(self) -> str:
        return str(self.handle["name"])


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SshRuntime:
    """Engines on machines reached over SSH (see the module docstring)."""

    type: ClassVar[str] = "ssh"
    spec_model: ClassVar[type[RuntimeSpec]] = SshSpec

    def __init__(
        self,
        *,
        log_dir: Path | str,
        key_file: str | os.PathLike[str] | None = None,
        connect_timeout_s: float = 120.0,
        connect_retry_s: float = 2.0,
        attempt_timeout_s: float = 15.0,
        command_timeout_s: float = 60.0,
        stop_grace_s: float = 15.0,
        unreachable_grace_s: float = 120.0,
        release_connect_timeout_s: float = 20.0,
        keepalive_interval_s: float = 15.0,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.log_dir = Path(log_dir)
        #: The client key (``OVERNIGHT_SSH_KEY_FILE`` / ``AIBRIX_BATCH_SSH_KEY_FILE`` when not given).
        self.key_file = str(key_file) if key_file else key_file_from_env()
        #: How long sshd may take to answer at first (a machine still booting).
        self.connect_timeout_s = connect_timeout_s
        self.connect_retry_s = connect_retry_s
        #: One connect attempt (TCP, handshake, authentication).
        self.attempt_timeout_s = attempt_timeout_s
        self.command_timeout_s = command_timeout_s
        self.stop_grace_s = stop_grace_s
        self.unreachable_grace_s = unreachable_grace_s
        self.release_connect_timeout_s = release_connect_timeout_s
        self.keepalive_interval_s = keepalive_interval_s
        #: How often ``wait_ready`` asks the machine whether the engine still runs.
        self.poll_interval_s = poll_interval_s
        self._machines: dict[tuple[str, str, int, str], _Machine] = {}
        self._engines: dict[str, _Live] = {}
        #: Written to the engine's ``holder`` file on the machine at every acquire: the
        #: last process to start or adopt an engine holds it, and ``release`` stops it
        #: only while this process still does (another replica that took the batch over
        #: adopted it: the one that lost the batch must not stop it under the new one).
        self.holder_id = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(6).hex()}"

    # -- spec ---------------------------------------------------------------------------------
    def parse_spec(self, spec: RuntimeSpec | dict[str, Any]) -> SshSpec:
        if isinstance(spec, SshSpec):
            parsed = spec
        else:
            if isinstance(spec, RuntimeSpec):
                spec = spec.model_dump()
            parsed = SshSpec.model_validate(spec)
        if parsed.launch == "docker" and not parsed.image:
            raise RuntimeStartError("runtime.image is required with launch 'docker' (the engine's image)")
        if not parsed.health_endpoint.startswith("/"):
            raise RuntimeStartError(f"runtime.health_endpoint must be a path starting with '/', "
                                    f"got {parsed.health_endpoint!r}")
        return parsed

    @staticmethod
    def _environment(spec: SshSpec) -> dict[str, str]:
        """The engine's environment: ``env`` plus the secrets read from this process's
        environment now (never stored). Raises ``RuntimeStartError`` naming what is wrong."""
        out: dict[str, str] = {}
        for var, value in spec.env.items():
            if not _ENV_NAME_RE.fullmatch(var) or var == ENGINE_NAME_ENV:
                raise RuntimeStartError(f"runtime.env.{var} is not a usable environment variable name")
            out[var] = value
        for var, source in spec.secrets.items():
            if not _ENV_NAME_RE.fullmatch(var) or var == ENGINE_NAME_ENV:
                raise RuntimeStartError(f"runtime.secrets.{var} is not a usable environment variable name")
            if source not in os.environ:
                raise RuntimeStartError(
                    f"the engine's secret {var} is read from the environment variable {source}, which is not set "
                    "for overnight (set it in the environment of the process that dispatches, overnight serve)")
            value = os.environ[source]
            if spec.launch == "docker" and ("\n" in value or "\r" in value):
                raise RuntimeStartError(f"the engine's secret {var} (from {source}) contains a line break, which "
                                        "docker's --env-file cannot carry")
            out[var] = value
        return out

    @staticmethod
    def _argv(spec: SshSpec) -> list[str]:
        # In a container the engine listens on all of the container's interfaces; the
        # publish (-p 127.0.0.1:P:P) makes it reachable on the machine's loopback only.
        host = "0.0.0.0" if spec.launch == "docker" else LOCAL_HOST
        return [a.replace("{host}", host).replace("{port}", str(spec.engine_port)) for a in spec.command]

    # -- connections ----------------------------------------------------------------------------
    def _machine(self, handle: RuntimeHandle) -> _Machine:
        key = (str(handle["user"]), str(handle["host"]), int(handle["port"]), str(handle["host_key"]))
        m = self._machines.get(key)
        if m is None:
            m = self._machines[key] = _Machine(*key)
        return m

    def _client_key(self) -> Any:
        if not self.key_file:
            raise RuntimeStartError(
                "no SSH private key to connect with: set OVERNIGHT_SSH_KEY_FILE (or AIBRIX_BATCH_SSH_KEY_FILE) to "
                "the key whose public half the machines authorize")
        try:
            return load_client_key(self.key_file)
        except SshKeyError as exc:
            raise RuntimeStartError(exc.message) from None
        except ImportError:
            raise RuntimeStartError("the ssh runtime needs asyncssh: pip install 'overnight[ssh]'") from None

    @staticmethod
    def _pinned(m: _Machine) -> Any:
        import asyncssh

        try:
            return asyncssh.import_public_key(m.host_key)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise RuntimeStartError(f"runtime.host_key for {m.target} is not an OpenSSH public key line: {exc}") \
                from None

    async def _mismatch(self, m: _Machine, pinned: Any) -> str:
        import asyncssh

        offered = "unknown"
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.attempt_timeout_s):
                key = await asyncssh.get_server_host_key(
                    m.host, m.port, config=None,
                    server_host_key_algs=[a.decode() for a in pinned.sig_algorithms])
            if key is not None:
                offered = key.get_fingerprint()
        return (f"the SSH host key of {m.host}:{m.port} does not match the key pinned when the machine was "
                f"provisioned (pinned {pinned.get_fingerprint()}, offered {offered}); refusing to connect: another "
                "machine answers at this address, or its sshd was reinstalled")

    async def _conn(self, m: _Machine, *, window_s: float) -> Any:
        """The machine's connection, connecting (retried every ``connect_retry_s`` for up
        to ``window_s``; 0: one attempt) when there is none. A refused host key or client
        key fails at once (``RuntimeStartError``); a machine that never answers raises
        ``_Unreachable``."""
        conn = m.connected()
        if conn is not None:
            return conn
        async with m.lock:
            conn = m.connected()
            if conn is not None:
                return conn
            conn = await self._connect(m, window_s)
            m.conn, m.unreachable_since = conn, None
            return conn

    async def _connect(self, m: _Machine, window_s: float) -> Any:
        import asyncssh

        key = self._client_key()
        pinned = self._pinned(m)
        deadline = time.monotonic() + window_s
        last = ""
        while True:
            attempt_s = self.attempt_timeout_s if window_s <= 0 else \
                max(1.0, min(self.attempt_timeout_s, deadline - time.monotonic()))
            try:
                conn = await asyncssh.connect(
                    m.host, m.port, username=m.user, client_keys=[key], known_hosts=([pinned], [], []),
                    agent_path=None, config=None, connect_timeout=attempt_s,
                    keepalive_interval=self.keepalive_interval_s, keepalive_count_max=3,
                )
                log.info("connected to %s", m.target)
                return conn
            except asyncssh.HostKeyNotVerifiable:
                raise RuntimeStartError(await self._mismatch(m, pinned)) from None
            except asyncssh.PermissionDenied as exc:
                raise RuntimeStartError(
                    f"sshd at {m.target} refused the key {self.key_file} for user {m.user!r} ({exc.reason}); the "
                    "machine must authorize its public half") from None
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                last = _describe(exc)
            if time.monotonic() + self.connect_retry_s >= deadline:
                raise _Unreachable(f"cannot connect to sshd at {m.target} within {window_s:g} s: {last}")
            log.info("sshd at %s does not answer yet (%s); retrying", m.target, last)
            await asyncio.sleep(self.connect_retry_s)

    async def _sh(self, m: _Machine, conn: Any, script: str, *, timeout_s: float | None = None) -> tuple[int, str, str]:
        """Run ``script`` with ``sh -s`` (a plain exec session: the machine's own PATH)."""
        import asyncssh

        limit = timeout_s or self.command_timeout_s
        try:
            async with asyncio.timeout(limit):
                r = await conn.run("sh -s", input=script, check=False)
        except TimeoutError:
            raise _Unreachable(f"{m.target} did not finish a command within {limit:g} s") from None
        except (OSError, asyncssh.Error) as exc:
            raise _Unreachable(f"{m.target}: {_describe(exc)}") from None
        code = r.exit_status if r.exit_status is not None else -1
        return code, str(r.stdout or ""), str(r.stderr or "")

    # -- remote state ---------------------------------------------------------------------------
    @staticmethod
    def _remote_dir(name: str) -> str:
        """The engine's directory on the machine, as a shell word (under ``$HOME``)."""
        return '"$HOME"/' + _q(f"{REMOTE_DIR}/{name}")

    async def _state(self, live: _Live, conn: Any) -> tuple[str, int | None, int | None]:
        """(``running`` | ``exited`` | ``gone``, exit code, leader pid) of the engine."""
        name = live.name
        if live.handle["launch"] == "docker":
            code, out, err = await self._sh(live.machine, conn, (
                f"sudo -n docker inspect --format '{{{{.State.Running}}}} {{{{.State.ExitCode}}}}' {_q(name)}\n"))
            if code != 0:
                if "no such" in err.lower():
                    return "gone", None, None
                raise RuntimeStartError(f"engine {name}: `sudo -n docker inspect` failed on {live.machine.target} "
                                        f"(exit {code}): {err.strip() or out.strip()}")
            running, _, exit_code = out.strip().partition(" ")
            if running == "true":
                return "running", None, None
            return "exited", int(exit_code) if exit_code.lstrip("-").isdigit() else None, None
        marker = _q(f"{ENGINE_NAME_ENV}={name}")
        code, out, err = await self._sh(live.machine, conn, (
            f"d={self._remote_dir(name)}\n"
            f"if grep -qsxzF {marker} /proc/[0-9]*/environ; then echo running $(cat \"$d/engine.pid\" 2>/dev/null)\n"
            "elif [ -f \"$d/engine.exit\" ]; then echo exited $(cat \"$d/engine.exit\")\n"
            "else echo gone; fi\n"))
        words = out.split()
        if code != 0 or not words:
            raise _Unreachable(f"engine {name}: checking it on {live.machine.target} failed (exit {code}): "
                               f"{err.strip()}")
        num = int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else None
        if words[0] == "running":
            return "running", None, num
        if words[0] == "exited":
            return "exited", num, None
        return "gone", None, None

    async def _fresh_state(self, live: _Live, *, window_s: float) -> tuple[Any, str, int | None, int | None]:
        """(connection, state...) asked over the machine's connection; a connection that
        turns out dead (the network dropped it) is replaced once."""
        m = live.machine
        conn = await self._conn(m, window_s=window_s)
        try:
            return (conn, *await self._state(live, conn))
        except _Unreachable:
            if m.conn is conn:
                m.conn = None
            conn.close()
        conn = await self._conn(m, window_s=window_s)
        return (conn, *await self._state(live, conn))

    async def _remote_tail(self, live: _Live, conn: Any, lines: int) -> str:
        name = live.name
        if live.handle["launch"] == "docker":
            script = f"sudo -n docker logs --tail {lines} {_q(name)} 2>&1\n"
        else:
            script = f"tail -n {lines} {self._remote_dir(name)}/engine.log 2>&1\n"
        try:
            _, out, _ = await self._sh(live.machine, conn, script, timeout_s=min(20.0, self.command_timeout_s))
        except RuntimeStartError:
            return self.log_tail(live.handle, lines)
        return out.rstrip("\n")

    # -- local log ------------------------------------------------------------------------------
    def _note(self, live: _Live, text: str) -> None:
        path = Path(live.handle["log_path"])
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                stamp = datetime.now(UTC).isoformat(timespec="seconds")
                f.write(f"\n=== {stamp} overnight: {text} ===\n".encode())

    def _ensure_stream(self, live: _Live, conn: Any, leader_pid: int | None = None) -> None:
        """Copy the engine's output into the local log while ``conn`` lives."""
        if live.released:
            return
        if live.stream is not None and not live.stream.done() and live.stream_conn is conn:
            return
        if live.stream is not None and not live.stream.done():
            live.stream.cancel()
        if live.handle["launch"] == "docker":
            tail = {"all": "all", "last": "100", "new": "0"}[live.catch_up]
            cmd = f"sudo -n docker logs -f --tail {tail} {_q(live.name)}"
        else:
            path = self._remote_dir(live.name) + "/engine.log"
            pid = leader_pid or live.handle.get("pid")
            follow = f"-F --pid={int(pid)}" if pid else "-F"
            if live.catch_up == "last":
                # Adopted: the last part of what it wrote, then on from there.
                cmd = (f"s=$(wc -c < {path} 2>/dev/null || echo 0); s=$((s > 16384 ? s - 16384 : 0)); "
                       f"echo $s; exec tail -c +$((s + 1)) {follow} {path}")
            else:
                cmd = f"echo {live.offset}; exec tail -c +{live.offset + 1} {follow} {path}"
        live.catch_up = "new"
        live.stream_conn = conn
        live.stream = asyncio.get_running_loop().create_task(self._stream(live, conn, cmd),
                                                             name=f"overnight-ssh-log-{live.name}")

    async def _stream(self, live: _Live, conn: Any, cmd: str) -> None:
        import asyncssh

        proc = None
        try:
            proc = await conn.create_process(cmd, encoding=None, stderr=asyncssh.STDOUT)
            path = Path(live.handle["log_path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            f = await asyncio.to_thread(open, path, "ab")
            with f:
                if live.handle["launch"] != "docker":
                    first = await proc.stdout.readline()  # where tail starts in the remote log
                    if first.strip().isdigit():
                        live.offset = int(first.strip())
                while True:
                    chunk = await proc.stdout.read(65536)
                    if not chunk:
                        break
                    f.write(chunk)
                    f.flush()
                    live.offset += len(chunk)
        except (OSError, asyncssh.Error) as exc:
            log.debug("engine %s: log stream ended: %s", live.name, _describe(exc))
        finally:
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.terminate()
                with contextlib.suppress(Exception):
                    proc.close()

    async def _stop_stream(self, live: _Live) -> None:
        task, live.stream = live.stream, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # -- forward --------------------------------------------------------------------------------
    async def _forward(self, live: _Live, conn: Any) -> int:
        """The forward's local port, (re)opened on ``conn`` on the same port as before."""
        if live.listener is not None and live.listener_conn is conn and not conn.is_closed():
            return int(live.local_port or 0)
        if live.listener is not None:
            with contextlib.suppress(Exception):
                live.listener.close()
        live.listener = live.listener_conn = None
        listener = await conn.forward_local_port(LOCAL_HOST, live.local_port or 0, LOCAL_HOST,
                                                 int(live.handle["engine_port"]))
        live.listener, live.listener_conn = listener, conn
        live.local_port = int(listener.get_port())
        live.handle["local_port"] = live.local_port
        return live.local_port

    @staticmethod
    def _close_forward(live: _Live) -> None:
        if live.listener is not None:
            with contextlib.suppress(Exception):
                live.listener.close()
        live.listener = live.listener_conn = None

    def _live(self, handle: RuntimeHandle) -> _Live:
        live = self._engines.get(str(handle["name"]))
        if live is None or live.handle.get("owner") != handle.get("owner"):
            live = self._engines[str(handle["name"])] = _Live(dict(handle), self._machine(handle))
        return live

    # -- acquire --------------------------------------------------------------------------------
    async def acquire(self, spec: RuntimeSpec | dict[str, Any], *, owner: str,
                      record: RecordHandle = _ignore) -> RuntimeHandle:
        spec = self.parse_spec(spec)
        env = self._environment(spec)  # a missing secret fails before anything happens
        self._client_key()
        name = engine_name(spec.provision_id, owner)
        handle: RuntimeHandle = {
            "type": self.type, "owner": owner, "id": name, "name": name,
            "host": spec.host, "port": spec.port, "user": spec.user, "host_key": spec.host_key,
            "target": f"ssh://{spec.user}@{spec.host}:{spec.port}",
            "launch": spec.launch, "image": spec.image, "engine_port": spec.engine_port,
            "health_endpoint": spec.health_endpoint, "ready_timeout_seconds": spec.ready_timeout_seconds,
            "gpu_count": spec.gpus, "provision_id": spec.provision_id, "provider": spec.provider,
            "remote_dir": f"~/{REMOTE_DIR}/{name}", "log_path": str((self.log_dir / f"{name}.log").resolve()),
            "stop_grace_seconds": self.stop_grace_s,
        }
        old = self._engines.pop(name, None)
        if old is not None:
            await self._stop_stream(old)
            self._close_forward(old)
        live = self._live(handle)
        m = live.machine
        conn = await self._conn(m, window_s=self.connect_timeout_s)
        if spec.launch == "docker":
            await self._preflight(live, conn, spec)
        await self._hold(live, conn)
        state, _, pid = await self._state(live, conn)
        if state == "running":
            handle["adopted"] = True
            if pid:
                handle["pid"] = pid
            live.handle = handle
            await record(handle)
            self._note(live, f"adopted engine {name} already running on {m.target} (its last output follows)")
            live.catch_up = "last"
            self._ensure_stream(live, conn, pid)
            log.info("adopted engine %s for %s on %s", name, owner, m.target)
            return handle
        await record(handle)  # before anything starts: a crash from here on leaves a trace
        self._note(live, f"starting engine {name} for {owner} on {m.target} (launch {spec.launch}, "
                         f"port {spec.engine_port})")
        try:
            if spec.launch == "docker":
                handle["container_id"] = await self._run_docker(live, conn, spec, env)
            else:
                handle["pid"] = await self._run_process(live, conn, spec, env)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.release(handle))
            raise
        live.handle = handle
        live.offset, live.catch_up = 0, "all"
        self._ensure_stream(live, conn, handle.get("pid"))
        await record(handle)
        log.info("started engine %s for %s on %s (launch %s)", name, owner, m.target, spec.launch)
        return handle

    async def _hold(self, live: _Live, conn: Any) -> None:
        """Write this process's ``holder_id`` as the engine's holder, before it is
        started or adopted (a release by a process that held it before is then a no-op)."""
        d = self._remote_dir(live.name)
        code, out, err = await self._sh(live.machine, conn, (
            f"umask 077\nmkdir -p {d}\nprintf '%s\\n' {_q(self.holder_id)} > {d}/holder.tmp\n"
            f"mv -f {d}/holder.tmp {d}/holder\n"))
        if code != 0:
            raise RuntimeStartError(f"engine {live.name}: writing its holder file on {live.machine.target} failed "
                                    f"(exit {code}): {(err.strip() or out.strip())[:500]}")

    async def _preflight(self, live: _Live, conn: Any, spec: SshSpec) -> None:
        """What ``docker run`` needs: a GPU driver (when the engine wants GPUs), Docker and
        passwordless sudo. Fails naming what is missing."""
        m = live.machine
        if spec.gpus > 0:
            code, out, err = await self._sh(m, conn, "nvidia-smi -L\n")
            if code != 0:
                raise RuntimeStartError(
                    f"engine {live.name} needs {spec.gpus} GPU(s), but `nvidia-smi -L` fails on {m.target} (exit "
                    f"{code}): {(err.strip() or out.strip())[:500]}")
        code, out, err = await self._sh(m, conn, "sudo -n docker info\n")
        if code != 0:
            raise RuntimeStartError(
                f"engine {live.name}: `sudo -n docker info` fails on {m.target} (exit {code}): "
                f"{(err.strip() or out.strip())[:500]}; launch 'docker' needs Docker and passwordless sudo there")

    async def _run_process(self, live: _Live, conn: Any, spec: SshSpec, env: dict[str, str]) -> int:
        name, d = live.name, self._remote_dir(live.name)
        argv = " ".join(_q(a) for a in self._argv(spec))
        exports = "".join(f"export {k}={_q(v)}\n" for k, v in env.items())
        # The script goes over the session's stdin: the secrets in it are on no command line.
        script = (
            "set -e\numask 077\n"
            f"mkdir -p {d}\ncd {d}\n"
            "rm -f engine.pid engine.exit\n: > engine.log\n"
            f"export {ENGINE_NAME_ENV}={_q(name)}\n{exports}"
            # The wrapper is the session and group leader: its pid names the group to stop,
            # and it records the engine's exit code.
            "setsid sh -c 'echo $$ > engine.pid; \"$@\" < /dev/null; echo $? > engine.exit' overnight-engine "
            f"nohup {argv} >> engine.log 2>&1 < /dev/null &\n"
            "i=0\nwhile [ ! -s engine.pid ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n"
            "if [ -s engine.pid ]; then echo pid $(cat engine.pid)\n"
            "else echo 'no pid file after 10 s' >&2; exit 1; fi\n"
        )
        code, out, err = await self._sh(live.machine, conn, script)
        words = out.split()
        if code != 0 or len(words) < 2 or not words[1].isdigit():
            tail = await self._remote_tail(live, conn, ERROR_TAIL_LINES)
            raise RuntimeStartError(f"engine {name}: starting it on {live.machine.target} failed (exit {code}): "
                                    f"{err.strip()}; last lines of its log:\n{tail}")
        return int(words[1])

    def docker_run_argv(self, spec: SshSpec, name: str, env: dict[str, str], env_file: str | None) -> list[str]:
        """``sudo -n docker run -d ...`` for ``spec`` (secret values in ``env_file``, not here)."""
        p = spec.engine_port
        argv = ["sudo", "-n", "docker", "run", "-d", "--name", name]
        if spec.gpus > 0:
            argv += ["--gpus", "all"]
        # vLLM's tensor parallelism needs shared memory (docs: --ipc=host or --shm-size).
        argv += ["--ipc=host", "-p", f"{LOCAL_HOST}:{p}:{p}", "--label", f"overnight.engine={name}",
                 "-e", f"{ENGINE_NAME_ENV}={name}"]
        for k, v in env.items():
            if k not in spec.secrets:
                argv += ["-e", f"{k}={v}"]
        if env_file:
            argv += ["--env-file", env_file]
        assert spec.image is not None
        return [*argv, spec.image, *self._argv(spec)]

    async def _run_docker(self, live: _Live, conn: Any, spec: SshSpec, env: dict[str, str]) -> str:
        name, d = live.name, self._remote_dir(live.name)
        secrets = {k: v for k, v in env.items() if k in spec.secrets}
        env_file = "secrets.env" if secrets else None  # in the engine's directory, the working directory
        argv = " ".join(_q(a) for a in self.docker_run_argv(spec, name, env, env_file))
        script = f"umask 077\nmkdir -p {d}\ncd {d}\nsudo -n docker rm -f {_q(name)} >/dev/null 2>&1 || true\n"
        if env_file:
            # printf is the shell's own: the values stay off every command line.
            lines = " ".join(_q(f"{k}={v}") for k, v in secrets.items())
            script += f"printf '%s\\n' {lines} > {_q(env_file)}\n"
        script += f"rc=0\n{argv} || rc=$?\n"
        if env_file:
            script += f"rm -f {_q(env_file)}\n"
        script += "exit $rc\n"
        code, out, err = await self._sh(live.machine, conn, script)
        if code != 0:
            raise RuntimeStartError(f"engine {name}: `docker run` failed on {live.machine.target} (exit {code}): "
                                    f"{(err.strip() or out.strip())[:2000]}")
        return out.strip().splitlines()[-1] if out.strip() else ""

    # -- ready ----------------------------------------------------------------------------------
    async def wait_ready(self, handle: RuntimeHandle, *, timeout_s: float) -> Endpoint:
        live = self._live(handle)
        m, name = live.machine, live.name
        path = str(handle.get("health_endpoint") or "/health")
        start = time.monotonic()
        deadline = start + timeout_s
        conn = await self._conn(m, window_s=max(1.0, deadline - time.monotonic()))
        try:
            port = await self._forward(live, conn)
        except OSError as exc:
            raise RuntimeStartError(f"engine {name}: cannot open the SSH port-forward to {m.target}: "
                                    f"{_describe(exc)}") from None
        url = f"http://{LOCAL_HOST}:{port}"
        pool = HttpPool(url, timeout_s=5.0, connect_timeout_s=2.0, max_connections=1, max_body_bytes=1 << 20)
        next_check, delay, last = 0.0, 0.05, "no answer yet"
        try:
            while True:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.poll_interval_s
                    try:
                        conn, state, code, pid = await self._fresh_state(
                            live, window_s=max(1.0, min(self.connect_timeout_s, deadline - time.monotonic())))
                    except _Unreachable as exc:
                        last = exc.message  # sshd or the network away for a moment: keep trying
                    else:
                        if state != "running":
                            raise RuntimeStartError(await self._start_failure(live, conn, state, code))
                        self._ensure_stream(live, conn, pid)
                        if live.listener_conn is not conn:
                            try:
                                port = await self._forward(live, conn)  # the same port: the URL holds
                            except OSError as exc:
                                raise RuntimeStartError(f"engine {name}: cannot re-open the SSH port-forward on "
                                                        f"local port {port}: {_describe(exc)}") from None
                remaining = deadline - time.monotonic()
                try:
                    reply = await pool.request("GET", path, content_type=b"text/plain",
                                               timeout_s=max(0.1, min(5.0, remaining)))
                    if reply.status == 200:
                        break
                    last = f"HTTP {reply.status}"
                except (ConnectionFailed, RequestTimedOut, ResponseTooLarge, OSError) as exc:
                    last = _describe(exc)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = await self._remote_tail(live, conn, ERROR_TAIL_LINES) if m.connected() else \
                        self.log_tail(handle, ERROR_TAIL_LINES)
                    raise RuntimeStartError(
                        f"engine {name} on {m.target} was not ready within {timeout_s:g} s (no 200 from {path} "
                        f"through the SSH tunnel; last: {last}); last lines of its log:\n{tail}")
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 1.5, 0.5)
        finally:
            await pool.aclose()
        log.info("engine %s on %s ready in %.1f s at %s", name, m.target, time.monotonic() - start, url)
        return Endpoint(url)

    async def _start_failure(self, live: _Live, conn: Any, state: str, code: int | None) -> str:
        live.exit_code = code
        how = f"exited with code {code}" if code is not None else ("is gone" if state == "gone" else "stopped")
        if live.handle["launch"] == "docker" and state == "gone":
            how = "is gone (its container was removed)"
        tail = await self._remote_tail(live, conn, ERROR_TAIL_LINES)
        return f"engine {live.name} on {live.machine.target} {how} before it was ready; last lines of its log:\n{tail}"

    # -- alive ----------------------------------------------------------------------------------
    async def alive(self, handle: RuntimeHandle) -> bool:
        live = self._live(handle)
        m = live.machine
        async with live.lock:
            if live.released:
                return False
            now = time.monotonic()
            if m.unreachable_since is not None and now - m.last_try < self.connect_retry_s \
                    and now - m.unreachable_since < self.unreachable_grace_s:
                return True  # tried a moment ago (the engine manager asks every second)
            m.last_try = now
            try:
                conn, state, code, pid = await self._fresh_state(live, window_s=0)
            except _Unreachable as exc:
                now = time.monotonic()
                if m.unreachable_since is None:
                    m.unreachable_since = now
                    log.warning("engine %s: %s does not answer (%s); still counted alive for %g s",
                                live.name, m.target, exc.message, self.unreachable_grace_s)
                if now - m.unreachable_since < self.unreachable_grace_s:
                    return True
                log.error("engine %s: %s has not answered for %.0f s", live.name, m.target, now - m.unreachable_since)
                return False
            except RuntimeStartError as exc:
                log.error("engine %s: %s", live.name, exc.message)
                return False
            m.unreachable_since = None
            if state != "running":
                live.exit_code = code
                return False
            if live.local_port is not None and live.listener_conn is not conn:
                try:
                    await self._forward(live, conn)
                except OSError as exc:
                    # The executor holds the old URL: re-acquiring (adopting) gives a new one.
                    log.warning("engine %s: cannot re-open the forward on local port %s (%s); re-acquiring it",
                                live.name, live.local_port, _describe(exc))
                    return False
            self._ensure_stream(live, conn, pid)
            return True

    def exit_info(self, handle: RuntimeHandle) -> dict[str, Any]:
        """``{"exit_code": int | None, "log_tail": str}`` as last seen (for crash messages)."""
        live = self._engines.get(str(handle.get("name")))
        code = live.exit_code if live is not None else None
        return {"exit_code": code, "log_tail": self.log_tail(handle, ERROR_TAIL_LINES)}

    def log_tail(self, handle: RuntimeHandle, lines: int = 100) -> str:
        return read_tail(handle["log_path"], lines) if handle.get("log_path") else ""

    # -- release --------------------------------------------------------------------------------
    async def release(self, handle: RuntimeHandle) -> None:
        live = self._live(handle)
        m = live.machine
        async with live.lock:
            live.released = True
            await self._stop_stream(live)
            try:
                conn = await self._conn(m, window_s=self.release_connect_timeout_s)
                await self._stop(live, conn)
            except _Unreachable as exc:
                log.warning("engine %s: %s does not answer (%s); counted as released (the provider terminates the "
                            "machine)", live.name, m.target, exc.message)
            except RuntimeStartError as exc:
                log.warning("engine %s: cannot connect to %s to stop it (%s); counted as released (the provider "
                            "terminates the machine)", live.name, m.target, exc.message)
            finally:
                self._close_forward(live)
                if self._engines.get(live.name) is live:
                    del self._engines[live.name]
                await self._drop_machine_if_unused(m)

    async def _stop(self, live: _Live, conn: Any) -> None:
        name, m = live.name, live.machine
        # Adopted since by another process (a replica that took the batch over, or this
        # service restarted): that one stops it when it is done with it. Checked in the
        # same script that stops it.
        guard = (f"h=$(cat {self._remote_dir(name)}/holder 2>/dev/null || true)\n"
                 f"if [ -n \"$h\" ] && [ \"$h\" != {_q(self.holder_id)} ]; then echo \"held $h\"; exit 0; fi\n")
        if live.handle["launch"] == "docker":
            code, out, err = await self._sh(m, conn, guard + (
                f"sudo -n docker rm -f {_q(name)} >/dev/null 2>&1\n"
                f"sudo -n docker inspect --format '{{{{.State.Running}}}}' {_q(name)} >/dev/null 2>&1 "
                "&& { echo left; exit 1; }\necho gone\n"))
            if code != 0:
                raise OvernightError(f"engine {name}: its container is still there on {m.target} after "
                                     f"`docker rm -f`: {err.strip()}", code="runtime_stop_failed")
        else:
            marker = _q(f"{ENGINE_NAME_ENV}={name}")
            ticks = max(1, math.ceil(float(live.handle.get("stop_grace_seconds", self.stop_grace_s)) * 5))
            script = guard + (
                f"d={self._remote_dir(name)}\n"
                f"members() {{ grep -lsxzF {marker} /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | tr '\\n' ' '; }}\n"
                "signal_all() {\n  pids=$(members); [ -n \"$pids\" ] || return 1\n"
                "  lead=$(cat \"$d/engine.pid\" 2>/dev/null || true)\n"
                "  for p in $pids; do\n    [ \"$p\" = \"$lead\" ] && kill -s \"$1\" -- \"-$p\" 2>/dev/null\n"
                "    kill -s \"$1\" \"$p\" 2>/dev/null\n  done\n  return 0\n}\n"
                "wait_gone() {\n  i=0\n"
                "  while [ -n \"$(members)\" ] && [ $i -lt $1 ]; do sleep 0.2; i=$((i + 1)); done\n}\n"
                f"if signal_all TERM; then wait_gone {ticks}; if signal_all KILL; then wait_gone 100; fi; fi\n"
                "left=$(members)\nif [ -n \"$left\" ]; then echo \"left $left\"; exit 1; fi\necho gone\n"
            )
            code, out, err = await self._sh(m, conn, script, timeout_s=self.command_timeout_s + ticks / 5 + 20)
            if code != 0:
                raise OvernightError(f"engine {name}: processes {out.strip()} still run on {m.target} after SIGKILL",
                                     code="runtime_stop_failed")
        if out.startswith("held "):
            holder = out[5:].strip()
            self._note(live, f"engine {name} left running: {holder} holds it now")
            log.warning("engine %s on %s: not stopped, another process holds it now (%s)", name, m.target, holder)
            return
        self._note(live, f"engine {name} stopped")
        log.info("engine %s stopped on %s", name, m.target)

    async def _drop_machine_if_unused(self, m: _Machine) -> None:
        if any(e.machine is m for e in self._engines.values()):
            return
        for key, other in list(self._machines.items()):
            if other is m:
                del self._machines[key]
        await self._close_conn(m)

    @staticmethod
    async def _close_conn(m: _Machine) -> None:
        conn, m.conn = m.conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.wait_closed()

    # -- the rest of the protocol ---------------------------------------------------------------
    async def sweep(self, live_owners: set[str]) -> list[RuntimeHandle]:
        """Nothing: the machines (and whatever runs on them) belong to the provisioners,
        which sweep what they rented (by name or tag) and terminate it."""
        return []

    async def aclose(self) -> None:
        """Stop streaming and close forwards and connections; engines keep running
        (release stops them)."""
        for live in list(self._engines.values()):
            await self._stop_stream(live)
            self._close_forward(live)
        self._engines.clear()
        for m in list(self._machines.values()):
            await self._close_conn(m)
        self._machines.clear()
