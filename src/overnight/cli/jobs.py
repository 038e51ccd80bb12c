"""``overnight jobs``: console jobs on a running server (``/api/v1/jobs``), the way
``overnight batch`` drives batches.

A job brings its own engine: the server's planner asks a provider for a resource,
starts the template's engine, submits the batch, follows it and releases the
resource. The job API is overnight's own (not part of the OpenAI SDK), so this
talks to it with httpx; the input goes up through the console's file proxy
(``/api/v1/files/upload``) and results come down through
``/api/v1/files/{id}/content``. Every JSON document printed is the server's own
body, read raw.

The conventions are ``overnight batch``'s (``cli/client.py``): ``--server`` /
``--api-key`` / ``--json``, a live view on a terminal and one line per change
without one, Ctrl-C to cancel or detach, and the exit codes: 0 completed, 1 the
job ended otherwise (failed, expired, cancelled, resource_failed, submit_failed)
or the server failed (5xx), 2 a usage error or a 4xx (its message printed), 3 the
server cannot be reached.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from overnight.cli.client import (
    DEFAULT_SERVER,
    UNREACHABLE_GRACE_S,
    ApiKeyOpt,
    CliExit,
    Ctx,
    JsonOpt,
    Rates,
    ServerOpt,
    Snapshot,
    _ask_cancel_or_detach,
    _bytes_bar,
    _CountingReader,
    _duration,
    _first_url,
    _handled,
    _metadata,
    _size,
    _ts,
    deferred_sigint,
)

if TYPE_CHECKING:
    import httpx
    from rich.console import Console

__all__ = ["JOB_TERMINAL", "JobsApi", "jobs_app"]

jobs_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None)

#: Where a job ends (``console/jobs.py``); the watch stops there.
JOB_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled", "resource_failed", "submit_failed"})
#: Batch stages a job mirrors once its batch exists: the progress bar has numbers then.
BATCH_STAGES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
#: After the job ends, the watch waits this long for the provider to confirm the release.
RELEASE_WAIT_S = 30.0
#: GETs are retried this often on a connection error, 429 or 502-504 (as the SDK does for batches).
GET_RETRIES = 2
RETRY_STATUSES = frozenset({429, 502, 503, 504})

IntervalOpt = Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between polls of the job.")]
JobIdArg = Annotated[str, typer.Argument(metavar="ID")]


class Unreachable(CliExit):
    """The server did not answer (exit 3); a watch rides it out for a while."""


# -- the job API --------------------------------------------------------------------------


class JobsApi:
    """``/api/v1`` of one server over httpx: bodies back as dicts, failures as
    ``CliExit`` with the exit code the module docstring promises."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.root = ctx.base_url.removesuffix("/v1")  # checks --server too
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            httpx = _httpx()
            headers = {"Authorization": f"Bearer {self.ctx.api_key}"} if self.ctx.api_key else {}
            self._http = httpx.Client(base_url=self.root, headers=headers, timeout=60.0)
        return self._http

    def reset(self) -> None:
        """A new connection pool (after Ctrl-C interrupted a request mid-flight)."""
        if self._http is not None:
            self._http.close()
            self._http = None

    def close(self) -> None:
        self.reset()

    def _unreachable(self, exc: Exception) -> Unreachable:
        why = "timed out" if "Timeout" in type(exc).__name__ else (str(exc) or "connection failed")
        return Unreachable(3, f"cannot reach the overnight server at {self.ctx.server}: {why}", kind="unreachable")

    def request(self, method: str, path: str, *, retry: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        """One call. GETs are retried on a connection error, 429 and 502-504; other
        methods only when the connection was never made (nothing was sent)."""
        httpx = _httpx()
        retry = method == "GET" if retry is None else retry
        for attempt in range(GET_RETRIES + 1):
            last = attempt == GET_RETRIES
            try:
                r = self.http.request(method, path, **kwargs)
            except httpx.ConnectError as exc:
                if last:
                    raise self._unreachable(exc) from None
            except httpx.TransportError as exc:
                if last or not retry:
                    raise self._unreachable(exc) from None
            else:
                if r.status_code < 400:
                    return _json_body(r)
                if last or not retry or r.status_code not in RETRY_STATUSES:
                    raise _status_error(r)
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    # The routes ------------------------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/v1/jobs", json=body)

    def list(self, *, limit: int, after: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self.request("GET", "/api/v1/jobs", params=params)

    def get(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/jobs/{_quote(job_id)}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/v1/jobs/{_quote(job_id)}/cancel")

    def upload(self, path: Path, purpose: str = "batch") -> dict[str, Any]:
        """Stream ``path`` up as a multipart upload, with a byte bar on a terminal."""
        size = path.stat().st_size
        with _bytes_bar(self.ctx, f"uploading {path.name}", size) as progress:
            reader = _CountingReader(path, progress)
            try:
                # No retry once connected: an upload the server kept would be kept twice.
                return self.request("POST", "/api/v1/files/upload", data={"purpose": purpose},
                                    files={"file": (path.name, reader, "application/jsonl")})
            finally:
                reader.close()

    def download(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest`` (written beside it, then renamed: a
        partial download never has the final name). Returns the bytes written."""
        httpx = _httpx()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with self.http.stream("GET", f"/api/v1/files/{_quote(file_id)}/content") as r:
                        if r.status_code >= 400:
                            r.read()
                            raise _status_error(r)
                        size = int(r.headers["content-length"]) if r.headers.get("content-length", "").isdigit() \
                            else None
                        with _bytes_bar(self.ctx, f"downloading {dest.name}", size) as progress:
                            for chunk in r.iter_bytes(1 << 16):
                                out.write(chunk)
                                written += len(chunk)
                                progress(written)
                except httpx.TransportError as exc:
                    raise self._unreachable(exc) from None
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return written


def _httpx() -> Any:
    """httpx, or the one line that says which extra brings it."""
    try:
        import httpx
    except ImportError:
        raise CliExit(2, "overnight jobs needs httpx: pip install 'overnight[client]'", kind="usage") from None
    return httpx


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


def _json_body(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        raise CliExit(1, f"the server answered {r.status_code} with a body that is not JSON: {r.text[:200]!r}",
                      kind="server_error", status_code=r.status_code) from None
    if not isinstance(body, dict):
        raise CliExit(1, f"the server answered {r.status_code} with {type(body).__name__}, not an object",
                      kind="server_error", status_code=r.status_code)
    return body


def _status_error(r: httpx.Response) -> CliExit:
    """A 4xx is the caller's to fix (exit 2), a 5xx the server's (exit 1); the message
    is the server's OpenAI-shaped ``error.message`` when it sent one."""
    message = ""
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or "")
    except (ValueError, AttributeError):
        pass
    message = message or r.text.strip()[:200] or r.reason_phrase
    status = r.status_code
    return CliExit(2 if status < 500 else 1, f"server said {status}: {message}",
                   kind="client_error" if status < 500 else "server_error", status_code=status)


# -- what the views show ------------------------------------------------------------------------


def _event_line(e: dict[str, Any]) -> str:
    at = e.get("at")
    clock = time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, (int, float)) else "--:--:--"
    return f"{clock}  {str(e.get('type')):<19} {e.get('message') or ''}".rstrip()


def _event_key(e: dict[str, Any]) -> tuple[Any, ...]:
    # An event updated in place (an outage's retries) shows again with its new count.
    return e.get("at"), e.get("type"), e.get("attempts")


def _released(job: dict[str, Any]) -> bool:
    """Whether nothing of the job is left at a provider (or nothing ever was)."""
    if not job.get("provision_id"):
        return True
    return (job.get("provision") or {}).get("status") == "released" or any(
        e.get("type") == "release_confirmed" for e in job.get("events") or [])


def _stage(job: dict[str, Any], snap: Snapshot) -> str:
    """What the job is doing, in words, for the status line."""
    status = str(job.get("status"))
    prov = job.get("provision") or {}
    provider = prov.get("provider") or job.get("provider") or "the provider"
    cancel = " · cancel requested" if job.get("cancel_requested_at") and status not in JOB_TERMINAL else ""
    if status == "queued":
        return f"waiting for the planner ({provider}){cancel}"
    if status == "resource_preparing":
        return f"{provider} resource {prov.get('status') or 'requested'}{cancel}"
    if status == "submitting":
        return f"creating the batch on {prov.get('endpoint') or 'its engine'}{cancel}"
    if status in BATCH_STAGES:
        return snap.describe() + cancel
    if status in JOB_TERMINAL and not _released(job):
        return (f"{snap.describe()} · " if snap.total else "") + "waiting for the release to be confirmed"
    return snap.describe() if snap.total else (job.get("error_message") or status)


class JobView:
    """Silent (for --json): the base of the two views below."""

    def start(self, job: dict[str, Any], snap: Snapshot) -> None: ...
    def events(self, lines: list[str]) -> None: ...
    def update(self, job: dict[str, Any], snap: Snapshot) -> None: ...
    def pause(self) -> None: ...
    def stop(self) -> None: ...

    def show(self, job: dict[str, Any], snap: Snapshot, lines: list[str]) -> None:
        """One poll: its new events, then where the job stands."""
        self.events(lines)
        self.update(job, snap)


class PlainJobView(JobView):
    """Without a terminal (logs, pipes): each event as a line on stderr, and the
    status line at each status change and every ``every_s`` seconds in between."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last = 0.0
        self._said = ""

    def start(self, job: dict[str, Any], snap: Snapshot) -> None:
        self.update(job, snap)

    def events(self, lines: list[str]) -> None:
        for line in lines:
            print(line, file=sys.stderr, flush=True)

    def update(self, job: dict[str, Any], snap: Snapshot) -> None:
        now = time.monotonic()
        status = str(job.get("status"))
        if status != self._said or now - self._last >= self.every_s:
            self._last, self._said = now, status
            print(f"{job['id']} {status}: {_stage(job, snap)}", file=sys.stderr, flush=True)


class LiveJobView(JobView):
    """On a terminal: events printed as they arrive, above a status line redrawn in
    place (a bar once the batch has counted its requests)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Any = None
        self._task: Any = None
        self._since = time.monotonic()

    def _fields(self, job: dict[str, Any], snap: Snapshot) -> dict[str, Any]:
        status = str(job.get("status"))
        counted = snap.total > 0 and (status in BATCH_STAGES or status in JOB_TERMINAL)
        done = status in JOB_TERMINAL
        return {"total": snap.total if counted else (1 if done else None),
                "completed": snap.done if counted else (1 if done else 0),
                "status": status, "info": _stage(job, snap),
                "elapsed": _duration(time.monotonic() - self._since)}

    def start(self, job: dict[str, Any], snap: Snapshot) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self.stop()  # one live line at a time
        self._bar = Progress(
            TextColumn("{task.fields[status]}"), BarColumn(bar_width=24),
            TextColumn("{task.fields[info]}", markup=False), TextColumn("[yellow]{task.fields[elapsed]}[/]"),
            console=self.console, transient=False, refresh_per_second=4,
        )
        self._task = self._bar.add_task("job", **self._fields(job, snap))
        with deferred_sigint():
            self._bar.start()

    def events(self, lines: list[str]) -> None:
        for line in lines:
            # Printed above the live line (rich moves it down).
            (self._bar.console if self._bar is not None else self.console).print(line, markup=False,
                                                                                highlight=False)

    def update(self, job: dict[str, Any], snap: Snapshot) -> None:
        if self._bar is None:
            self.start(job, snap)
            return
        self._bar.update(self._task, refresh=True, **self._fields(job, snap))

    def pause(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._bar is not None:
            with deferred_sigint():
                self._bar.stop()
                self._bar = None

    def show(self, job: dict[str, Any], snap: Snapshot, lines: list[str]) -> None:
        # The line first: each event printed above it redraws it, and it should say the new status.
        self.update(job, snap)
        self.events(lines)


def _view_for(ctx: Ctx) -> JobView:
    if ctx.json:
        return JobView()
    if ctx.err.is_terminal:
        return LiveJobView(ctx.err)
    return PlainJobView()


@dataclass
class WatchResult:
    job: dict[str, Any]
    detached: bool = False


@dataclass
class _Events:
    """Which events were shown already."""

    seen: set[tuple[Any, ...]] = field(default_factory=set)

    def new(self, job: dict[str, Any]) -> list[str]:
        out = []
        for e in job.get("events") or []:
            key = _event_key(e)
            if key not in self.seen:
                self.seen.add(key)
                out.append(_event_line(e))
        return out


def _watch(ctx: Ctx, api: JobsApi, job: dict[str, Any], *, interval: float) -> WatchResult:
    """Poll ``job`` to a terminal status (and, for a while, its release), showing
    its events and progress. Ctrl-C asks to cancel or detach on a terminal and
    detaches without one; a cancel keeps watching."""
    rates = Rates()
    view = _view_for(ctx)
    events = _Events()
    interactive = sys.stdin.isatty()
    cancel_sent = False
    unreachable_since: float | None = None
    ended_at: float | None = None
    snap = rates.add(job)
    shown = False
    try:
        while True:
            try:
                if not shown:  # in the loop, so that a Ctrl-C this early is asked about too
                    view.events(events.new(job))
                    view.start(job, snap)
                    shown = True
                else:
                    time.sleep(interval)
                    try:
                        job = api.get(job["id"])
                        unreachable_since = None
                        snap = rates.add(job)
                    except Unreachable:
                        now = time.monotonic()
                        unreachable_since = unreachable_since or now
                        if now - unreachable_since >= UNREACHABLE_GRACE_S:
                            raise
                        snap.note = f"server unreachable for {now - unreachable_since:.0f} s, retrying"
                    view.show(job, snap, events.new(job))
                if job.get("status") in JOB_TERMINAL:
                    ended_at = ended_at or time.monotonic()
                    if _released(job) or time.monotonic() - ended_at >= RELEASE_WAIT_S:
                        break
            except KeyboardInterrupt:
                view.pause()
                api.reset()  # the interrupted request may have left its connection half-used
                ended = job.get("status") in JOB_TERMINAL
                choice = _ask_cancel_or_detach(ctx, "job") if interactive and not cancel_sent and not ended else "d"
                if choice == "d":
                    if not ended:
                        ctx.err.print(f"detached; {job['id']} keeps running (overnight jobs watch {job['id']})",
                                      markup=False)
                    return WatchResult(job, detached=not ended)
                ctx.err.print(f"cancelling {job['id']} ...", markup=False)
                try:
                    job = api.cancel(job["id"])
                except CliExit as exc:
                    if exc.status_code != 409:  # 409: it ended meanwhile; the next poll shows how
                        raise
                cancel_sent = True
                snap = rates.add(job)
                view.events(events.new(job))
                view.start(job, snap)
                shown = True
    finally:
        view.stop()
    return WatchResult(job)


def _job_files(api: JobsApi, job: dict[str, Any], directory: Path, stem: str | None) -> dict[str, str]:
    """Download the job's output and error datasets as ``<stem>.<job id>.output.jsonl``
    and ``.errors.jsonl`` into ``directory``; returns kind -> path of what existed."""
    prefix = f"{stem}.{job['id']}" if stem else job["id"]
    done: dict[str, str] = {}
    for kind, key, suffix in (("output", "output_dataset", "output"), ("errors", "error_dataset", "errors")):
        file_id = job.get(key)
        if file_id:
            dest = directory / f"{prefix}.{suffix}.jsonl"
            api.download(file_id, dest)
            done[kind] = str(dest)
    return done


def _cost(job: dict[str, Any]) -> str:
    c = job.get("cost") or {}
    gpu = float(c.get("gpu_seconds") or 0)
    usd = c.get("usd")
    return f"{gpu:,.1f} GPU-s" + (f", ${usd:,.4f}" if usd is not None else "")


def _summary(ctx: Ctx, job: dict[str, Any], files: dict[str, str] | None = None, *,
             seconds: float | None = None) -> None:
    """The lines a person reads after a watch."""
    status = str(job.get("status"))
    colour = {"completed": "green", "failed": "red", "resource_failed": "red", "submit_failed": "red",
              "expired": "yellow", "cancelled": "yellow"}.get(status, "")
    counts = job.get("request_counts") or {}
    usage = job.get("usage") or {}
    took = ""
    if seconds is None:
        ended = next((job.get(f"{s}_at") for s in JOB_TERMINAL if job.get(f"{s}_at")), None)
        if ended and job.get("created_at"):
            seconds = max(0, int(ended) - int(job["created_at"]))
    if seconds is not None:
        took = f" in {seconds:.1f} s" if seconds < 60 else f" in {_duration(seconds)}"
    head = f"{job['id']} [{colour}]{status}[/]" if colour else f"{job['id']} {status}"
    line = head + took
    if job.get("batch_id"):
        line += (f": {counts.get('completed', 0)} completed, {counts.get('failed', 0)} failed of "
                 f"{counts.get('total', 0)}; tokens {usage.get('input_tokens', 0):,} in / "
                 f"{usage.get('output_tokens', 0):,} out; batch {job['batch_id']}")
    ctx.out.print(line)
    prov = job.get("provision") or {}
    if prov:
        ctx.out.print(f"  resource {prov.get('provider')} {prov.get('status')}; cost {_cost(job)}", markup=False)
    if job.get("error_message"):
        ctx.out.print(f"  error    {job['error_message']}", markup=False)
    for kind, path in (files or {}).items():
        ctx.out.print(f"  {kind:<8} {path}", markup=False)


def _exit_for(job: dict[str, Any]) -> int:
    return 0 if job.get("status") == "completed" else 1



@contextmanager
def _session(server: str, api_key: str | None, as_json: bool) -> Iterator[tuple[Ctx, JobsApi]]:
    """One command's settings and connection, with every failure mapped to its exit code."""
    ctx = Ctx(server, api_key, as_json)
    api: JobsApi | None = None
    with _handled(ctx):
        api = JobsApi(ctx)
        try:
            yield ctx, api
        finally:
            api.close()


# -- the commands ---------------------------------------------------------------------------------


@jobs_app.command("create")
def jobs_create(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", exists=True, dir_okay=False, readable=True,
                                               help="The batch input: one OpenAI batch request per line.")],
    template: Annotated[Optional[str], typer.Option(
        "--template", help="The model deployment template whose engine the job's resource runs (the tenant's "
                           "stored templates or the server's).",
        show_default="the model's, else the server's DEFAULT_BATCH_MODEL_DEPLOYMENT_TEMPLATE")] = None,
    endpoint: Annotated[Optional[str], typer.Option(
        "--endpoint", help="/v1/chat/completions, /v1/completions, /v1/embeddings or /v1/responses.",
        show_default="the url of the input's first line")] = None,
    window: Annotated[str, typer.Option("--window", help="Completion window of the batch: 24h, or any duration "
                                                         "(90s, 10m, 2h, 3d).")] = "24h",
    provider: Annotated[Optional[str], typer.Option(
        "--provider", help="Where the resource comes from: fake, local, kubernetes, ... (as configured on the "
                           "server).", show_default="the server's PROVISIONER")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="A name for the job.", show_default="none")] = None,
    priority: Annotated[int, typer.Option("--priority", min=-1000, max=1000,
                                          help="Higher goes first where the server plans by priority.")] = 0,
    deadline: Annotated[Optional[float], typer.Option(
        "--deadline", metavar="UNIX", help="Fail the job if its resource is not running by this Unix time (it also "
                                           "bounds the batch's window).", show_default="none")] = None,
    metadata: Annotated[Optional[list[str]], typer.Option("--metadata", metavar="KEY=VALUE",
                                                         help="Metadata on the job (repeatable).",
                                                         show_default="none")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Watch it live to the end (and the release of its resource), "
                                                      "then download its output and error datasets next to "
                                                      "INPUT.")] = False,
    interval: IntervalOpt = 1.0,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload INPUT and create a console job from it: the server provisions a resource, runs the template's engine
    on it, runs the batch and releases the resource. --wait watches it to the end and downloads
    <input stem>.<job id>.output.jsonl / .errors.jsonl next to INPUT. Ctrl-C while waiting: cancel the job or
    detach (without a terminal: detach)."""
    with _session(server, api_key, as_json) as (ctx, api):
        meta = _metadata(metadata or [])
        if endpoint is None:
            endpoint = _first_url(input_path)
            if endpoint is None:
                raise CliExit(2, f"{input_path}: no endpoint: give --endpoint (the first line names no url)",
                              kind="usage")
        uploaded = api.upload(input_path)
        body: dict[str, Any] = {"input_dataset": uploaded["id"], "endpoint": endpoint, "completion_window": window,
                                "priority": priority}
        for key, value in (("model_template_name", template), ("provider", provider), ("name", name),
                           ("provision_resource_deadline", deadline), ("metadata", meta)):
            if value is not None:
                body[key] = value
        job = api.create(body)
        if not wait:
            if as_json:
                ctx.emit(job)
            else:
                ctx.out.print(f"created {job['id']} ({job['status']}, provider {job.get('provider')}, template "
                              f"{job.get('model_template_name')}) from {uploaded['id']}; watch it: overnight jobs "
                              f"watch {job['id']}", markup=False)
            return
        if not as_json:
            ctx.err.print(f"created {job['id']} from {uploaded['id']} ({input_path.name}, "
                          f"{_size(uploaded.get('bytes') or 0)}): provider {job.get('provider')}, template "
                          f"{job.get('model_template_name')} {job.get('model_template_version') or ''}".rstrip(),
                          markup=False)
        created = time.monotonic()
        result = _watch(ctx, api, job, interval=interval)
        took = time.monotonic() - created
        job = result.job
        if result.detached:
            if as_json:
                ctx.emit(job)
            return
        files = _job_files(api, job, input_path.parent, input_path.stem)
        if as_json:
            ctx.emit(job)
        else:
            _summary(ctx, job, files, seconds=took)
    raise typer.Exit(_exit_for(job))


@jobs_app.command("watch")
def jobs_watch(
    job_id: JobIdArg,
    interval: IntervalOpt = 1.0,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Watch a job live to its end: its events as they arrive, the batch's progress once submitted (exit 0
    completed, 1 otherwise). Ctrl-C: cancel it or detach."""
    with _session(server, api_key, as_json) as (ctx, api):
        job = api.get(job_id)
        result = _watch(ctx, api, job, interval=interval)
        job = result.job
        if as_json:
            ctx.emit(job)
        elif not result.detached:
            _summary(ctx, job)
    if not result.detached:
        raise typer.Exit(_exit_for(job))


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option("--limit", min=1, max=100, help="How many, newest first.")] = 20,
    after: Annotated[Optional[str], typer.Option("--after", help="Start after this job id (paging).",
                                                 show_default="none")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    with _session(server, api_key, as_json) as (ctx, api):
        page = api.list(limit=limit, after=after)
        if as_json:
            ctx.emit(page)
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("ID", "NAME", "STATUS", "PROVIDER", "TEMPLATE", "DONE", "CREATED"):
            table.add_column(col, no_wrap=True)
        for j in page.get("data") or []:
            c = j.get("request_counts") or {}
            done = int(c.get("completed") or 0) + int(c.get("failed") or 0)
            table.add_row(j["id"], str(j.get("name") or "-"), str(j.get("status")), str(j.get("provider")),
                          str(j.get("model_template_name")), f"{done}/{c.get('total', 0)}", _ts(j.get("created_at")))
        ctx.out.print(table)
        if page.get("has_more"):
            ctx.out.print(f"more: overnight jobs list --after {page.get('last_id')}", markup=False)


def _job_table(ctx: Ctx, j: dict[str, Any]) -> None:
    from rich.table import Table

    c = j.get("request_counts") or {}
    u = j.get("usage") or {}
    prov = j.get("provision") or {}
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    template = f"{j.get('model_template_name')} version {j.get('model_template_version')}"
    if j.get("profile"):
        template += f", profile {j['profile']}"
    rows: list[tuple[str, Any]] = [
        ("id", j.get("id")), ("name", j.get("name")), ("status", j.get("status")), ("provider", j.get("provider")),
        ("template", template), ("endpoint", j.get("endpoint")), ("window", j.get("completion_window")),
        ("priority", j.get("priority")), ("batch", j.get("batch_id")),
        ("requests", f"{c.get('completed', 0)} completed, {c.get('failed', 0)} failed of {c.get('total', 0)}"),
        ("tokens", f"{u.get('input_tokens', 0):,} in / {u.get('output_tokens', 0):,} out"),
        ("resource", f"{prov.get('provider')} {prov.get('status')}" + (
            f" at {prov['endpoint']}" if prov.get("endpoint") else "") if prov else None),
        ("resource ids", ", ".join(prov.get("resource_ids") or []) or None),
        ("cost", _cost(j)), ("input", j.get("input_dataset")), ("output", j.get("output_dataset")),
        ("errors", j.get("error_dataset")), ("error", j.get("error_message")),
    ]
    if j.get("provision_resource_deadline"):
        rows.append(("deadline", _ts(j["provision_resource_deadline"])))
    rows += [(k.removesuffix("_at"), _ts(v)) for k, v in j.items() if k.endswith("_at") and isinstance(v, (int, float))]
    if j.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in j["metadata"].items())))
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    ctx.out.print(table)
    events = j.get("events") or []
    if events:
        ctx.out.print("events:", markup=False)
        for e in events:
            ctx.out.print("  " + _event_line(e), markup=False)


@jobs_app.command("get")
def jobs_get(
    job_id: JobIdArg,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one job: status, provision, batch counts, cost, datasets and its events."""
    with _session(server, api_key, as_json) as (ctx, api):
        job = api.get(job_id)
        if as_json:
            ctx.emit(job)
        else:
            _job_table(ctx, job)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: JobIdArg,
    server: ServerOpt = DEFAULT_SERVER,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job at whatever stage it is (the planner cancels its batch and releases its resource; `watch`
    follows it)."""
    with _session(server, api_key, as_json) as (ctx, api):
        job = api.cancel(job_id)
        if as_json:
            ctx.emit(job)
        elif job.get("status") in JOB_TERMINAL:
            ctx.out.print(f"{job['id']} {job['status']}", markup=False)
        else:
            ctx.out.print(f"{job['id']} {job['status']}, cancel requested", markup=False)
