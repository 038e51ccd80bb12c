"""``overnight batch`` and ``overnight files``: a client of a running ``overnight serve``.

Files and batches go through the official ``openai`` SDK (what a user's own code
would use, so the CLI exercises the same wire format); every JSON document printed
is the server's own response body, read raw, so ``--json`` shows exactly what the
server said, ``overnight`` extension included.

Exit codes: 0 done (a batch waited for completed), 1 a batch failed / expired /
was cancelled or the server failed (5xx), 2 a usage error (bad flags, a missing
file, a 4xx from the server, printed with its message), 3 the server cannot be
reached. 130 after Ctrl-C outside a watch.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer

if TYPE_CHECKING:
    from openai import OpenAI
    from rich.console import Console

__all__ = ["batch_app", "deferred_sigint", "files_app", "TERMINAL"]

batch_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None)
files_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
DEFAULT_SERVER = "http://127.0.0.1:8000"
#: A watch keeps polling a server that stops answering for this long, then exits 3.
UNREACHABLE_GRACE_S = 30.0
#: Requests/s and tokens/s are measured over the polls of this window.
RATE_WINDOW_S = 10.0

ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="OVERNIGHT_SERVER", show_envvar=True,
                 help="The overnight server (http://host:port; a trailing /v1 is fine)."),
]
ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option("--api-key", envvar="OVERNIGHT_API_KEY", show_envvar=True,
                 help="API key sent as a Bearer token (any key works on a server in open mode).",
                 show_default="none"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout; no progress, no colour.")]
IntervalOpt = Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between polls of the batch.")]


# -- plumbing ---------------------------------------------------------------------------


class CliExit(Exception):
    """Leave with ``code`` after printing ``message`` (and, with --json, an error document)."""

    def __init__(self, code: int, message: str, *, kind: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.kind, self.status_code = code, message, kind, status_code


@dataclass
class Ctx:
    """One command's connection and output settings."""

    server: str
    api_key: str | None
    json: bool
    _client: OpenAI | None = field(default=None, repr=False)
    _out: Console | None = field(default=None, repr=False)
    _err: Console | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        url = self.server.strip().rstrip("/")
        if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
            raise CliExit(2, f"--server must be an http:// or https:// URL, not {self.server!r}", kind="usage")
        return url if url.endswith("/v1") else url + "/v1"

    def client(self) -> OpenAI:
        if self._client is None:
            try:
                from openai import OpenAI
            except ImportError:
                raise CliExit(2, "overnight batch/files need the openai SDK: pip install 'overnight[client]'",
                              kind="usage") from None
            # Open mode accepts any key, and the SDK insists on one.
            self._client = OpenAI(base_url=self.base_url, api_key=self.api_key or "overnight", timeout=60.0,
                                  max_retries=2)
        return self._client

    def fresh_client(self) -> OpenAI:
        """A new connection pool (after Ctrl-C interrupted a request mid-flight)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        return self.client()

    @property
    def out(self) -> Console:
        """stdout for human output (tables, summaries)."""
        if self._out is None:
            from rich.console import Console

            self._out = Console(highlight=False, soft_wrap=False)
            if not self._out.is_terminal:
                self._out.width = max(self._out.width, 160)
        return self._out

    @property
    def err(self) -> Console:
        """stderr: progress, the live view, messages."""
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False, no_color=self.json or None)
            if not self._err.is_terminal:
                self._err.width = max(self._err.width, 160)
        return self._err

    def emit(self, doc: Any) -> None:
        """The one JSON document of a --json command."""
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()


@contextmanager
def _handled(ctx: Ctx) -> Iterator[None]:
    """Map what can go wrong to one line on stderr (and a JSON error document with
    --json) and the exit code the module docstring promises."""
    try:
        import openai

        connection_error: Any = openai.APIConnectionError
        status_error: Any = openai.APIStatusError
    except ImportError:  # ctx.client() says which extra to install
        connection_error = status_error = ()
    try:
        yield
    except CliExit as exc:
        _fail(ctx, exc)
    except connection_error as exc:
        _fail(ctx, _unreachable(ctx, exc))
    except status_error as exc:
        _fail(ctx, _status_error(exc))
    except KeyboardInterrupt:
        _fail(ctx, CliExit(130, "interrupted", kind="interrupted"))


def _unreachable(ctx: Ctx, exc: Exception) -> CliExit:
    cause = exc.__cause__ or exc.__context__
    why = "timed out" if "Timeout" in type(exc).__name__ or "Timeout" in type(cause).__name__ else (
        str(cause) if cause is not None and str(cause) else "connection failed")
    return CliExit(3, f"cannot reach the overnight server at {ctx.server}: {why}", kind="unreachable")


def _status_error(exc: Any) -> CliExit:
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message") or str(exc)
    status = int(exc.status_code)
    return CliExit(2 if status < 500 else 1, f"server said {status}: {message}",
                   kind="client_error" if status < 500 else "server_error", status_code=status)


def _fail(ctx: Ctx, exc: CliExit) -> NoReturn:
    if ctx.json:
        err: dict[str, Any] = {"type": exc.kind, "message": exc.message, "exit_code": exc.code}
        if exc.status_code is not None:
            err["status_code"] = exc.status_code
        ctx.emit({"error": err})
    typer.echo(f"overnight: {exc.message}", err=True)
    raise typer.Exit(exc.code)


def _raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call an SDK method through ``with_raw_response`` and return the server's JSON body."""
    response = call(*args, **kwargs)
    return json.loads(response.text)


