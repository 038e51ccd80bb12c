"""The test plays the Job controller and the kubelet for Indexed Jobs in the fake API server.

For every Job overnight creates in :class:`FakeApiServer`, it makes one pod per
completion index (annotations and labels from the Job's pod template, as the
Job controller does), and for each pod starts what the pod would run, as local
processes: the mock engine (the engine sidecar) on a free port and
``overnight worker`` with the downward-API files and env the pod would get. It
then reports back through the API what a kubelet and the Job controller would:
pod phases and the worker's exit code, ``completedIndexes``/``failedIndexes``,
a retry pod per failed index up to ``backoffLimitPerIndex`` (exit code 42 fails
the index at once, as the pod failure policy says), and the Job's ``Complete``
or ``Failed`` condition. A pod deleted through the API (the Job deleted with
Background propagation) gets SIGTERM, as a kubelet sends.

How it differs from a cluster: no scheduling, images or resources (a pod
starts at once unless the test holds it ``unschedulable``), processes instead of
containers, the engine sidecar is a plain mock engine process, and status
changes are written by this loop every ``tick_s`` rather than by watches.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overnight.runtimes.local import reserve_port
from tests.kubernetes.fake_apiserver import FakeApiServer

INDEX_ANN = "batch.kubernetes.io/job-completion-index"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass
class Pod:
    name: str
    namespace: str
    job: str
    index: int
    workdir: Path
    engine: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    engine_port: int = 0
    port_hold: socket.socket | None = None
    exit_code: int | None = None
    terminated: bool = False
    #: Requests its engine received (read before the engine is stopped).
    engine_received: int | None = None


@dataclass
class JobState:
    namespace: str
    name: str
    uid: str
    completions: int
    backoff_per_index: int
    completed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    failures: dict[int, int] = field(default_factory=dict)
    finished: bool = False


class Kubelet:
    """Runs Jobs' pods as local processes. ``start()``; ``stop()`` kills everything."""

    def __init__(self, api: FakeApiServer, workdir: Path, *, engine_args: tuple[str, ...] = ("--latency-ms", "20"),
                 env: dict[str, str] | None = None, tick_s: float = 0.1) -> None:
        self.api, self.workdir, self.engine_args = api, workdir, engine_args
        self.env = env or {}
        self.tick_s = tick_s
        self.jobs: dict[str, JobState] = {}
        self.pods: dict[str, Pod] = {}
        #: Pods that may not be scheduled (the test holds them Pending, Unschedulable).
        self.unschedulable = False
        self.events: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

    # -- life cycle --------------------------------------------------------------
    def start(self) -> Kubelet:
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            for pod in self.pods.values():
                self._kill(pod, signal.SIGKILL)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._tick()
            except Exception as exc:  # keep the kubelet alive; the test sees the event
                self.events.append(f"kubelet error: {exc!r}")
            self._stop.wait(self.tick_s)

    # -- test controls ---------------------------------------------------------------
    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> Pod:
        """Kill the running worker of ``index`` (a node dying under the pod)."""
        with self._lock:
            pod = next(p for p in self.pods.values() if p.index == index and p.exit_code is None and p.worker)
            assert pod.worker is not None
            pod.worker.send_signal(sig)
            return pod

    def worker_logs(self) -> str:
        return "\n".join(f"== {p.name}\n{(p.workdir / 'worker.log').read_text(errors='replace')}"
                         for p in self.pods.values() if (p.workdir / "worker.log").exists())

    # -- the loop ----------------------------------------------------------------------
    def _tick(self) -> None:
        for job in self.api.objects("Job"):
            md = job["metadata"]
            key = f"{md['namespace']}/{md['name']}"
            if key not in self.jobs:
                spec = job["spec"]
                self.jobs[key] = JobState(md["namespace"], md["name"], md["uid"], int(spec["completions"]),
                                          int(spec.get("backoffLimitPerIndex", 6)))
        for key, st in list(self.jobs.items()):
            job = self.api.get("Job", st.namespace, st.name)
            if job is None or job["metadata"]["uid"] != st.uid:
                for pod in [p for p in self.pods.values() if p.job == key]:
                    self._terminate(pod)
                del self.jobs[key]
                continue
            self._reap(st, job)
            if not st.finished:
                self._schedule(st, job)
        for pod in list(self.pods.values()):
            if pod.exit_code is None and self.api.get("Pod", pod.namespace, pod.name) is None:
                self._terminate(pod)  # deleted through the API: SIGTERM, as a kubelet would

    def _live(self, key: str, index: int) -> Pod | None:
        return next((p for p in self.pods.values() if p.job == key and p.index == index and p.exit_code is None),
                    None)

    def _schedule(self, st: JobState, job: dict[str, Any]) -> None:
        key = f"{st.namespace}/{st.name}"
        for i in range(st.completions):
            if i in st.completed or i in st.failed or self._live(key, i) is not None:
                continue
            self._start_pod(st, job, i)

    def _start_pod(self, st: JobState, job: dict[str, Any], index: int) -> None:
        tmpl = job["spec"]["template"]
        labels = dict(tmpl["metadata"].get("labels") or {})
        labels[INDEX_ANN] = str(index)
        annotations = dict(tmpl["metadata"].get("annotations") or {})
        annotations[INDEX_ANN] = str(index)
        name = f"{st.name}-{index}-{uuid.uuid4().hex[:5]}"
        pod_obj = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": st.namespace, "labels": labels, "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": st.name,
                                              "uid": st.uid, "controller": True}]},
            "spec": tmpl["spec"],
            "status": {"phase": "Pending"},
        }
        self.api.create(pod_obj)
        pod = Pod(name, st.namespace, f"{st.namespace}/{st.name}", index, self.workdir / name)
        self.pods[name] = pod
        if self.unschedulable:
            self.api.set_status("Pod", st.namespace, name, {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
            pod.exit_code = -1  # never runs; the Job is deleted by the service
            return
        pod.workdir.mkdir(parents=True)
        podinfo = pod.workdir / "podinfo"
        podinfo.mkdir()
        (podinfo / "annotations").write_text("".join(f"{k}={_quote(v)}\n" for k, v in sorted(annotations.items())))
        (podinfo / "labels").write_text("".join(f"{k}={_quote(v)}\n" for k, v in sorted(labels.items())))
        (podinfo / "name").write_text(name)
        (podinfo / "namespace").write_text(st.namespace)
        worker_spec = next(c for c in tmpl["spec"]["containers"] if c["name"] == "worker")
        env = {**os.environ, **self.env}
        for e in worker_spec.get("env") or []:
            if "value" in e and e["name"] != "OVERNIGHT_DATA_DIR":
                env[e["name"]] = e["value"]
        # A pod's own filesystem: its spool dies with it (the emptyDir of the manifest).
        env.update({"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": name,
                    "OVERNIGHT_DATA_DIR": str(pod.workdir / "data")})
        pod.engine_port, pod.port_hold = reserve_port()  # held until the pod ends: see its docstring
        elog = (pod.workdir / "engine.log").open("ab")
        pod.engine = subprocess.Popen(
            [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", str(pod.engine_port),
             *self.engine_args], stdout=elog, stderr=subprocess.STDOUT)
        wlog = (pod.workdir / "worker.log").open("ab")
        pod.worker = subprocess.Popen(
            [sys.executable, "-m", "overnight.cli.main", "worker", "--podinfo-dir", str(podinfo),
             "--engine-url", f"http://127.0.0.1:{pod.engine_port}"],
            env=env, stdout=wlog, stderr=subprocess.STDOUT)
        self.api.set_status("Pod", st.namespace, name, {"phase": "Running", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]})

    def _reap(self, st: JobState, job: dict[str, Any]) -> None:
        key = f"{st.namespace}/{st.name}"
        changed = False
        for pod in [p for p in self.pods.values() if p.job == key and p.exit_code is None and p.worker]:
            assert pod.worker is not None
            code = pod.worker.poll()
            if code is None:
                continue
            pod.exit_code = code
            self._kill(pod, signal.SIGTERM)
            phase = "Succeeded" if code == 0 else "Failed"
            if self.api.get("Pod", pod.namespace, pod.name) is not None:
                self.api.set_status("Pod", pod.namespace, pod.name, {"phase": phase, "containerStatuses": [
                    {"name": "worker", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                     "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}}]})
            if pod.terminated:
                continue  # stopped by a deletion: not the index's verdict
            changed = True
            if code == 0:
                st.completed.add(pod.index)
            elif code == 42:
                st.failed.add(pod.index)  # podFailurePolicy: FailIndex
            else:
                st.failures[pod.index] = st.failures.get(pod.index, 0) + 1
                if st.failures[pod.index] > st.backoff_per_index:
                    st.failed.add(pod.index)
        if not changed:
            return
        status: dict[str, Any] = {
            "succeeded": len(st.completed), "failed": sum(st.failures.values()) + len(st.failed),
            "completedIndexes": _ranges(st.completed), "failedIndexes": _ranges(st.failed),
            "active": sum(1 for p in self.pods.values() if p.job == key and p.exit_code is None),
        }
        if len(st.completed) + len(st.failed) == st.completions:
            st.finished = True
            if st.failed:
                status["conditions"] = [{"type": "Failed", "status": "True", "reason": "FailedIndexes",
                                         "message": "Job has failed indexes"}]
            else:
                status["conditions"] = [{"type": "Complete", "status": "True"}]
        self.api.set_status("Job", st.namespace, st.name, status)

    def _terminate(self, pod: Pod) -> None:
        pod.terminated = True
        self._kill(pod, signal.SIGTERM)
        if pod.worker is not None:
            try:
                pod.exit_code = pod.worker.wait(30)
            except subprocess.TimeoutExpired:
                pod.worker.kill()
                pod.exit_code = pod.worker.wait()
        elif pod.exit_code is None:
            pod.exit_code = -1

    def _kill(self, pod: Pod, sig: int) -> None:
        if pod.engine is not None and pod.engine_received is None:
            pod.engine_received = self._engine_received(pod)
        for p in (pod.worker, pod.engine):
            if p is not None and p.poll() is None:
                p.send_signal(sig)
                if p is pod.engine:
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
        if pod.port_hold is not None and (pod.engine is None or pod.engine.poll() is not None):
            pod.port_hold.close()
            pod.port_hold = None

    def _engine_received(self, pod: Pod) -> int | None:
        """The requests the pod's engine received, read before it is stopped. A
        failure is an event the test can show, not a silent ``None``."""
        import httpx

        assert pod.engine is not None
        why = ""
        for _ in range(3):
            if pod.engine.poll() is not None:
                log = (pod.workdir / "engine.log").read_text(errors="replace")[-500:]
                why = f"engine exited with {pod.engine.returncode}: {log}"
                break
            try:
                stats = httpx.get(f"http://127.0.0.1:{pod.engine_port}/stats", timeout=10).json()
                return int(stats["received_total"])
            except Exception as exc:
                why = repr(exc)
        self.events.append(f"{pod.name}: engine stats unread: {why}")
        return None


def _ranges(indexes: set[int]) -> str:
    out, run = [], []
    for i in sorted(indexes):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def wait_until(pred, timeout_s: float = 60.0, every_s: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"timed out waiting for {what}")
