"""``overnight worker`` as a Job pod runs it: real worker processes, a real mock
engine process, a SQLite store and local storage shared through env URLs, and a
podinfo directory written as the kubelet's downwardAPI volume would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from overnight.batches import service
from overnight.batches.shards import claim_shard, merge_checkpoints, update_shard
from overnight.batches.states import BatchStatus
from overnight.batches.validation import ValidationLimits
from overnight.composition import open_persistence
from overnight.config import Settings
from overnight.executor.checkpoint import Checkpoint
from overnight.executor.run import Shard
from overnight.executor.writer import Spool
from overnight.files.service import create_file, storage_key_for
from overnight.runtimes.kubernetes.manifests import (
    ANN_BATCH_ID,
    ANN_ENGINE_PORT,
    ANN_HEALTH_PATH,
    ANN_SERVED_MODEL,
    ANN_SHARDS,
    EXIT_UNRECOVERABLE,
    JOB_INDEX_ANNOTATION,
    format_annotations,
)
from overnight.storage.base import Storage
from overnight.store.base import Store
from overnight.store.records import ShardRecord
from tests.conftest import Cluster, free_port

ENDPOINT = "/v1/chat/completions"
LIMITS = ValidationLimits(max_requests=100_000, max_bytes=10**9)
#: Fast heartbeats, checkpoints and backoff, as the service's process tests use.
WORKER_ENV = {
    "OVERNIGHT_CHECKPOINT_INTERVAL_S": "0.2",
    "OVERNIGHT_HEARTBEAT_S": "0.2",
    "OVERNIGHT_LEASE_S": "3",
    "OVERNIGHT_BACKOFF_BASE_S": "0.05",
    "OVERNIGHT_BACKOFF_MAX_S": "0.5",
}

_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_workers() -> Iterator[None]:
    """A failed test must not leave a worker behind."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Worker:
    """``overnight worker`` as a child process in its own process group."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "overnight.cli.main", "worker", *args], env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        _STARTED.append(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the worker did not exit within {timeout} s; log:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.05)
        self._out.close()
        return self.proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.proc.pid, sig)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)


@dataclass
class World:
    """A store and storage on disk, shared with the workers through OVERNIGHT_* URLs."""

    tmp: Path
    store: Store
    storage: Storage
    env: dict[str, str]

    async def batch(self, n: int, *, window: str = "24h", **extension: Any) -> tuple[str, str]:
        """A batch of ``n`` requests in ``in_progress`` (validated, as the runtime
        starts its Job); returns (batch id, input file id)."""
        data = b"".join(orjson.dumps({
            "custom_id": f"req-{i}", "method": "POST", "url": ENDPOINT,
            "body": {"model": "mock-model", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 8},
        }) + b"\n" for i in range(n))

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        f = await create_file(store=self.store, storage=self.storage, tenant="t", filename="in.jsonl",
                              purpose="batch", chunks=chunks())
        body = service.BatchCreate(input_file_id=f.id, endpoint=ENDPOINT, completion_window=window,
                                   extension=extension or None)
        rec = await service.create_batch(store=self.store, storage=self.storage, tenant="t", body=body,
                                         limits=LIMITS, validate_now=True)
        assert rec.total == n
        await service.transition(self.store, rec.id, BatchStatus.IN_PROGRESS)
        return rec.id, f.id

    def podinfo(self, batch_id: str, shards: int, port: int, *, index: int | None = None,
                drop: str | None = None) -> Path:
        """A downwardAPI volume: ``annotations`` (Go-quoted ``key="value"`` lines) and ``name``."""
        ann = {ANN_BATCH_ID: batch_id, ANN_SHARDS: str(shards), ANN_ENGINE_PORT: str(port),
               ANN_HEALTH_PATH: "/health", ANN_SERVED_MODEL: "mock-model"}
        if index is not None:
            ann[JOB_INDEX_ANNOTATION] = str(index)
        if drop is not None:
            del ann[drop]
        d = self.tmp / f"podinfo-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        (d / "annotations").write_text(format_annotations(ann))
        (d / "name").write_text(f"ovn-test-{index if index is not None else 'x'}")
        return d

    def worker(self, podinfo: Path, index: int | None, *args: str, env: dict[str, str] | None = None) -> Worker:
        e = {**os.environ, **self.env, **(env or {})}
        e.pop("JOB_COMPLETION_INDEX", None)
        if index is not None:
            e["JOB_COMPLETION_INDEX"] = str(index)
        log = self.tmp / f"worker-{index}-{uuid.uuid4().hex[:8]}.log"
        return Worker(["--podinfo-dir", str(podinfo), "--progress-every", "0.5", *args], e, log)

    async def shard(self, batch_id: str, index: int) -> ShardRecord:
        rec = await self.store.get_shard(batch_id, index)
        assert rec is not None, f"no shard {index}"
        return rec

    async def wait_done(self, batch_id: str, index: int, at_least: int, worker: Worker, timeout: float = 30) -> int:
        """Wait until shard ``index``'s stored checkpoint counts ``at_least`` finished requests."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert worker.proc.poll() is None, f"the worker ended early; log:\n{worker.log()[-3000:]}"
            rec = await self.store.get_shard(batch_id, index)
            if rec is not None and rec.completed + rec.failed >= at_least:
                return rec.completed + rec.failed
            await asyncio.sleep(0.02)
        raise AssertionError(f"shard {index} did not reach {at_least} in {timeout} s; log:\n{worker.log()[-3000:]}")

    async def checkpoint(self, batch_id: str, index: int) -> Checkpoint:
        raw = await self.store.get_shard_checkpoint(batch_id, index)
        assert raw is not None
        return Checkpoint.decode(raw)

    async def lines(self, batch_id: str, total: int, shards: int) -> tuple[list[dict], list[dict]]:
        """The output and error lines assembled from the merged shard checkpoints."""
        parts = [await self.checkpoint(batch_id, i) for i in range(shards)]
        merged = merge_checkpoints(total, parts)
        tag = uuid.uuid4().hex[:8]
        spool = Spool(spool_dir=self.tmp / "assemble", storage=self.storage, batch_id=f"{batch_id}/all",
                      token=0, checkpoint=merged)
        got = await spool.assemble(out_key=f"final/{tag}.out", err_key=f"final/{tag}.err")
        out = err = b""
        if got.out_lines:
            out = await self.storage.get_bytes(f"final/{tag}.out")
        if got.err_lines:
            err = await self.storage.get_bytes(f"final/{tag}.err")
        return [orjson.loads(x) for x in out.splitlines()], [orjson.loads(x) for x in err.splitlines()]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store_url = f"sqlite:///{tmp_path / 'overnight.db'}"
    storage_url = f"file://{tmp_path / 'files'}"
    settings = Settings(data_dir=tmp_path / "data", store_url=store_url, storage_url=storage_url)
    env = {**WORKER_ENV, "OVERNIGHT_STORE_URL": store_url, "OVERNIGHT_STORAGE_URL": storage_url,
           "OVERNIGHT_DATA_DIR": str(tmp_path / "data")}
    async with open_persistence(settings) as (store, storage):
        yield World(tmp_path, store, storage, env)