def _ts(epoch: int | float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def _size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# -- transfers --------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """A file the SDK streams as the multipart body; ``on_read`` learns how far it got
    (a retry seeks back to 0, and so does the count)."""

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        self._f = path.open("rb")
        self._on_read = on_read
        self.name = str(path)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._on_read(self._f.tell())
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self._f.seek(offset, whence)
        self._on_read(pos)
        return pos

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


@contextmanager
def _bytes_bar(ctx: Ctx, label: str, total: int | None, *, transient: bool = False) -> Iterator[Callable[[int], None]]:
    """A progress bar in bytes on a terminal (nothing with --json or without one);
    yields a function that sets how many bytes are done."""
    if ctx.json or not ctx.err.is_terminal:
        yield lambda _done: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=ctx.err, transient=transient) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


def _upload(ctx: Ctx, path: Path, purpose: str) -> dict[str, Any]:
    size = path.stat().st_size
    with _bytes_bar(ctx, f"uploading {path.name}", size) as progress:
        reader = _CountingReader(path, progress)
        try:
            return _raw(ctx.client().files.with_raw_response.create,
                        file=(path.name, reader, "application/jsonl"), purpose=purpose)
        finally:
            reader.close()


def _download(ctx: Ctx, file_id: str, dest: Path, *, size: int | None = None) -> int:
    """Stream a file's content to ``dest`` (written beside it, then renamed: a partial
    download never has the final name). Returns the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, \
                ctx.client().files.with_streaming_response.content(file_id) as response, \
                _bytes_bar(ctx, f"downloading {dest.name}", size, transient=True) as progress:
            for chunk in response.iter_bytes(1 << 16):
                out.write(chunk)
                written += len(chunk)
                progress(written)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written


def _batch_files(ctx: Ctx, batch: dict[str, Any], directory: Path, stem: str | None) -> dict[str, str]:
    """Download a batch's output and error files as ``<stem>.<batch id>.output.jsonl``
    and ``.errors.jsonl`` into ``directory``; returns kind -> path of what existed."""
    prefix = f"{stem}.{batch['id']}" if stem else batch["id"]
    done: dict[str, str] = {}
    for kind, key, suffix in (("output", "output_file_id", "output"), ("errors", "error_file_id", "errors")):
        file_id = batch.get(key)
        if not file_id:
            continue
        meta = _raw(ctx.client().files.with_raw_response.retrieve, file_id)
        dest = directory / f"{prefix}.{suffix}.jsonl"
        _download(ctx, file_id, dest, size=meta.get("bytes"))
        done[kind] = str(dest)
    return done


# -- the live view ----------------------------------------------------------------------


