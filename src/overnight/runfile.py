"""``overnight run``: one input file through the executor, without a server.

``run_file(RunConfig(...))`` validates the input (nothing is sent if a line is
wrong), keeps its state beside the output, drives the engine with the same
``execute()`` the service uses (adaptive concurrency, retries, the same output
line format) and moves the finished files into place.

State directory (default ``<output>.overnight/``)::

    manifest.json     which input (path, size, mtime, sha256), endpoint, outputs
    checkpoint        the executor's checkpoint, replaced atomically (fsync'd)
    files/            storage: the input copy, sealed spool segments, assembled files
    spool/            the live spool (Spool.recover folds it back in after a crash)
    engine.json       the handle of a template's engine while it runs
    engine-logs/      that engine's stdout and stderr
    lock              held (flock) by the process running it

Running the same command again continues where it stopped: finished requests
are never sent again (checkpoint + spool recovery), so after a SIGKILL at most
the requests that were in flight are re-sent. A finished run's state directory is
removed (``keep_state`` keeps it); running it again finds the output already
holding every ``custom_id`` of the input and does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from overnight import defaults
from overnight._concurrency import to_thread
from overnight.batches.validation import ValidationLimits, validate_input
from overnight.composition import local_runtime, retry_policy
from overnight.config import Settings
from overnight.errors import OvernightError, RetryableEngineError
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.engine import HttpEngineClient
from overnight.executor.engine_metrics import MetricsProbe
from overnight.executor.health import EngineHealth, TrackedEngine
from overnight.executor.limiter import ConcurrencyLimits
from overnight.executor.run import ExecuteParams, Outcome, StopSignal, execute
from overnight.executor.sharing import BatchShare, EngineCapacity
from overnight.executor.writer import Spool
from overnight.ids import new_id
from overnight.storage.local import LocalStorage

__all__ = ["Progress", "PlainReporter", "Reporter", "RichReporter", "RunConfig", "RunError", "RunResult", "run_file"]

MANIFEST_VERSION = 1
INPUT_KEY = "input.jsonl"
OUT_KEY = "final/output.jsonl"
ERR_KEY = "final/errors.jsonl"
#: The owner prefix of engines ``overnight run`` starts (``OVERNIGHT_RUNTIME_OWNER``).
INSTALLATION_ID = "overnight-run"
#: Exit codes: as shells report a death by SIGINT / SIGTERM.
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
_HASH_CHUNK = 1 << 20
_FAR_FUTURE_S = 100 * 365 * 86400.0


class RunError(Exception):
    """A refusal or failure with its exit code and a message for the user."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(kw_only=True)
class RunConfig:
    input_path: Path
    output_path: Path
    #: Failed requests' lines go here; None: into the output file, after the others.
    errors_path: Path | None = None
    engine_url: str | None = None
    api_key: str | None = None
    template: str | None = None
    template_version: str | None = None
    profile: str | None = None
    templates_dir: Path | None = None
    #: Most requests in flight (the adaptive limit stays at or below it).
    max_concurrency: int | None = None
    #: A fixed number in flight: no adaptation.
    concurrency: int | None = None
    #: None: the ``url`` of the input's lines.
    endpoint: str | None = None
    state_dir: Path | None = None
    keep_state: bool = False
    #: Retry, backoff, timeouts, checkpoint interval (``OVERNIGHT_*`` variables).
    settings: Settings = field(default_factory=Settings)
    #: Catch SIGINT / SIGTERM: stop dispatching, store the checkpoint, return 130 / 143.
    handle_signals: bool = True

    def state(self) -> Path:
        out = self.output_path.resolve()
        return (self.state_dir or out.with_name(out.name + ".overnight")).resolve()


@dataclass
class RunResult:
    #: completed | already_done | invalid | stopped | failed
    status: str
    exit_code: int
    total: int = 0
    completed: int = 0
    failed: int = 0
    #: Requests finished by this invocation, and how long it dispatched.
    finished_now: int = 0
    seconds: float = 0.0
    output_path: Path | None = None
    errors_path: Path | None = None
    #: Validation errors (``{"code", "message", "line", "param"}``).
    errors: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""


# -- progress -----------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    failed: int
    #: Requests per second over the last few seconds.
    rate: float
    #: The adaptive limit now, and requests in flight.
    concurrency: int
    inflight: int


