"""The test plays the Deployment controller and the kubelet for engine Deployments
in the fake API server: a mock engine process on a fixed port for a Deployment
that appears (that port is what ``OVERNIGHT_KUBERNETES_SERVICE_URL`` points at,
so one engine Deployment at a time can run), its pod, and ``readyReplicas``.

``problem`` holds new pods back as a cluster would: ``"unschedulable"`` (a
``PodScheduled=False/Unschedulable`` condition) or ``"image_pull"`` (the engine
container waiting in ``ImagePullBackOff``); set it back to None and the held
pods start. A Deployment that goes (deleted with Background propagation, which
takes its pods along in the fake API server) has its engine stopped.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.kubernetes.fake_apiserver import FakeApiServer
from tests.kubernetes.kubelet import wait_until

PROBLEMS: dict[str, dict] = {
    "unschedulable": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]},
    "image_pull": {"phase": "Pending", "containerStatuses": [{
        "name": "engine", "ready": False, "restartCount": 0, "image": "vllm/vllm-openai:nope",
        "state": {"waiting": {"reason": "ImagePullBackOff",
                              "message": 'Back-off pulling image "vllm/vllm-openai:nope"'}}}]},
}


def up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Controller:
    """Runs a mock engine for each engine Deployment and reports its replicas ready
    (or holds its pod back while ``problem`` is set); stops the engine when its
    Deployment goes."""

    def __init__(self, api: FakeApiServer, port: int, workdir: Path) -> None:
        self.api, self.port, self.workdir = api, port, workdir
        self.problem: str | None = None
        self.engine: subprocess.Popen | None = None
        #: uid of the Deployment the engine runs for
        self.engine_for: str | None = None
        self.seen: set[str] = set()
        #: uid -> (namespace, pod name) of pods held back by a problem
        self.held: dict[str, tuple[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def unschedulable(self) -> bool:
        return self.problem == "unschedulable"

    @unschedulable.setter
    def unschedulable(self, value: bool) -> None:
        self.problem = "unschedulable" if value else None

    def start(self) -> Controller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            deps = self.api.objects("Deployment")
            for d in deps:
                md = d["metadata"]
                if md["uid"] in self.seen:
                    continue
                self.seen.add(md["uid"])
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": md["name"] + "-abc12", "namespace": md["namespace"],
                                    "labels": d["spec"]["template"]["metadata"]["labels"],
                                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                         "name": md["name"], "uid": md["uid"], "controller": True}]},
                       "spec": d["spec"]["template"]["spec"], "status": {"phase": "Pending"}}
                self.api.create(pod)
                if self.problem is not None:
                    self.api.set_status("Pod", md["namespace"], pod["metadata"]["name"], PROBLEMS[self.problem])
                    self.held[md["uid"]] = (md["namespace"], pod["metadata"]["name"])
                    continue
                self._start_engine(d, pod["metadata"]["name"])
            live = {d["metadata"]["uid"]: d for d in deps}
            if self.problem is None:
                for uid, (_ns, pod_name) in list(self.held.items()):
                    del self.held[uid]
                    if uid in live:
                        self._start_engine(live[uid], pod_name)
            if self.engine is not None and self.engine_for not in live:
                self.engine.terminate()
                self.engine.wait(10)
                self.engine = self.engine_for = None

    def _start_engine(self, d: dict, pod_name: str) -> None:
        md = d["metadata"]
        log = (self.workdir / f"engine-{md['name']}.log").open("ab")
        self.engine = subprocess.Popen(
            [sys.executable, "-m", "overnight.cli.main", "mock-engine", "--port", str(self.port),
             "--latency-ms", "10"], stdout=log, stderr=subprocess.STDOUT)
        self.engine_for = md["uid"]
        wait_until(lambda: up(self.port), 30, what="the mock engine")
        if self.api.get("Pod", md["namespace"], pod_name) is not None:
            self.api.set_status("Pod", md["namespace"], pod_name, {"phase": "Running"})
        if self.api.get("Deployment", md["namespace"], md["name"]) is not None:
            self.api.set_status("Deployment", md["namespace"], md["name"], {
                "replicas": d["spec"]["replicas"], "readyReplicas": d["spec"]["replicas"],
                "availableReplicas": d["spec"]["replicas"]})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.engine is not None:
            self.engine.kill()
            self.engine.wait()