@dataclass
class Snapshot:
    """What the views show of one poll."""

    batch: dict[str, Any]
    done: int
    failed: int
    total: int
    rate: float | None
    tokens_rate: float | None
    tokens_kind: str
    eta_s: float | None
    note: str = ""

    @property
    def status(self) -> str:
        return str(self.batch.get("status"))

    def concurrency(self) -> str:
        c = (self.batch.get("overnight") or {}).get("concurrency") or {}
        if not c:
            return ""
        if c.get("inflight") is None:
            return f"concurrency limit {c.get('limit')}"
        return f"{c['inflight']} in flight (limit {c.get('limit')})"

    def describe(self) -> str:
        """One line: done / failed / total, rates, concurrency, ETA."""
        parts = [f"{self.done}/{self.total} done" if self.total else "0/? done", f"{self.failed} failed"]
        if self.rate is not None:
            parts.append(f"{self.rate:.1f} req/s")
        if self.tokens_rate is not None:
            parts.append(f"{self.tokens_rate:,.0f} {'input ' if self.tokens_kind == 'in' else ''}tok/s")
        conc = self.concurrency()
        if conc:
            parts.append(conc)
        if self.eta_s is not None and self.status == "in_progress":
            parts.append(f"ETA {_duration(self.eta_s)}")
        engine = (self.batch.get("overnight") or {}).get("engine") or {}
        if engine.get("state") not in (None, "reachable"):
            parts.append(f"engine {engine['state']}")
        if self.note:
            parts.append(self.note)
        return " · ".join(parts)


class Rates:
    """Requests/s and tokens/s from successive polls over the last ``window_s``."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int, int, int]] = deque()

    def add(self, batch: dict[str, Any], now: float | None = None) -> Snapshot:
        now = time.monotonic() if now is None else now
        counts = batch.get("request_counts") or {}
        usage = batch.get("usage") or {}
        done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        total = int(counts.get("total") or 0)
        out_tokens, in_tokens = int(usage.get("output_tokens") or 0), int(usage.get("input_tokens") or 0)
        self._samples.append((now, done, out_tokens, in_tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        rate = tokens_rate = eta = None
        kind = "out"
        first = self._samples[0]
        dt = now - first[0]
        if batch.get("status") == "in_progress" and len(self._samples) >= 2 and dt > 0:
            rate = (done - first[1]) / dt
            # Embeddings generate nothing: their throughput is the input read.
            if out_tokens or not in_tokens:
                tokens_rate = (out_tokens - first[2]) / dt
            else:
                tokens_rate, kind = (in_tokens - first[3]) / dt, "in"
            if rate > 0 and total:
                eta = max(0.0, (total - done) / rate)
        return Snapshot(batch=batch, done=done, failed=int(counts.get("failed") or 0), total=total, rate=rate,
                        tokens_rate=tokens_rate, tokens_kind=kind, eta_s=eta)


class View:
    """Silent (for --json)."""

    def start(self, snap: Snapshot) -> None: ...
    def update(self, snap: Snapshot) -> None: ...
    def pause(self) -> None: ...
    def stop(self) -> None: ...


class PlainView(View):
    """A line on stderr every ``every_s`` seconds and at each status change (logs, pipes)."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last = 0.0
        self._status = ""

    def _line(self, snap: Snapshot) -> None:
        print(f"{snap.batch['id']} {snap.status}: {snap.describe()}", file=sys.stderr, flush=True)

    def start(self, snap: Snapshot) -> None:
        self.update(snap)

    def update(self, snap: Snapshot) -> None:
        now = time.monotonic()
        if snap.status != self._status or now - self._last >= self.every_s:
            self._last, self._status = now, snap.status
            self._line(snap)


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block and raise it on leaving. Rich's
    live display starts and stops in steps (its stack of live displays, a refresh
    thread): interrupted between them it is left half started or stopped, and the
    next stop pops an empty stack (``IndexError``) instead of asking cancel or detach."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


