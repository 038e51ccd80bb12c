"""The kubernetes-job runtime end to end on this machine: ``overnight serve`` talks to
the fake API server through the real ``kubernetes_asyncio`` client, and the test
plays the Job controller and the kubelet (``tests/kubernetes/kubelet.py``): each
pod of the Indexed Job runs as a real ``overnight worker`` process beside a mock
engine process, on a shared SQLite store and local storage."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.e2e.helpers import assert_exactly_once, client_for, results, wait_progress, wait_status
from tests.factories import make_input_file
from tests.kubernetes.fake_apiserver import FakeApiServer
from tests.kubernetes.kubelet import Kubelet, wait_until

TEMPLATE = """\
kind: ModelDeploymentTemplate
name: tiny
version: "1"
spec:
  engine:
    type: mock
    ready_timeout_seconds: 60
  model_source: {type: local, uri: mock}
  accelerator: {type: cpu, count: 0}
  supported_endpoints: [/v1/chat/completions]
---
kind: Profile
name: cluster
store_url: "sqlite:///%(db)s"
storage_url: "file://%(files)s"
"""


class Env:
    def __init__(self, cluster: Cluster, tmp: Path, api: FakeApiServer, kubelet: Kubelet) -> None:
        self.cluster, self.tmp, self.api, self.kubelet = cluster, tmp, api, kubelet
        self.db, self.files = tmp / "shared" / "overnight.db", tmp / "shared" / "files"
        self.db.parent.mkdir(exist_ok=True)
        tdir = tmp / "templates"
        tdir.mkdir(exist_ok=True)
        (tdir / "t.yaml").write_text(TEMPLATE % {"db": self.db, "files": self.files})
        self.kubeconfig = api.write_kubeconfig(tmp / "kubeconfig")
        self.env = {
            "OVERNIGHT_RUNTIMES": "endpoint,mock,local,kubernetes-job",
            "OVERNIGHT_KUBERNETES": f"kubeconfig:{self.kubeconfig}",
            "OVERNIGHT_KUBERNETES_IMAGE": "overnight:test",
            "OVERNIGHT_KUBERNETES_POLL_S": "0.2",
            "OVERNIGHT_STORE_URL": f"sqlite:///{self.db}",
            "OVERNIGHT_STORAGE_URL": f"file://{self.files}",
        }
        self.extra = ("--templates-dir", str(tdir))

    def server(self, **env: str):
        return self.cluster.server(engine_url=None, env={**self.env, **env}, extra=self.extra,
                                   data_dir=self.tmp / "data")

    def create(self, client, n: int, *, shards: int, **ext):
        with make_input_file(self.tmp / f"in-{n}.jsonl", n, model="tiny").open("rb") as f:
            fobj = client.files.create(file=f, purpose="batch")
        return client.batches.create(
            input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="24h",
            extra_body={"overnight": {"model_template": {"name": "tiny"}, "profile": {"name": "cluster"},
                                      "runtime": {"type": "kubernetes-job", "shards": shards}, **ext}})

    def nothing_left(self, timeout_s: float = 30.0) -> None:
        wait_until(lambda: not self.api.objects("Job") and not self.api.objects("Pod"), timeout_s,
                   what="the Job and its pods to be deleted")


@pytest.fixture
def k8s(cluster: Cluster, tmp_path: Path):
    api = FakeApiServer().start()
    kubelet = Kubelet(api, tmp_path / "pods", env={"OVERNIGHT_LEASE_S": "3", "OVERNIGHT_HEARTBEAT_S": "0.5",
                                                    "OVERNIGHT_CHECKPOINT_INTERVAL_S": "0.2"}).start()
    try:
        yield Env(cluster, tmp_path, api, kubelet)
    finally:
        kubelet.stop()
        cluster.close()
        api.stop()


@pytest.mark.slow  # 15 s
def test_four_shards_finish_a_batch_with_every_line_exactly_once(k8s: Env) -> None:
    client = client_for(k8s.server().url)
    n = 20_000
    b = k8s.create(client, n, shards=4, max_concurrency=32)
    b = wait_status(client, b.id, timeout_s=180)
    assert b.status == "completed", (b.errors, k8s.kubelet.worker_logs()[-3000:])
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    assert not err and b.request_counts.completed == n
    rt = b.model_extra["overnight"]["runtime"]
    assert rt["type"] == "kubernetes-job" and rt["shards"] == 4
    # four pods ran, one per index; the Job is gone, deleted with Background propagation
    assert sorted(p.index for p in k8s.kubelet.pods.values()) == [0, 1, 2, 3]
    k8s.nothing_left()
    assert any(d.kind == "Job" and d.policy == "Background" for d in k8s.api.deletions)
    assert b.usage.total_tokens > 0


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_its_shard_continues_from_its_checkpoint(k8s: Env) -> None:
    client = client_for(k8s.server().url)
    n, window = 8_000, 8
    b = k8s.create(client, n, shards=4, max_concurrency=window)
    wait_progress(client, b.id, n // 4, timeout_s=120)
    victim = k8s.kubelet.kill_worker(0)
    b = wait_status(client, b.id, timeout_s=180)
    assert b.status == "completed", (b.errors, k8s.kubelet.worker_logs()[-3000:])
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    k8s.nothing_left()
    wait_until(lambda: all(p.exit_code is not None for p in k8s.kubelet.pods.values()), 30, what="pods reaped")
    pods0 = [p for p in k8s.kubelet.pods.values() if p.index == 0]
    assert len(pods0) == 2 and victim in pods0  # the index was retried in a new pod
    assert all(p.engine_received is not None for p in pods0), k8s.kubelet.events
    sent = sum(p.engine_received for p in pods0)
    resent = sent - n // 4
    # The new pod has a fresh filesystem (the dead pod's local spool is gone), so it
    # re-sends what was in flight plus what finished since the shard's last stored
    # checkpoint: at most the window plus one checkpoint period of lines at the most
    # this window can do (8 in flight / 20 ms = 400/s). The period is the 0.2 s
    # interval plus the checkpoint's own store write, allowed 50 ms here (a loaded
    # machine made it 89 against a bound of 88 that counted the interval alone).
    bound = window + int((0.2 + 0.05) * window / 0.020)
    assert 0 <= resent <= bound, (resent, bound, [p.engine_received for p in pods0], k8s.kubelet.events)


def test_cancel_deletes_the_job_and_writes_the_undone_lines_as_cancelled(k8s: Env) -> None:
    client = client_for(k8s.server().url)
    n = 6_000
    b = k8s.create(client, n, shards=2, max_concurrency=4)
    wait_progress(client, b.id, 50, timeout_s=120)
    client.batches.cancel(b.id)
    b = wait_status(client, b.id, timeout_s=120)
    assert b.status == "cancelled"
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    assert out and err and all(e["error"]["code"] == "batch_cancelled" for e in err)
    k8s.nothing_left()


@pytest.mark.slow
def test_expiry_deletes_the_job_and_writes_the_undone_lines_as_expired(k8s: Env) -> None:
    client = client_for(k8s.server().url)
    n = 6_000
    with make_input_file(k8s.tmp / "in-exp.jsonl", n, model="tiny").open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    b = client.batches.create(
        input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="8s",
        extra_body={"overnight": {"model_template": {"name": "tiny"}, "profile": {"name": "cluster"},
                                  "runtime": {"type": "kubernetes-job", "shards": 2}, "max_concurrency": 2}})
    b = wait_status(client, b.id, timeout_s=90)
    assert b.status == "expired", b.status
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    assert out and err and all(e["error"]["code"] == "batch_expired" for e in err)
    k8s.nothing_left()


def test_pods_that_cannot_be_scheduled_fail_the_batch_and_release_the_job(k8s: Env) -> None:
    k8s.kubelet.unschedulable = True
    client = client_for(k8s.server(OVERNIGHT_KUBERNETES_UNSCHEDULABLE_TIMEOUT_S="2").url)
    b = k8s.create(client, 50, shards=2)
    b = wait_status(client, b.id, timeout_s=60)
    assert b.status == "failed"
    msg = b.errors.data[0].message
    assert "could not be scheduled" in msg and "Insufficient nvidia.com/gpu" in msg, msg
    events = b.model_extra["overnight"]["runtime"].get("events") or []
    assert any("cannot be scheduled" in e["message"] for e in events)
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(50)})
    k8s.nothing_left()


@pytest.mark.slow
def test_a_service_killed_mid_batch_reattaches_to_its_job_and_finishes(k8s: Env) -> None:
    server = k8s.server()
    client = client_for(server.url)
    n = 6_000
    b = k8s.create(client, n, shards=2, max_concurrency=8)
    wait_progress(client, b.id, 200, timeout_s=120)
    job = k8s.api.objects("Job")[0]
    server.signal(signal.SIGKILL)
    # the Job runs on without the service
    time.sleep(1.0)
    assert k8s.api.get("Job", "default", job["metadata"]["name"]) is not None
    client = client_for(k8s.server().url)
    b = wait_status(client, b.id, timeout_s=180)
    assert b.status == "completed", b.errors
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(n)})
    k8s.nothing_left()
    # the same Job, never a second one
    assert [d.name for d in k8s.api.deletions if d.kind == "Job"] == [job["metadata"]["name"]]
    creates = [r for r in k8s.api.requests if r.method == "POST" and r.path.endswith("/jobs")]
    assert len(creates) == 1


def test_the_orphan_sweep_deletes_labelled_objects_of_unknown_batches_only(k8s: Env) -> None:
    labels = {"app.kubernetes.io/managed-by": "overnight", "overnight.dev/batch-id": "batch_" + "f" * 24}
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "ovn-leftover", "namespace": "default", "labels": labels},
           "spec": {"selector": {"app": "x"}, "ports": [{"port": 8000}]}}
    mine = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "someone-elses", "namespace": "default", "labels": {"app": "x"}},
            "spec": {"selector": {"app": "x"}, "ports": [{"port": 8000}]}}
    k8s.api.create(svc)
    k8s.api.create(mine)
    k8s.server(OVERNIGHT_KUBERNETES_SWEEP_GRACE_S="0")
    wait_until(lambda: k8s.api.get("Service", "default", "ovn-leftover") is None, 30, what="the sweep")
    assert k8s.api.get("Service", "default", "someone-elses") is not None