def stats(url: str) -> dict[str, Any]:
    return httpx.get(url + "/stats", timeout=5).json()


def assert_each_once(lines: list[dict], n: int) -> None:
    counts = Counter(x["custom_id"] for x in lines)
    assert {k: v for k, v in counts.items() if v > 1} == {}
    assert set(counts) == {f"req-{i}" for i in range(n)}


def dead_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# -- the happy path --------------------------------------------------------------------
async def test_four_workers_finish_the_batch_and_the_merged_shards_hold_every_line_once(
    world: World, cluster: Cluster,
) -> None:
    n, shards = 2000, 4
    engine = cluster.mock_engine("--latency-ms", "20")
    bid, _ = await world.batch(n, max_concurrency=32)
    workers = [world.worker(world.podinfo(bid, shards, engine.port, index=i), i) for i in range(shards)]
    codes = [await w.wait() for w in workers]
    assert codes == [0] * shards, "\n".join(w.log()[-2000:] for w in workers)
    for i, w in enumerate(workers):
        rec = await world.shard(bid, i)
        assert (rec.status, rec.completed, rec.failed, rec.total) == ("done", 500, 0, 500)
        assert rec.lease_expires_at == 0.0  # given back
        assert rec.usage["output_tokens"] == 500 * 8  # from the answers (max_tokens 8), in the shard record
        log = w.log()
        assert f"shard {i}/{shards}" in log and "claimed (token 1" in log and "exit 0" in log
        assert f"batch {bid} shard {i}/{shards} done: 500 completed, 0 failed" in log
        cp = await world.checkpoint(bid, i)
        assert all(cp.done.__contains__(j) == Shard(i, shards).owns(j) for j in range(n))
    out, err = await world.lines(bid, n, shards)
    assert err == []
    assert_each_once(out, n)
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert stats(engine.url)["received_total"] == n  # nothing was sent twice

    # A worker for a finished shard has nothing to do.
    again = world.worker(world.podinfo(bid, shards, engine.port), 2)
    assert await again.wait() == 0
    assert "already done" in again.log()
    assert stats(engine.url)["received_total"] == n