class Reporter(Protocol):
    def message(self, text: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def update(self, p: Progress) -> None: ...
    def stop(self) -> None: ...


def _describe(p: Progress) -> str:
    pct = 100.0 * p.done / p.total if p.total else 100.0
    return (f"{p.done}/{p.total} ({pct:.1f}%), {p.rate:.1f} req/s, {p.failed} failed, "
            f"concurrency {p.concurrency} ({p.inflight} in flight)")


class PlainReporter:
    """One line every ``every_s`` seconds (for logs and pipes)."""

    def __init__(self, *, every_s: float = 5.0, stream: Any = None) -> None:
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self._last = 0.0

    def _print(self, text: str) -> None:
        print(f"overnight run: {text}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        self._print(text)

    def start(self, total: int, done: int) -> None:
        self._last = time.monotonic()

    def update(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(_describe(p))

    def stop(self) -> None:
        pass


class RichReporter:
    """A progress bar on a terminal."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self._progress: Any = None
        self._task: Any = None

    def message(self, text: str) -> None:
        self.console.print(f"overnight run: {text}", markup=False, highlight=False)

    def start(self, total: int, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        self._progress = Bar(
            TextColumn("overnight run"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=self.console, transient=False, refresh_per_second=4,
        )
        self._task = self._progress.add_task("run", total=total, completed=done, info="")
        self._progress.start()

    def update(self, p: Progress) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=p.done, info=(
                f"{p.rate:.1f} req/s, {p.failed} failed, concurrency {p.concurrency} ({p.inflight} in flight)"))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class _Silent:
    def message(self, text: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def update(self, p: Progress) -> None: ...
    def stop(self) -> None: ...


# -- files --------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _copy_and_hash(src: Path, dest: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dest`` (fsync'd); returns (bytes, sha256 hex)."""
    h = hashlib.sha256()
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(_HASH_CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return size, h.hexdigest()


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _publish(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` atomically (a copy beside ``dest`` first when they are
    on different filesystems)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, _HASH_CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
        os.unlink(src)
    _fsync_dir(dest.parent)


def _append(dest: Path, src: Path) -> None:
    with open(src, "rb") as fin, open(dest, "ab") as fout:
        shutil.copyfileobj(fin, fout, _HASH_CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def _id_hash(custom_id: object) -> int:
    raw = orjson.dumps(custom_id)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def _custom_ids(paths: list[Path]) -> np.ndarray | None:
    """Sorted 64-bit hashes of every line's ``custom_id`` (None: a line is not a
    JSON object with one)."""
    hashes: list[int] = []
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return None
                if not isinstance(obj, dict) or "custom_id" not in obj:
                    return None
                hashes.append(_id_hash(obj["custom_id"]))
    return np.sort(np.array(hashes, dtype=np.uint64))


def _count_lines(path: Path) -> tuple[int, int]:
    """(lines, lines with an ``error``) of an output file."""
    lines = failed = 0
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                lines += 1
                if orjson.loads(raw).get("error") is not None:
                    failed += 1
    return lines, failed


class _Lock:
    """An exclusive ``flock`` on ``<state>/lock``: one process per state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"{self.path.parent} is in use by another `overnight run` (pid {holder}); "
                           "wait for it, or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- the run ------------------------------------------------------------------------


class _State:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = root / "manifest.json"
        self.checkpoint = root / "checkpoint"
        self.files = root / "files"
        self.spool = root / "spool"
        self.engine = root / "engine.json"
        self.logs = root / "engine-logs"
        self.lock = root / "lock"

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            data = self.manifest.read_bytes()
        except FileNotFoundError:
            return None
        m = orjson.loads(data)
        if m.get("v") != MANIFEST_VERSION:
            raise RunError(f"{self.manifest} was written by another version of overnight (format {m.get('v')!r}); "
                           f"remove {self.root} to start over")
        return m

    def write_manifest(self, m: dict[str, Any]) -> None:
        write_atomic(self.manifest, orjson.dumps(m, option=orjson.OPT_INDENT_2))

    def clear(self) -> None:
        """Everything but the lock (a start that did not get as far as its manifest)."""
        for p in self.root.iterdir():
            if p.name == "lock":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def remove(self) -> None:
        # Renamed first: a crash half-way never leaves a state directory that
        # looks like an unfinished run with parts missing.
        gone = self.root.with_name(f".{self.root.name}.removing-{os.getpid()}")
        os.replace(self.root, gone)
        shutil.rmtree(gone, ignore_errors=True)


def _limits(cfg: RunConfig) -> tuple[ConcurrencyLimits, int, int]:
    """(engine limits, the run's cap, its floor)."""
    base = cfg.settings.concurrency_limits()
    if cfg.concurrency:
        n = cfg.concurrency
        return dataclasses.replace(base, initial=n, min=n, max=n, fixed=True), n, n
    cap = cfg.max_concurrency or base.max
    limits = dataclasses.replace(base, initial=min(base.initial, cap), min=min(base.min, cap), max=cap)
    return limits, cap, 0


def _first_url(path: Path) -> str | None:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = orjson.loads(raw).get("url")
                except (orjson.JSONDecodeError, AttributeError):
                    return None
                return url if isinstance(url, str) and url else None
    return None


def _format_errors(errors: list[dict[str, Any]]) -> str:
    return "\n".join(f"  {e['message']}" for e in errors)


class _Engine:
    """The engine a run talks to: a URL, or a template's engine on this host."""

    def __init__(self, cfg: RunConfig, state: _State, owner: str, report: Reporter) -> None:
        self.cfg, self.state, self.owner, self.report = cfg, state, owner, report
        self.resolved: Any = None
        self.runtime: Any = None
        self.handle: dict[str, Any] | None = None
        self.url: str | None = cfg.engine_url
        self.client: Any = None
        self.health: EngineHealth | None = None

    def resolve_template(self) -> None:
        """Look the template up (before anything is written)."""
        from overnight.templates import DirectorySource, TemplateSourceError, resolve

        cfg = self.cfg
        if cfg.templates_dir is None:
            raise RunError("--template needs a templates directory: --templates-dir DIR or OVERNIGHT_TEMPLATES_DIR")
        try:
            source = DirectorySource(cfg.templates_dir, reload_s=None)
            ref: dict[str, Any] = {"name": cfg.template}
            if cfg.template_version:
                ref["version"] = cfg.template_version
            self.resolved = resolve(source, ref, {"name": cfg.profile} if cfg.profile else None,
                                    template_param="--template", profile_param="--profile")
        except TemplateSourceError as exc:
            raise RunError(exc.message) from None
        except OvernightError as exc:
            raise RunError(f"{exc.message}") from None

    def check_lines(self, endpoint: str, model: str | None) -> None:
        from overnight.templates import check_endpoint

        if self.resolved is None:
            return
        try:
            check_endpoint(self.resolved, endpoint)
        except OvernightError as exc:
            raise RunError(exc.message) from None
        if model is not None and model != self.resolved.name:
            raise RunError(
                f"the input's lines ask for model {model!r}, but template {self.resolved.name!r} serves its model "
                f"as {self.resolved.name!r} (--served-model-name); use \"model\": \"{self.resolved.name}\" in the lines"
            )

    async def start(self) -> None:
        if self.resolved is not None:
            await self._start_template()
        assert self.url is not None
        raw = HttpEngineClient(self.url, api_key=self.cfg.api_key if self.resolved is None else None,
                               timeout_s=self.cfg.settings.request_timeout_s,
                               max_response_bytes=self.cfg.settings.max_response_bytes)
        self.health = EngineHealth(self.url)
        self.client = TrackedEngine(raw, self.health)
        if self.resolved is None:
            await self._check_reachable(raw)

    async def _check_reachable(self, raw: HttpEngineClient) -> None:
        try:
            status, _ = await raw.get("/v1/models", timeout_s=defaults.ENGINE_CHECK_TIMEOUT_S)
        except RetryableEngineError as exc:
            raise RunError(f"cannot reach the engine at {self.url}: {exc.message}; nothing was sent", 1) from None
        if status in (401, 403):
            raise RunError(f"the engine at {self.url} refused the API key (HTTP {status} on GET /v1/models); "
                           "pass --api-key (or OVERNIGHT_ENGINE_API_KEY)", 1)

    def check_runtime(self) -> Any:
        """The local runtime's spec for the template, checked on this host (a bad field,
        a secret that is not set, more GPUs than the host has) before anything starts."""
        from overnight.templates import local_spec

        if self.resolved is None:
            return None
        if self.runtime is None:
            self.runtime = local_runtime(log_dir=self.state.logs, installation_id=INSTALLATION_ID)
        try:
            return self.runtime.check(local_spec(self.resolved))
        except (OvernightError, ValueError) as exc:
            raise RunError(f"the engine cannot start here: {getattr(exc, 'message', exc)}", 1) from None

    async def _start_template(self) -> None:
        spec = self.check_runtime()
        await self.release_leftover()

        async def record(handle: dict[str, Any]) -> None:
            await to_thread(write_atomic, self.state.engine, orjson.dumps(handle))

        r = self.resolved
        self.report.message(f"starting engine {r.name!r} (template {r.name} version {r.version}); "
                            f"log {self.state.logs}")
        try:
            self.handle = await self.runtime.acquire(spec, owner=self.owner, record=record)
            started = time.monotonic()
            endpoint = await self.runtime.wait_ready(self.handle, timeout_s=r.ready_timeout_seconds)
        except OvernightError as exc:
            raise RunError(f"the engine did not start: {exc.message}", 1) from None
        self.report.message(f"engine {r.name!r} ready at {endpoint.url} in {time.monotonic() - started:.1f} s")
        self.url = endpoint.url

    async def release_leftover(self) -> None:
        """An engine a killed run left (its guard normally stops it with its parent)."""
        try:
            old = orjson.loads(self.state.engine.read_bytes())
        except FileNotFoundError:
            return
        if self.runtime is None:
            self.runtime = local_runtime(log_dir=self.state.logs, installation_id=INSTALLATION_ID)
        await self.runtime.release(old)
        self.state.engine.unlink(missing_ok=True)

    async def dead(self) -> str | None:
        """Why the template's engine is gone, or None while it runs."""
        if self.handle is None or self.runtime is None or await self.runtime.alive(self.handle):
            return None
        info = self.runtime.exit_info(self.handle)
        code = info.get("exit_code")
        how = f"exited with code {code}" if code is not None else "is gone"
        if code is not None and code > 128:
            with contextlib.suppress(ValueError):
                how += f" ({signal.Signals(code - 128).name})"
        return f"the engine {how}; last lines of {self.handle['log_path']}:\n{info.get('log_tail', '')}"

    def log_hint(self) -> str:
        if self.handle is None or self.runtime is None:
            return ""
        return f"\nengine log {self.handle['log_path']}; its last lines:\n{self.runtime.log_tail(self.handle, 20)}"

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
        if self.handle is not None and self.runtime is not None:
            await self.runtime.release(self.handle)
            self.handle = None
            self.state.engine.unlink(missing_ok=True)
        if self.runtime is not None:
            await self.runtime.aclose()


async def _finished_check(cfg: RunConfig) -> RunResult:
    """The output exists and there is no state: a finished run, or someone else's file."""
    out, err = cfg.output_path, cfg.errors_path
    outputs = [out] + ([err] if err is not None and err.exists() else [])
    wanted, have = await asyncio.gather(to_thread(_custom_ids, [cfg.input_path]), to_thread(_custom_ids, outputs))
    if wanted is None or have is None or not np.array_equal(wanted, have):
        where = f"{out}" + (f" (with {err})" if len(outputs) > 1 else "")
        raise RunError(
            f"{where} already exists and does not hold the results of {cfg.input_path}; "
            f"remove it or choose another -o (an unfinished run keeps its state in {cfg.state()}; a finished "
            "one written with --errors FILE is recognised with the same --errors)"
        )
    counts = [await to_thread(_count_lines, p) for p in outputs]
    total = sum(c[0] for c in counts)
    failed = sum(c[1] for c in counts)
    return RunResult(
        status="already_done", exit_code=0, total=total, completed=total - failed, failed=failed,
        output_path=out, errors_path=err,
        message=f"{out} already holds the results of {cfg.input_path} ({total} requests, {failed} failed); "
                "nothing to do (delete it to run again)",
    )


class _Ctx:
    """What a signal changes: before dispatch starts it cancels the run (nothing was
    sent); from then on it stops dispatch through ``stop`` and the checkpoint is stored."""

    def __init__(self, report: Reporter) -> None:
        self.report = report
        self.started = time.monotonic()
        self.stop = StopSignal()
        #: "signal": the signal number; "engine_failed": why the engine is unusable.
        self.why: dict[str, Any] = {}
        self.cancellable = True
        self.task = asyncio.current_task()
        #: Set once the state holds a run that can be continued.
        self.resumable: Path | None = None

    def on_signal(self, signum: int) -> None:
        if "signal" in self.why:
            self.report.message("stopping already; the checkpoint is being stored")
            return
        self.why["signal"] = signum
        self.stop.set(Outcome.SHUTDOWN)
        if self.cancellable and self.task is not None:
            self.task.cancel()


def _signal_name(sig: int | None) -> str:
    return "Ctrl-C" if sig == signal.SIGINT else "SIGTERM" if sig == signal.SIGTERM else "a stop"


async def run_file(cfg: RunConfig, *, report: Reporter | None = None) -> RunResult:
    """Run ``cfg.input_path`` to ``cfg.output_path``; see the module docstring.
    Refusals and failures come back as a ``RunResult`` with their exit code."""
    report = report or _Silent()
    ctx = _Ctx(report)
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    if cfg.handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, ctx.on_signal, sig)
                installed.append(sig)
    try:
        return await _run(cfg, report, ctx)
    except RunError as exc:
        return RunResult(status="failed", exit_code=exc.exit_code, message=exc.message,
                         output_path=cfg.output_path, errors_path=cfg.errors_path)
    except asyncio.CancelledError:
        sig = ctx.why.get("signal")
        if sig is None or ctx.task is None:
            raise
        ctx.task.uncancel()
        after = (f"progress is saved in {ctx.resumable}; run the same command again to continue"
                 if ctx.resumable else "nothing was sent")
        return RunResult(status="stopped", exit_code=EXIT_SIGINT if sig == signal.SIGINT else EXIT_SIGTERM,
                         output_path=cfg.output_path, errors_path=cfg.errors_path,
                         message=f"stopped by {_signal_name(sig)} before dispatch began; {after}")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _run(cfg: RunConfig, report: Reporter, ctx: _Ctx) -> RunResult:
    if (cfg.engine_url is None) == (cfg.template is None):
        raise RunError("give exactly one of --engine-url URL and --template NAME")
    if cfg.concurrency is not None and cfg.max_concurrency is not None:
        raise RunError("give --concurrency N (fixed) or --max-concurrency N (adaptive up to N), not both")
    for name, n in (("--concurrency", cfg.concurrency), ("--max-concurrency", cfg.max_concurrency)):
        if n is not None and n < 1:
            raise RunError(f"{name} must be at least 1, got {n}")
    if not cfg.input_path.is_file():
        raise RunError(f"input file {cfg.input_path} does not exist")
    if cfg.errors_path is not None and cfg.errors_path.resolve() == cfg.output_path.resolve():
        raise RunError("--errors must differ from -o (leave --errors out to put failed requests in the output)")
    if cfg.output_path.resolve() == cfg.input_path.resolve():
        raise RunError("-o must differ from the input file")
    state = _State(cfg.state())
    existed = state.root.exists()
    if not existed and cfg.output_path.exists():
        return await _finished_check(cfg)
    lock = _Lock(state.lock)
    lock.acquire()
    try:
        manifest = state.read_manifest()
        if manifest is not None and manifest.get("status") == "done":
            return RunResult(status="already_done", exit_code=0, total=manifest["total"],
                             completed=manifest.get("completed", 0), failed=manifest.get("failed", 0),
                             output_path=cfg.output_path, errors_path=cfg.errors_path,
                             message=f"this run finished already (state kept in {state.root}); nothing to do")
        engine = _Engine(cfg, state, owner="", report=report)
        if manifest is None:
            # Nothing of a run exists yet: whatever stops it here leaves nothing behind.
            try:
                if cfg.template is not None:
                    engine.resolve_template()
                    engine.check_runtime()
                result = await _prepare(cfg, state, engine)
            except BaseException:
                _discard(state, lock, existed)
                raise
            if isinstance(result, RunResult):
                _discard(state, lock, existed)
                return result
            manifest = result
        else:
            if cfg.template is not None:
                engine.resolve_template()
                engine.check_runtime()
            await _check_same_input(cfg, state, manifest)
            engine.check_lines(manifest["endpoint"], manifest.get("model"))
        engine.owner = manifest["batch_id"]
        ctx.resumable = state.root
        return await _execute(cfg, state, manifest, engine, report, ctx)
    finally:
        lock.release()


def _discard(state: _State, lock: _Lock, existed: bool) -> None:
    with contextlib.suppress(OSError):
        state.clear()
        if not existed:
            lock.release()
            state.remove()


async def _check_same_input(cfg: RunConfig, state: _State, m: dict[str, Any]) -> None:
    inp = m["input"]
    st = cfg.input_path.stat()
    same = st.st_size == inp["size"]
    if same and st.st_mtime_ns != inp["mtime_ns"]:
        same = await to_thread(_hash_file, cfg.input_path) == inp["sha256"]
    if not same:
        raise RunError(
            f"{state.root} holds an unfinished run of {inp['path']} ({inp['size']} bytes, sha256 "
            f"{inp['sha256'][:16]}...), and {cfg.input_path} is a different file; run the same input again to "
            f"continue it, or remove {state.root} (or choose another -o) to start over"
        )
    if cfg.endpoint is not None and cfg.endpoint != m["endpoint"]:
        raise RunError(f"{state.root} holds a run for endpoint {m['endpoint']}, not {cfg.endpoint}; "
                       f"remove {state.root} to start over")


async def _prepare(cfg: RunConfig, state: _State, engine: _Engine) -> dict[str, Any] | RunResult:
    """Validate the input (nothing is written if it is wrong), copy it, write the manifest."""
    src = cfg.input_path.resolve()
    endpoint = cfg.endpoint or await to_thread(_first_url, src) or "/v1/chat/completions"
    unlimited = ValidationLimits(max_requests=1 << 62, max_bytes=1 << 62)
    result = await validate_input(LocalStorage(f"file://{src.parent}"), src.name, endpoint=endpoint, limits=unlimited)
    if not result.ok:
        shown = result.errors[:20]
        more = f"\n  ... {len(result.errors) - len(shown)} more" if len(result.errors) > len(shown) else ""
        return RunResult(
            status="invalid", exit_code=2, total=result.total, errors=result.errors,
            message=f"{cfg.input_path} is not a valid batch input for {endpoint}; nothing was sent:\n"
                    f"{_format_errors(shown)}{more}",
        )
    engine.check_lines(endpoint, result.model)
    state.root.mkdir(parents=True, exist_ok=True)
    state.clear()  # leftovers of a start that never wrote its manifest
    st = src.stat()
    size, digest = await to_thread(_copy_and_hash, src, state.files / INPUT_KEY)
    m = {
        "v": MANIFEST_VERSION,
        "status": "running",
        "batch_id": new_id("batch"),
        "input": {"path": str(src), "size": size, "mtime_ns": st.st_mtime_ns, "sha256": digest},
        "endpoint": endpoint,
        "model": result.model,
        "total": result.total,
        "output": str(cfg.output_path.resolve()),
        "errors": str(cfg.errors_path.resolve()) if cfg.errors_path else None,
        "attempt": 0,
        "created_at": int(time.time()),
    }
    await to_thread(state.write_manifest, m)
    return m


class _Rate:
    """Requests per second over a sliding window."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> float:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        return (done - d0) / (now - t0) if now > t0 else 0.0


async def _execute(
    cfg: RunConfig, state: _State, m: dict[str, Any], engine: _Engine, report: Reporter, ctx: _Ctx,
) -> RunResult:
    m["attempt"] = int(m.get("attempt", 0)) + 1
    m["output"] = str(cfg.output_path.resolve())
    m["errors"] = str(cfg.errors_path.resolve()) if cfg.errors_path else None
    await to_thread(state.write_manifest, m)
    storage = LocalStorage(f"file://{state.files}")
    await storage.open()
    try:
        raw = await to_thread(state.checkpoint.read_bytes)
        cp = Checkpoint.decode(raw)
    except FileNotFoundError:
        cp = Checkpoint.empty(m["total"])
    batch_id = m["batch_id"]
    spool = Spool(spool_dir=state.spool, storage=storage, batch_id=batch_id, token=m["attempt"], checkpoint=cp)
    spool.open()
    stop, why = ctx.stop, ctx.why
    started = ctx.started  # the whole command: validation, copy, engine start, dispatch, output
    done_before = 0
    try:
        recovered = await spool.recover()
        done_before = cp.done.count
        if recovered:
            report.message(f"recovered {recovered} finished requests from the spool")
        if cp.done.count:
            report.message(f"continuing: {cp.done.count} of {cp.total} requests were finished before")
        # From here a signal stops dispatch instead of cancelling: the checkpoint is stored.
        ctx.cancellable = False
        outcome = Outcome.DONE
        if cp.done.missing():
            outcome = await _dispatch(cfg, state, m, engine, report, storage, spool, stop, why)
        else:
            # Nothing left to send: seal what recovery wrote, for the checkpoint.
            await _persist_sealed(state, spool)
        if outcome is not Outcome.DONE:
            return _stopped(cfg, state, cp, why, started, done_before)
        return await _finish(cfg, state, m, storage, spool, started, done_before)
    except RunError as exc:
        with contextlib.suppress(Exception):
            await _persist_sealed(state, spool)
        raise RunError(exc.message + f"\nprogress is saved in {state.root}; run the same command again to continue",
                       exc.exit_code) from None
    finally:
        spool.close()
        await storage.aclose()


async def _persist_sealed(state: _State, spool: Spool) -> None:
    sealed = await spool.seal()
    await to_thread(write_atomic, state.checkpoint, sealed.checkpoint)
    spool.discard(sealed.sealed_paths)


async def _dispatch(
    cfg: RunConfig, state: _State, m: dict[str, Any], engine: _Engine, report: Reporter,
    storage: LocalStorage, spool: Spool, stop: StopSignal, why: dict[str, Any],
) -> Outcome:
    cp = spool.cp
    try:
        # A signal while the engine starts (a large model takes minutes) stops at once.
        starting = asyncio.create_task(engine.start())
        stopped = asyncio.create_task(stop.event.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return Outcome.SHUTDOWN
        starting.result()
        limits, cap, floor = _limits(cfg)
        capacity = EngineCapacity(limits)
        share = capacity.join(name=m["batch_id"], cap=cap, remaining=cp.done.missing(), floor=floor)
        client = engine.client
        probe = None
        get = getattr(client, "get", None)
        if get is not None:  # the engine's own queue, when it publishes one, steers the limit
            probe = MetricsProbe(get, capacity.limit, active=lambda: bool(capacity.shares),
                                 inflight=lambda: capacity.inflight, interval_s=defaults.METRICS_POLL_S,
                                 sink=capacity.on_metrics)
            probe.start()

        async def persist(encoded: bytes) -> None:
            await to_thread(write_atomic, state.checkpoint, encoded)

        params = ExecuteParams(
            endpoint=m["endpoint"], input_key=INPUT_KEY, batch_suffix=m["batch_id"].split("_", 1)[1],
            deadline=time.time() + _FAR_FUTURE_S, checkpoint_interval_s=cfg.settings.checkpoint_interval_s,
            persist=persist,
        )
        policy = retry_policy(cfg.settings)
        watch = asyncio.create_task(_watch(cfg, engine, stop, why))
        ticker = asyncio.create_task(_progress(report, spool, share))
        report.start(cp.total, cp.done.count)
        dispatch_started, done_at_start = time.monotonic(), cp.completed + cp.failed
        try:
            outcome = await execute(storage=storage, spool=spool, engine=client, limiter=share, policy=policy,
                                    params=params, stop=stop)
        finally:
            for t in (watch, ticker):
                t.cancel()
            await asyncio.gather(watch, ticker, return_exceptions=True)
            elapsed = time.monotonic() - dispatch_started
            finished = cp.completed + cp.failed - done_at_start
            report.update(_snapshot(spool, share, finished / elapsed if elapsed > 0 else 0.0))
            report.stop()
            if probe is not None:
                await probe.stop()
            share.close()
        if "engine_failed" in why:
            raise RunError(why["engine_failed"], 1)
        return outcome
    except RunError as exc:
        raise RunError(exc.message + (engine.log_hint() if "last lines" not in exc.message else ""),
                       exc.exit_code) from None
    finally:
        await asyncio.shield(engine.close())


def _snapshot(spool: Spool, share: BatchShare, rate: float) -> Progress:
    cp = spool.cp
    return Progress(done=cp.completed + cp.failed, total=cp.total, failed=cp.failed, rate=rate,
                    concurrency=int(share.capacity.limit.value), inflight=share.inflight)


async def _progress(report: Reporter, spool: Spool, share: BatchShare) -> None:
    rate = _Rate()
    while True:
        cp = spool.cp
        r = rate.add(time.monotonic(), cp.completed + cp.failed)
        report.update(_snapshot(spool, share, r))
        await asyncio.sleep(0.25)


async def _watch(cfg: RunConfig, engine: _Engine, stop: StopSignal, why: dict[str, Any]) -> None:
    """Stop (resumably) when the template's engine dies or the engine stays unreachable."""
    limit = cfg.settings.engine_unreachable_timeout_s
    while True:
        await asyncio.sleep(0.5)
        dead = await engine.dead()
        if dead is not None:
            why["engine_failed"] = dead
            stop.set(Outcome.SHUTDOWN)
            return
        h = engine.health
        if h is not None and h.unreachable_for() >= limit:
            why["engine_failed"] = (
                f"the engine {h.url} was unreachable for {h.unreachable_for():.0f} s without a break "
                f"(OVERNIGHT_ENGINE_UNREACHABLE_TIMEOUT_S={limit:g}); the last error: {h.last_error}"
            )
            stop.set(Outcome.SHUTDOWN)
            return


def _stopped(cfg: RunConfig, state: _State, cp: Checkpoint, why: dict[str, Any], started: float,
             done_before: int) -> RunResult:
    sig = why.get("signal")
    name = _signal_name(sig)
    done = cp.completed + cp.failed
    return RunResult(
        status="stopped", exit_code=EXIT_SIGINT if sig == signal.SIGINT else EXIT_SIGTERM,
        total=cp.total, completed=cp.completed, failed=cp.failed, finished_now=done - done_before,
        seconds=time.monotonic() - started, output_path=cfg.output_path, errors_path=cfg.errors_path,
        message=f"stopped by {name} at {done}/{cp.total} requests; progress is saved in {state.root}; "
                "run the same command again to continue",
    )


async def _finish(cfg: RunConfig, state: _State, m: dict[str, Any], storage: LocalStorage, spool: Spool,
                  started: float, done_before: int) -> RunResult:
    cp = spool.cp
    assembled = await spool.assemble(out_key=OUT_KEY, err_key=ERR_KEY)
    out_file, err_file = storage.path(OUT_KEY), storage.path(ERR_KEY)

    def publish() -> None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.touch()
        if cfg.errors_path is None:
            if assembled.err_lines:
                _append(out_file, err_file)
        else:
            err_file.touch()
            _publish(err_file, cfg.errors_path)
        # The output last: once it exists, the run is complete.
        _publish(out_file, cfg.output_path)

    await to_thread(publish)
    m.update(status="done", completed=cp.completed, failed=cp.failed)
    await to_thread(state.write_manifest, m)
    if cfg.keep_state:
        spool.close()
    else:
        await spool.cleanup()
        await to_thread(state.remove)
    seconds = time.monotonic() - started
    now = cp.completed + cp.failed - done_before
    rate = now / seconds if seconds > 0 else 0.0
    where = f"output {cfg.output_path}" + (f", errors {cfg.errors_path}" if cfg.errors_path else "")
    return RunResult(
        status="completed", exit_code=0, total=cp.total, completed=cp.completed, failed=cp.failed,
        finished_now=now, seconds=seconds, output_path=cfg.output_path, errors_path=cfg.errors_path,
        message=f"done: {cp.completed} completed, {cp.failed} failed in {seconds:.2f} s ({rate:.1f} req/s); {where}",
    )


def reporter_for(stream: Any = None, *, plain_every_s: float = 5.0) -> Reporter:
    """A progress bar when ``stream`` (stderr) is a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if stream.isatty():
        with contextlib.suppress(ImportError):
            return RichReporter()
    return PlainReporter(every_s=plain_every_s, stream=stream)