class LiveView(View):
    """A rich progress line on the terminal, redrawn in place."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Any = None
        self._task: Any = None
        self._since = time.monotonic()  # the watch's, across a pause for the Ctrl-C question

    def _fields(self, snap: Snapshot) -> dict[str, Any]:
        return {"total": snap.total or None, "completed": snap.done, "status": snap.status,
                "info": snap.describe(), "elapsed": _duration(time.monotonic() - self._since)}

    def start(self, snap: Snapshot) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self._bar = Progress(
            # The id was printed above; the line keeps what changes (and fits 150 columns).
            TextColumn("{task.fields[status]}"), BarColumn(bar_width=24),
            TextColumn("{task.fields[info]}", markup=False), TextColumn("[yellow]{task.fields[elapsed]}[/]"),
            console=self.console, transient=False, refresh_per_second=4,
        )
        self._task = self._bar.add_task("batch", **self._fields(snap))
        with deferred_sigint():
            self._bar.start()

    def update(self, snap: Snapshot) -> None:
        if self._bar is None:
            self.start(snap)
            return
        self._bar.update(self._task, **self._fields(snap))

    def pause(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._bar is not None:
            with deferred_sigint():
                self._bar.stop()
                self._bar = None


def _view_for(ctx: Ctx) -> View:
    if ctx.json:
        return View()
    if ctx.err.is_terminal:
        return LiveView(ctx.err)
    return PlainView()


def _ask_cancel_or_detach(ctx: Ctx, what: str = "batch") -> str:
    """'c' or 'd' from the person at the terminal; a second Ctrl-C or EOF detaches
    (leaving the batch or job running is the choice that loses nothing)."""
    import click

    while True:
        ctx.err.print(f"cancel the {what} or detach? [c/d] ", end="", markup=False)
        try:
            answer = click.getchar(echo=True).strip().lower()
        except (KeyboardInterrupt, EOFError):
            ctx.err.print()
            return "d"
        ctx.err.print()
        if answer in ("c", "d"):
            return answer


@dataclass
class WatchResult:
    batch: dict[str, Any]
    detached: bool = False


def _watch(ctx: Ctx, batch: dict[str, Any], *, interval: float) -> WatchResult:
    """Poll ``batch`` to a terminal state, showing the live view. Ctrl-C asks to cancel
    or detach on a terminal and detaches without one; a cancel keeps watching."""
    rates = Rates()
    view = _view_for(ctx)
    interactive = sys.stdin.isatty()
    cancel_sent = False
    unreachable_since: float | None = None
    snap = rates.add(batch)
    view.start(snap)
    try:
        while batch.get("status") not in TERMINAL:
            try:
                time.sleep(interval)
                try:
                    batch = _raw(ctx.client().batches.with_raw_response.retrieve, batch["id"])
                    unreachable_since = None
                    snap = rates.add(batch)
                except Exception as exc:
                    import openai

                    if not isinstance(exc, openai.APIConnectionError):
                        raise
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since >= UNREACHABLE_GRACE_S:
                        raise
                    snap.note = f"server unreachable for {now - unreachable_since:.0f} s, retrying"
                if cancel_sent and not snap.note and batch.get("status") not in TERMINAL:
                    snap.note = "cancel requested"
                view.update(snap)
            except KeyboardInterrupt:
                view.pause()
                ctx.fresh_client()  # the interrupted request may have left its connection half-used
                choice = _ask_cancel_or_detach(ctx) if interactive and not cancel_sent else "d"
                if choice == "d":
                    ctx.err.print(f"detached; {batch['id']} keeps running "
                                  f"(overnight batch watch {batch['id']})", markup=False)
                    return WatchResult(batch, detached=True)
                ctx.err.print(f"cancelling {batch['id']} ...", markup=False)
                try:
                    # No retries: a 409 says it is terminal already, asking again changes nothing.
                    batch = _raw(ctx.client().with_options(max_retries=0).batches.with_raw_response.cancel,
                                 batch["id"])
                except Exception as exc:
                    import openai

                    # 409: it ended meanwhile; the next poll shows how.
                    if not (isinstance(exc, openai.APIStatusError) and exc.status_code == 409):
                        raise
                cancel_sent = True
                snap = rates.add(batch)
                view.start(snap)
    finally:
        view.stop()
    return WatchResult(batch)


def _summary(ctx: Ctx, batch: dict[str, Any], files: dict[str, str] | None = None, *,
             seconds: float | None = None) -> None:
    """The final lines a person reads after a watch. ``seconds``: how long the batch
    took as this process saw it from its creation (the server's timestamps are whole
    seconds, too coarse for a short batch's rate)."""
    counts = batch.get("request_counts") or {}
    usage = batch.get("usage") or {}
    status = batch.get("status")
    colour = {"completed": "green", "failed": "red", "expired": "yellow", "cancelled": "yellow"}.get(str(status), "")
    ended = next((batch.get(k) for k in ("completed_at", "failed_at", "expired_at", "cancelled_at") if batch.get(k)),
                 None)
    took = ""
    if seconds is None and ended and batch.get("created_at"):
        seconds = max(1, int(ended) - int(batch["created_at"]))
    if seconds:
        took = f" in {seconds:.1f} s" if seconds < 60 else f" in {_duration(seconds)}"
        if status == "completed":
            done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
            took += f" ({done / seconds:.1f} req/s)"
    head = (f"{batch['id']} [{colour}]{status}[/]" if colour else f"{batch['id']} {status}") + (
        f": {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed of {counts.get('total', 0)}"
        f"{took}; tokens {usage.get('input_tokens', 0):,} in / {usage.get('output_tokens', 0):,} out")
    ctx.out.print(head)
    for err in ((batch.get("errors") or {}).get("data") or [])[:10]:
        where = f" (line {err['line']})" if err.get("line") else ""
        ctx.out.print(f"  error{where}: {err.get('code') or ''} {err.get('message') or ''}".rstrip(), markup=False)
    for kind, path in (files or {}).items():
        ctx.out.print(f"  {kind:<7} {path}", markup=False)


def _exit_for(batch: dict[str, Any]) -> int:
    return 0 if batch.get("status") == "completed" else 1


# -- batch ------------------------------------------------------------------------------


def _first_url(path: Path) -> str | None:
    """The ``url`` of the input's first request line (the endpoint when none is given)."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    line = json.loads(raw)
                except ValueError:
                    return None
                url = line.get("url") if isinstance(line, dict) else None
                return url if isinstance(url, str) else None
    return None


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliExit(2, f"--metadata: expected KEY=VALUE, not {pair!r}", kind="usage")
        out[key] = value
    return out


@batch_app.command("create")
def batch_create(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", exists=True, dir_okay=False, readable=True,
                                               help="The batch input: one OpenAI batch request per line.")],
    endpoint: Annotated[Optional[str], typer.Option(
        "--endpoint", help="/v1/chat/completions, /v1/completions, /v1/embeddings or /v1/responses.",
        show_default="the url of the input's first line")] = None,
    window: Annotated[str, typer.Option("--window", help="Completion window: 24h, or any duration (90s, 10m, 2h, 3d).")]
    = "24h",
    metadata: Annotated[Optional[list[str]], typer.Option("--metadata", metavar="KEY=VALUE",
                                                         help="Metadata on the batch (repeatable).", show_default="none")] = None,
    template: Annotated[Optional[str], typer.Option(
        "--template", help="Run on this model deployment template's engine (the server's templates).",
        show_default="none: the server's default engine")] = None,
    max_concurrency: Annotated[Optional[int], typer.Option(
        "--max-concurrency", min=1, help="Most requests in flight for this batch.", show_default="the server's")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Watch it live to the end, then download its output and error "
                                                      "files next to INPUT.")] = False,
    interval: IntervalOpt = 1.0,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload INPUT and create a batch from it; --wait watches it to the end and downloads
    <input stem>.<batch id>.output.jsonl / .errors.jsonl next to INPUT.
    Ctrl-C while waiting: cancel the batch or detach (without a terminal: detach)."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        meta = _metadata(metadata or [])
        if endpoint is None:
            endpoint = _first_url(input_path)
            if endpoint is None:
                raise CliExit(2, f"{input_path}: no endpoint: give --endpoint (the first line names no url)",
                              kind="usage")
        extension: dict[str, Any] = {}
        if template:
            extension["model_template"] = {"name": template}
        if max_concurrency:
            extension["max_concurrency"] = max_concurrency
        uploaded = _upload(ctx, input_path, "batch")
        kwargs: dict[str, Any] = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": window}
        if meta:
            kwargs["metadata"] = meta
        if extension:
            kwargs["extra_body"] = {"overnight": extension}
        batch = _raw(ctx.client().batches.with_raw_response.create, **kwargs)
        if not wait:
            if as_json:
                ctx.emit(batch)
            else:
                ctx.out.print(f"created {batch['id']} ({batch['status']}) from {uploaded['id']}; "
                              f"watch it: overnight batch watch {batch['id']}", markup=False)
            return
        if not as_json:
            ctx.err.print(f"created {batch['id']} from {uploaded['id']} ({input_path.name}, "
                          f"{_size(uploaded.get('bytes') or 0)})", markup=False)
        created = time.monotonic()
        result = _watch(ctx, batch, interval=interval)
        took = time.monotonic() - created
        batch = result.batch
        if result.detached:
            if as_json:
                ctx.emit(batch)
            return
        files = _batch_files(ctx, batch, input_path.parent, input_path.stem)
        if as_json:
            ctx.emit(batch)
        else:
            _summary(ctx, batch, files, seconds=took)
    raise typer.Exit(_exit_for(batch))


@batch_app.command("watch")
def batch_watch(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    interval: IntervalOpt = 1.0,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Watch a batch live to its end (exit 0 completed, 1 failed / expired / cancelled).
    Ctrl-C: cancel it or detach."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        batch = _raw(ctx.client().batches.with_raw_response.retrieve, batch_id)
        result = _watch(ctx, batch, interval=interval)
        batch = result.batch
        if as_json:
            ctx.emit(batch)
        elif not result.detached:
            _summary(ctx, batch)
    if not result.detached:
        raise typer.Exit(_exit_for(batch))


@batch_app.command("list")
def batch_list(
    limit: Annotated[int, typer.Option("--limit", min=1, max=100, help="How many, newest first.")] = 20,
    after: Annotated[Optional[str], typer.Option("--after", help="Start after this batch id (paging).",
                                                 show_default="none")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List batches, newest first."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        kwargs: dict[str, Any] = {"limit": limit}
        if after:
            kwargs["after"] = after
        page = _raw(ctx.client().batches.with_raw_response.list, **kwargs)
        if as_json:
            ctx.emit(page)
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in ("ID", "STATUS", "ENDPOINT", "DONE", "FAILED", "CREATED"):
            table.add_column(name, no_wrap=True)
        for b in page.get("data") or []:
            c = b.get("request_counts") or {}
            done = int(c.get("completed") or 0) + int(c.get("failed") or 0)
            table.add_row(b["id"], str(b.get("status")), str(b.get("endpoint")), f"{done}/{c.get('total', 0)}",
                          str(c.get("failed", 0)), _ts(b.get("created_at")))
        ctx.out.print(table)
        if page.get("has_more"):
            ctx.out.print(f"more: overnight batch list --after {page.get('last_id')}", markup=False)


def _batch_table(ctx: Ctx, b: dict[str, Any]) -> None:
    from rich.table import Table

    c = b.get("request_counts") or {}
    u = b.get("usage") or {}
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("id", b.get("id")), ("status", b.get("status")), ("endpoint", b.get("endpoint")), ("model", b.get("model")),
        ("window", b.get("completion_window")),
        ("requests", f"{c.get('completed', 0)} completed, {c.get('failed', 0)} failed of {c.get('total', 0)}"),
        ("tokens", f"{u.get('input_tokens', 0):,} in / {u.get('output_tokens', 0):,} out"),
        ("input", b.get("input_file_id")), ("output", b.get("output_file_id")), ("errors", b.get("error_file_id")),
    ]
    rows += [(k.removesuffix("_at"), _ts(b[k])) for k in (
        "created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at", "cancelled_at",
        "expired_at", "expires_at") if b.get(k)]
    if b.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in b["metadata"].items())))
    ext = b.get("overnight") or {}
    snap = Rates().add(b)
    if snap.concurrency():
        rows.append(("engine", snap.concurrency()))
    if (ext.get("engine") or {}).get("state"):
        rows.append(("engine state", ext["engine"]["state"]))
    tpl = ext.get("model_template") or {}
    if tpl:
        profile = f", profile {tpl['profile']}" if tpl.get("profile") else ""
        rows.append(("template", f"{tpl.get('template')} version {tpl.get('version')}{profile}"))
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    ctx.out.print(table)
    for err in ((b.get("errors") or {}).get("data") or [])[:10]:
        where = f" (line {err['line']})" if err.get("line") else ""
        ctx.out.print(f"error{where}: {err.get('code') or ''} {err.get('message') or ''}".rstrip(), markup=False)


@batch_app.command("get")
def batch_get(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one batch: status, counts, usage, files, overnight's view of its engine."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        batch = _raw(ctx.client().batches.with_raw_response.retrieve, batch_id)
        if as_json:
            ctx.emit(batch)
        else:
            _batch_table(ctx, batch)


@batch_app.command("cancel")
def batch_cancel(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a batch (it goes through cancelling to cancelled; `watch` follows it)."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        batch = _raw(ctx.client().with_options(max_retries=0).batches.with_raw_response.cancel, batch_id)
        if as_json:
            ctx.emit(batch)
        else:
            ctx.out.print(f"{batch['id']} {batch['status']}", markup=False)


@batch_app.command("download")
def batch_download(
    batch_id: Annotated[str, typer.Argument(metavar="ID")],
    output_dir: Annotated[Path, typer.Option("-o", "--output-dir", file_okay=False,
                                             help="Directory the files go to.")] = Path("."),
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a batch's output and error files as <input stem>.<batch id>.output.jsonl /
    .errors.jsonl (exit 1 when it has neither yet)."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        batch = _raw(ctx.client().batches.with_raw_response.retrieve, batch_id)
        if not batch.get("output_file_id") and not batch.get("error_file_id"):
            raise CliExit(1, f"{batch_id} has no output or error file (status {batch.get('status')})",
                          kind="no_files")
        stem = None
        try:
            stem = Path(_raw(ctx.client().files.with_raw_response.retrieve, batch["input_file_id"])["filename"]).stem
        except Exception as exc:
            import openai

            if not (isinstance(exc, openai.APIStatusError) and exc.status_code == 404):
                raise  # a deleted input file only loses the name's prefix
        files = _batch_files(ctx, batch, output_dir, stem or None)
        if as_json:
            ctx.emit({"batch_id": batch["id"], "status": batch.get("status"), "output": files.get("output"),
                      "errors": files.get("errors")})
        else:
            for kind, path in files.items():
                ctx.out.print(f"{kind:<7} {path}", markup=False)


# -- files ------------------------------------------------------------------------------


@files_app.command("list")
def files_list(
    purpose: Annotated[Optional[str], typer.Option("--purpose", help="Only files of this purpose (batch, "
                                                                     "batch_output, ...).", show_default="all")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="How many, newest first.")] = 20,
    after: Annotated[Optional[str], typer.Option("--after", help="Start after this file id (paging).",
                                                 show_default="none")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List files, newest first."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        kwargs: dict[str, Any] = {"limit": limit}
        if purpose:
            kwargs["purpose"] = purpose
        if after:
            kwargs["after"] = after
        page = _raw(ctx.client().files.with_raw_response.list, **kwargs)
        if as_json:
            ctx.emit(page)
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in ("ID", "FILENAME", "PURPOSE", "BYTES", "CREATED"):
            table.add_column(name, no_wrap=True, justify="right" if name == "BYTES" else "left")
        for f in page.get("data") or []:
            table.add_row(f["id"], str(f.get("filename")), str(f.get("purpose")), f"{f.get('bytes', 0):,}",
                          _ts(f.get("created_at")))
        ctx.out.print(table)
        if page.get("has_more"):
            ctx.out.print(f"more: overnight files list --after {page.get('last_id')}", markup=False)


@files_app.command("upload")
def files_upload(
    path: Annotated[Path, typer.Argument(metavar="PATH", exists=True, dir_okay=False, readable=True)],
    purpose: Annotated[str, typer.Option("--purpose", help="The file's purpose.")] = "batch",
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a file (a batch input is checked line by line as it arrives)."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        uploaded = _upload(ctx, path, purpose)
        if as_json:
            ctx.emit(uploaded)
        else:
            ctx.out.print(f"{uploaded['id']} {uploaded.get('filename')} ({_size(uploaded.get('bytes') or 0)})",
                          markup=False)


@files_app.command("download")
def files_download(
    file_id: Annotated[str, typer.Argument(metavar="ID")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", dir_okay=False, help="Where to write it.",
                                                   show_default="its filename, in this directory")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a file's content."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        meta = _raw(ctx.client().files.with_raw_response.retrieve, file_id)
        # The server's name, never a path it might smuggle in.
        dest = output or Path(Path(str(meta.get("filename") or file_id)).name or file_id)
        written = _download(ctx, file_id, dest, size=meta.get("bytes"))
        if as_json:
            ctx.emit({"id": file_id, "path": str(dest), "bytes": written})
        else:
            ctx.out.print(f"{dest} ({_size(written)})", markup=False)


@files_app.command("delete")
def files_delete(
    file_id: Annotated[str, typer.Argument(metavar="ID")],
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a file (refused while a running batch reads it)."""
    ctx = Ctx(server, api_key, as_json)
    with _handled(ctx):
        doc = _raw(ctx.client().files.with_raw_response.delete, file_id)
        if as_json:
            ctx.emit(doc)
        else:
            ctx.out.print(f"deleted {doc.get('id', file_id)}", markup=False)