async def test_index_comes_from_the_annotation_and_engine_url_can_be_overridden(
    world: World, cluster: Cluster,
) -> None:
    engine = cluster.mock_engine("--latency-ms", "1")
    bid, _ = await world.batch(30)
    # The annotation names index 1 and a port nothing listens on; --engine-url wins.
    info = world.podinfo(bid, 2, free_port(), index=1)
    w = world.worker(info, None, "--engine-url", engine.url)
    assert await w.wait() == 0, w.log()
    rec = await world.shard(bid, 1)
    assert (rec.status, rec.completed) == ("done", 15)
    assert await world.store.get_shard(bid, 0) is None
    assert "holder ovn-test-1:" in w.log()  # the pod's name from the podinfo volume, and the pid


# -- replacement, duplicates, signals -----------------------------------------------------
async def test_sigkill_then_the_replacement_continues_resending_at_most_the_window(
    world: World, cluster: Cluster,
) -> None:
    n, shards, window = 1200, 2, 8
    engine = cluster.mock_engine("--latency-ms", "40")
    bid, _ = await world.batch(n, max_concurrency=window)
    # The lease outlasts the replacement's start (a worker's imports took over 1.5 s on a
    # loaded CI machine, and it found the lease already gone instead of held).
    env = {"OVERNIGHT_LEASE_S": "5"}
    first = world.worker(world.podinfo(bid, shards, engine.port, index=0), 0, env=env)
    other = world.worker(world.podinfo(bid, shards, engine.port, index=1), 1, env=env)
    at_kill = await world.wait_done(bid, 0, 150, first)
    first.kill()
    await first.wait()
    assert (await world.shard(bid, 0)).lease_expires_at > time.time()  # a killed pod gives nothing back
    # The replacement waits for the killed pod's lease to run out, then takes over.
    second = world.worker(world.podinfo(bid, shards, engine.port, index=0), 0, env=env)
    assert await second.wait() == 0, second.log()
    assert await other.wait() == 0, other.log()
    log = second.log()
    assert "held by 'ovn-test-0:" in log and "claimed (token 2, attempt 2)" in log
    done_before = int(log.split(" done before")[0].rsplit(", ", 1)[1])
    assert done_before >= at_kill  # it continued from the checkpoint
    rec = await world.shard(bid, 0)
    assert (rec.status, rec.completed, rec.attempts) == ("done", n // shards, 2)
    out, err = await world.lines(bid, n, shards)
    assert err == []
    assert_each_once(out, n)
    resent = stats(engine.url)["received_total"] - n
    assert 0 <= resent <= window, f"{resent} requests were sent again (window {window})"


async def test_two_workers_for_one_index_run_it_once(world: World, cluster: Cluster) -> None:
    n, shards = 600, 2
    engine = cluster.mock_engine("--latency-ms", "40")  # a run long enough for the second to find it running
    bid, _ = await world.batch(n, max_concurrency=8)
    info = world.podinfo(bid, shards, engine.port, index=0)
    a, b = world.worker(info, 0), world.worker(info, 0)
    assert [await a.wait(), await b.wait()] == [0, 0], a.log() + b.log()
    logs = [a.log(), b.log()]
    ran = [log for log in logs if "claimed (token" in log]
    waited = [log for log in logs if "already done" in log]
    assert len(ran) == 1 and len(waited) == 1, logs
    assert "held by" in waited[0]
    assert stats(engine.url)["received_total"] == n // shards  # no request sent twice
    cp = await world.checkpoint(bid, 0)
    assert (cp.completed, cp.failed) == (n // shards, 0)
    assert (await world.shard(bid, 0)).token == 1


async def test_a_worker_paused_past_its_lease_stops_without_writing(world: World, cluster: Cluster) -> None:
    n = 600
    engine = cluster.mock_engine("--latency-ms", "40")
    bid, _ = await world.batch(n, max_concurrency=8)
    w = world.worker(world.podinfo(bid, 1, engine.port, index=0), 0, env={"OVERNIGHT_LEASE_S": "1"})
    await world.wait_done(bid, 0, 60, w)
    w.kill(signal.SIGSTOP)  # a frozen node, a long GC pause
    try:
        deadline = time.monotonic() + 10
        while (await world.shard(bid, 0)).lease_expires_at > time.time():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # Another pod takes the index over (a new fencing token).
        taken = await claim_shard(world.store, bid, 0, count=1, holder="replacement:1", lease_s=60, total=n)
        stored = await world.store.get_shard_checkpoint(bid, 0)
    finally:
        w.kill(signal.SIGCONT)
    assert await w.wait(15) == 1, w.log()
    assert "lease lost" in w.log()
    assert await world.shard(bid, 0) == taken  # the stale pod wrote nothing: no progress, no release
    assert await world.store.get_shard_checkpoint(bid, 0) == stored


async def test_a_live_lease_elsewhere_is_waited_for_a_bounded_time(world: World) -> None:
    bid, _ = await world.batch(10)
    held = await claim_shard(world.store, bid, 0, count=2, holder="other-pod:7", lease_s=60, total=5)
    w = world.worker(world.podinfo(bid, 2, free_port(), index=0), 0, "--busy-timeout", "0.6")
    started = time.monotonic()
    assert await w.wait() == 1
    assert 0.5 <= time.monotonic() - started < 15
    log = w.log()
    assert "held by 'other-pod:7'" in log and "gave up after waiting 0.6 s" in log
    assert await world.shard(bid, 0) == held  # untouched


@pytest.mark.slow
async def test_sigterm_checkpoints_gives_the_lease_back_and_exits_143(world: World, cluster: Cluster) -> None:
    n = 600
    engine = cluster.mock_engine("--latency-ms", "40")
    bid, _ = await world.batch(n, max_concurrency=8)
    info = world.podinfo(bid, 1, engine.port, index=0)
    first = world.worker(info, 0, env={"OVERNIGHT_LEASE_S": "30"})
    await world.wait_done(bid, 0, 80, first)
    first.signal(signal.SIGTERM)
    assert await first.wait(15) == 143, first.log()
    rec = await world.shard(bid, 0)
    assert rec.status == "running" and rec.lease_expires_at == 0.0
    cp = await world.checkpoint(bid, 0)
    assert cp.completed == rec.completed >= 80  # the last checkpoint is the stored count
    log = first.log()
    assert "SIGTERM received" in log and "exit 143" in log
    # With the lease given back, the replacement starts at once (no 30 s wait).
    t0 = time.monotonic()
    second = world.worker(info, 0, env={"OVERNIGHT_LEASE_S": "30"})
    assert await second.wait() == 0, second.log()
    assert time.monotonic() - t0 < 20
    assert "held by" not in second.log()
    out, err = await world.lines(bid, n, 1)
    assert err == []
    assert_each_once(out, n)
    assert stats(engine.url)["received_total"] - n <= 8


# -- the engine -----------------------------------------------------------------------------
@pytest.mark.slow
async def test_an_engine_restart_is_ridden_out(world: World, cluster: Cluster) -> None:
    n = 800
    engine = cluster.mock_engine("--latency-ms", "20")
    bid, _ = await world.batch(n, max_concurrency=8)
    w = world.worker(world.podinfo(bid, 1, engine.port, index=0), 0)
    await world.wait_done(bid, 0, 150, w)
    engine.proc.kill()  # the sidecar dies; in-flight requests are lost
    engine.proc.wait()
    await asyncio.sleep(1.0)
    assert w.proc.poll() is None  # still there, waiting for its engine
    cluster.mock_engine("--latency-ms", "20", port=engine.port)
    assert await w.wait() == 0, w.log()
    rec = await world.shard(bid, 0)
    assert (rec.status, rec.completed, rec.failed) == ("done", n, 0)
    out, err = await world.lines(bid, n, 1)
    assert err == []
    assert_each_once(out, n)


async def test_an_engine_gone_too_long_checkpoints_releases_and_exits_1(world: World, cluster: Cluster) -> None:
    n = 800
    engine = cluster.mock_engine("--latency-ms", "20")
    bid, _ = await world.batch(n, max_concurrency=8)
    w = world.worker(world.podinfo(bid, 1, engine.port, index=0), 0,
                     env={"OVERNIGHT_ENGINE_UNREACHABLE_TIMEOUT_S": "1", "OVERNIGHT_LEASE_S": "30"})
    await world.wait_done(bid, 0, 100, w)
    engine.proc.kill()
    engine.proc.wait()
    assert await w.wait(20) == 1, w.log()
    assert "was unreachable for" in w.log() and "the index is retried" in w.log()
    rec = await world.shard(bid, 0)
    assert rec.status == "running" and rec.lease_expires_at == 0.0 and 100 <= rec.completed < n
    cp = await world.checkpoint(bid, 0)
    assert cp.failed == 0  # no engine_unreachable lines: the retried index sends them


async def test_an_engine_that_never_gets_ready_exits_1_after_ready_timeout(world: World) -> None:
    bid, _ = await world.batch(10)
    w = world.worker(world.podinfo(bid, 1, free_port(), index=0), 0, "--ready-timeout", "1",
                     env={"OVERNIGHT_LEASE_S": "30"})
    assert await w.wait() == 1
    assert "was not ready after" in w.log()
    rec = await world.shard(bid, 0)
    assert rec.status == "running" and rec.lease_expires_at == 0.0 and rec.completed == 0


# -- the batch ------------------------------------------------------------------------------
async def test_a_cancel_stops_the_worker_without_writing_cancelled_lines(world: World, cluster: Cluster) -> None:
    n = 800
    engine = cluster.mock_engine("--latency-ms", "40")
    bid, _ = await world.batch(n, max_concurrency=8)
    w = world.worker(world.podinfo(bid, 1, engine.port, index=0), 0)
    await world.wait_done(bid, 0, 50, w)
    await service.cancel_batch(store=world.store, tenant="t", batch_id=bid)
    assert await w.wait(15) == 0, w.log()
    assert "the batch is cancelling" in w.log()
    rec = await world.shard(bid, 0)
    assert rec.status == "running" and rec.completed < n
    cp = await world.checkpoint(bid, 0)
    assert cp.failed == 0 and cp.completed == rec.completed  # no batch_cancelled lines: the service writes them
    # A pod started after the cancel runs nothing.
    late = world.worker(world.podinfo(bid, 1, engine.port, index=0), 0)
    assert await late.wait() == 0
    assert "is cancelling; nothing to do" in late.log()


@pytest.mark.slow
async def test_the_window_ending_stops_the_worker_and_leaves_the_expired_lines_to_the_service(
    world: World, cluster: Cluster,
) -> None:
    n = 1000
    engine = cluster.mock_engine("--latency-ms", "40")
    bid, _ = await world.batch(n, window="3s", max_concurrency=8)  # about 5 s of work
    w = world.worker(world.podinfo(bid, 1, engine.port, index=0), 0)
    assert await w.wait(15) == 0, w.log()
    assert "completion window has ended; stopping" in w.log()
    rec = await world.shard(bid, 0)
    assert rec.status == "running" and 0 < rec.completed < n and rec.lease_expires_at == 0.0
    cp = await world.checkpoint(bid, 0)
    assert (cp.completed, cp.failed) == (rec.completed, 0)  # no batch_expired lines: the service writes them
    late = world.worker(world.podinfo(bid, 1, engine.port, index=0), 0)
    assert await late.wait() == 0
    assert "completion window has ended; nothing to do" in late.log()


async def test_an_input_that_cannot_be_read_fails_the_shard_with_42(world: World, cluster: Cluster) -> None:
    engine = cluster.mock_engine("--latency-ms", "1")
    bid, fid = await world.batch(20)
    await world.storage.delete(storage_key_for(fid))
    w = world.worker(world.podinfo(bid, 2, engine.port, index=1), 1)
    assert await w.wait() == EXIT_UNRECOVERABLE
    rec = await world.shard(bid, 1)
    assert rec.status == "failed" and rec.error is not None and rec.error["code"] == "file_not_found"
    assert fid in rec.error["message"] and stats(engine.url)["received_total"] == 0


async def test_an_already_done_shard_exits_0_at_once(world: World) -> None:
    bid, _ = await world.batch(10)
    rec = await claim_shard(world.store, bid, 0, count=1, holder="earlier:1", lease_s=60, total=10)

    def done(r: ShardRecord) -> ShardRecord:
        r.status, r.completed, r.lease_expires_at = "done", 10, 0.0
        return r

    await update_shard(world.store, bid, 0, done, fence=rec.token)
    # No engine at all: a done shard must not wait for one.
    w = world.worker(world.podinfo(bid, 1, free_port(), index=0), 0)
    assert await w.wait(10) == 0
    assert "already done (10 completed, 0 failed)" in w.log()


# -- bad pods -----------------------------------------------------------------------------------
async def test_missing_or_bad_podinfo_and_a_missing_batch_exit_42(world: World) -> None:
    port = free_port()
    bid, _ = await world.batch(4)
    cases = [
        (world.tmp / "nowhere", 0, "annotations does not exist"),
        (world.podinfo(bid, 2, port, drop=ANN_SHARDS), 0, f"annotation {ANN_SHARDS} is missing"),
        (world.podinfo(bid, 2, port), 2, "shard index 2 is not below"),
        (world.podinfo(bid, 2, port), None, f"annotation {JOB_INDEX_ANNOTATION} is missing"),
        (world.podinfo("batch_nosuchbatch", 2, port), 0, "batch batch_nosuchbatch does not exist"),
    ]
    bad = world.tmp / "garbled"
    bad.mkdir()
    (bad / "annotations").write_text("overnight.dev/batch-id=unquoted\n")
    cases.append((bad, 0, "line 1: value is not a double-quoted string"))
    workers = [(world.worker(info, index), why) for info, index, why in cases]
    for w, why in workers:
        assert await w.wait() == EXIT_UNRECOVERABLE, w.log()
        assert why in w.log() and "exit 42" in w.log()
    assert await world.store.list_shards(bid) == []  # nothing was claimed


async def test_a_batch_that_is_not_in_progress_yet_is_retried_later(world: World) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield orjson.dumps({"custom_id": "a", "method": "POST", "url": ENDPOINT,
                            "body": {"model": "m", "messages": []}}) + b"\n"

    f = await create_file(store=world.store, storage=world.storage, tenant="t", filename="in.jsonl",
                          purpose="batch", chunks=chunks())
    rec = await service.create_batch(store=world.store, storage=world.storage, tenant="t", limits=LIMITS,
                                     body=service.BatchCreate(input_file_id=f.id, endpoint=ENDPOINT,
                                                              completion_window="24h"))
    w = world.worker(world.podinfo(rec.id, 1, free_port(), index=0), 0)
    assert await w.wait() == 1
    assert "is validating, not in_progress yet" in w.log()
    assert await world.store.get_shard(rec.id, 0) is None

