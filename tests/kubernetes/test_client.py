"""overnight's Kubernetes client layer: the real kubernetes_asyncio client against the fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from overnight.errors import InvalidRequestError, KubernetesError
from overnight.runtimes.kubernetes.client import (
    BATCH_ID_LABEL,
    Kube,
    KubeConfig,
    RetryPolicy,
    WatchEvent,
    list_then_watch,
    load_config,
)
from tests.kubernetes.fake_apiserver import FakeApiServer

FAST = RetryPolicy(attempts=4, base_s=0.01, max_s=0.05)


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
async def kube(fake: FakeApiServer) -> AsyncIterator[Kube]:
    async with Kube(KubeConfig(api_url=fake.url), retry=FAST, request_timeout_s=5) as k:
        yield k


def job(name: str, batch: str | None = "b1", **labels: str) -> dict:
    if batch is not None:
        labels[BATCH_ID_LABEL] = batch
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "w", "image": "busybox"}]}}},
    }


def cm(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


OBJECTS = {
    "Job": job("j"),
    "Pod": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
    "Deployment": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {}},
                   "spec": {"selector": {"matchLabels": {"app": "d"}},
                            "template": {"metadata": {"labels": {"app": "d"}},
                                         "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}},
    "Service": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "labels": {}},
                "spec": {"selector": {"app": "d"}, "ports": [{"port": 8000}]}},
    "ConfigMap": cm("c"),
}


def no_discovery(fake: FakeApiServer) -> None:
    assert not [r.path for r in fake.requests if r.path in ("/api", "/apis", "/version") or r.path.endswith("/openapi/v2")]


# ---------------------------------------------------------------------------
# CRUD


@pytest.mark.parametrize("kind", list(OBJECTS))
async def test_crud_round_trip(fake: FakeApiServer, kube: Kube, kind: str) -> None:
    obj = OBJECTS[kind]
    name = obj["metadata"]["name"]
    created = await kube.create(obj, namespace="team")
    assert created["kind"] == kind and created["metadata"]["namespace"] == "team" and created["metadata"]["uid"]
    got = await kube.get(kind, "team", name)
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    listed = await kube.list(kind, "team")
    assert [(o["kind"], o["metadata"]["name"]) for o in listed.items] == [(kind, name)]
    assert int(listed.resource_version) == fake.resource_version
    patched = await kube.patch(kind, "team", name, {"metadata": {"labels": {"stage": "two"}}})
    assert patched["metadata"]["labels"]["stage"] == "two"
    assert fake.get(kind, "team", name)["metadata"]["labels"]["stage"] == "two"
    if kind != "ConfigMap":
        st = await kube.patch(kind, "team", name, {"status": {"observedGeneration": 7}}, status=True)
        assert st["status"]["observedGeneration"] == 7
    assert await kube.delete(kind, "team", name) is True
    await kube.wait_gone(kind, "team", name, timeout_s=2)
    assert fake.get(kind, "team", name) is None
    with pytest.raises(KubernetesError) as err:
        await kube.get(kind, "team", name)
    assert (err.value.status, err.value.reason, err.value.not_found) == (404, "NotFound", True)
    assert await kube.get_or_none(kind, "team", name) is None
    no_discovery(fake)


async def test_strategic_patch_merges_conditions(fake: FakeApiServer, kube: Kube) -> None:
    await kube.create(job("j"))
    await kube.patch("Job", "default", "j", {"status": {"conditions": [{"type": "Suspended", "status": "True"}]}},
                     status=True)
    out = await kube.patch("Job", "default", "j", {"status": {"conditions": [{"type": "Complete", "status": "True"}]}},
                           status=True, strategy="strategic")
    assert [c["type"] for c in out["status"]["conditions"]] == ["Suspended", "Complete"]
    assert fake.requests[-1].content_type == "application/strategic-merge-patch+json"
    # a resourceVersion in the patch is a precondition
    with pytest.raises(KubernetesError) as err:
        await kube.patch("Job", "default", "j", {"metadata": {"resourceVersion": "1", "labels": {"x": "y"}}})
    assert (err.value.status, err.value.reason) == (409, "Conflict")


async def test_bad_input_names_the_field(kube: Kube) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await kube.get("Secret", "default", "x")
    assert err.value.param == "kind"
    with pytest.raises(InvalidRequestError) as err:
        await kube.create({"kind": "Job", "metadata": {}})
    assert err.value.param == "metadata.name"
    with pytest.raises(InvalidRequestError) as err:
        await kube.patch("ConfigMap", "default", "c", {}, status=True)
    assert err.value.param == "status"
    with pytest.raises(KubernetesError) as api_err:  # the server's own validation comes back as 422
        await kube.create(job("j", batch="x" * 64))
    assert (api_err.value.status, api_err.value.reason) == (422, "Invalid")


# ---------------------------------------------------------------------------
# idempotent create


async def test_create_is_idempotent_for_the_same_batch(fake: FakeApiServer, kube: Kube) -> None:
    first = await kube.create(job("j", batch="b1"))
    again = await kube.create(job("j", batch="b1"))
    assert again["metadata"]["uid"] == first["metadata"]["uid"]
    assert len(fake.objects("Job", "default")) == 1


async def test_create_conflicts_with_another_batch_or_an_unlabelled_object(fake: FakeApiServer, kube: Kube) -> None:
    await kube.create(job("j", batch="b1"))
    with pytest.raises(KubernetesError) as err:
        await kube.create(job("j", batch="b2"))
    assert (err.value.status, err.value.reason, err.value.already_exists) == (409, "AlreadyExists", True)
    assert "'b1'" in err.value.message and "'b2'" in err.value.message
    fake.create(cm("c"))  # someone else's, no batch label
    with pytest.raises(KubernetesError) as err:
        await kube.create(cm("c", **{BATCH_ID_LABEL: "b1"}))
    assert err.value.status == 409 and "no overnight.dev/batch-id label" in err.value.message
    with pytest.raises(KubernetesError):  # a body without the label never adopts anything
        await kube.create(cm("c"))


async def test_create_refuses_an_object_of_the_batch_being_deleted(fake: FakeApiServer, kube: Kube) -> None:
    fake.create(job("j", batch="b1") | {"metadata": {"name": "j", "labels": {BATCH_ID_LABEL: "b1"},
                                                     "finalizers": ["test/hold"]}})
    fake.delete("Job", "default", "j")
    with pytest.raises(KubernetesError) as err:
        await kube.create(job("j", batch="b1"))
    assert err.value.status == 409 and "being deleted" in err.value.message


async def test_create_whose_answer_was_lost_returns_the_object_it_made(fake: FakeApiServer, kube: Kube) -> None:
    fake.fail_next(503, method="POST", after_apply=True)  # created, then the answer is a 503
    made = await kube.create(job("j", batch="b1"))
    assert made["metadata"]["uid"] == fake.get("Job", "default", "j")["metadata"]["uid"]
    assert [r.method for r in fake.requests] == ["POST", "POST", "GET"]  # retry -> 409 -> read it back


# ---------------------------------------------------------------------------
# delete and wait_gone


async def test_delete_sends_the_propagation_policy_and_404_is_success(fake: FakeApiServer, kube: Kube) -> None:
    await kube.create(job("j"))
    fake.add_job_pod("default", "j")
    assert await kube.delete("Job", "default", "j") is True
    assert [(d.kind, d.name, d.policy) for d in fake.deletions] == [("Job", "j", "Background")]
    assert fake.objects("Pod", "default") == []  # Background took the pods with it
    assert await kube.delete("Job", "default", "j") is False
    assert await kube.delete("Job", "default", "never-was", propagation="Foreground") is False


async def test_delete_with_uid_leaves_a_newer_incarnation_alone(fake: FakeApiServer, kube: Kube) -> None:
    old = await kube.create(cm("c", **{BATCH_ID_LABEL: "b1"}))
    fake.delete("ConfigMap", "default", "c")
    new = fake.create(cm("c"))
    assert await kube.delete("ConfigMap", "default", "c", uid=old["metadata"]["uid"]) is False
    assert fake.get("ConfigMap", "default", "c")["metadata"]["uid"] == new["metadata"]["uid"]
    await kube.wait_gone("ConfigMap", "default", "c", timeout_s=1, uid=old["metadata"]["uid"])


async def test_wait_gone_waits_for_finalizers_and_says_what_holds(fake: FakeApiServer, kube: Kube) -> None:
    fake.create(job("j") | {"metadata": {"name": "j", "labels": {}, "finalizers": ["test.overnight.dev/hold"]}})
    assert await kube.delete("Job", "default", "j") is True
    assert fake.get("Job", "default", "j")["metadata"]["deletionTimestamp"]
    with pytest.raises(KubernetesError) as err:
        await kube.wait_gone("Job", "default", "j", timeout_s=0.3, poll_s=0.05)
    assert err.value.reason == "Timeout" and err.value.status is None
    assert "test.overnight.dev/hold" in err.value.message
    timer = threading.Timer(0.3, fake.remove_finalizers, ("Job", "default", "j"))
    timer.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await kube.wait_gone("Job", "default", "j", timeout_s=5, poll_s=0.05)
    assert loop.time() - t0 >= 0.25 and fake.get("Job", "default", "j") is None
    timer.join()


async def test_foreground_delete_is_gone_only_after_its_pods() -> None:
    with FakeApiServer(pod_grace_s=0.4) as fake:
        async with Kube(KubeConfig(api_url=fake.url), retry=FAST) as kube:
            await kube.create(job("j"))
            pods = [fake.add_job_pod("default", "j", index=i)["metadata"]["name"] for i in range(2)]
            await kube.delete("Job", "default", "j", propagation="Foreground")
            assert fake.get("Job", "default", "j") is not None  # pods still terminating
            await kube.wait_gone("Job", "default", "j", timeout_s=5, poll_s=0.05)
            assert all(fake.get("Pod", "default", p) is None for p in pods)
            assert fake.deletions[0].policy == "Foreground"


# ---------------------------------------------------------------------------
# selectors, logs


async def test_label_and_field_selectors(fake: FakeApiServer, kube: Kube) -> None:
    fake.create(cm("a", app="web", tier="front"))
    fake.create(cm("b", app="web"))
    fake.create(cm("c", app="db"))
    fake.create(cm("a", app="web") | {"metadata": {"name": "a", "namespace": "other", "labels": {"app": "web"}}})

    async def names(ns: str | None = "default", **kw: object) -> list[str]:
        return [o["metadata"]["name"] for o in (await kube.list("ConfigMap", ns, **kw)).items]  # type: ignore[arg-type]

    assert await names(label_selector={"app": "web"}) == ["a", "b"]
    assert await names(label_selector={"app": "web", "tier": "front"}) == ["a"]
    assert await names(label_selector="app in (db),!tier") == ["c"]
    assert await names(label_selector="app notin (web)") == ["c"]
    assert await names(label_selector="tier") == ["a"]
    assert await names(field_selector="metadata.name=b") == ["b"]
    assert sorted(await names(None, label_selector="app=web")) == ["a", "a", "b"]
    with pytest.raises(KubernetesError) as err:
        await kube.list("ConfigMap", "default", label_selector="app in ()")
    assert (err.value.status, err.value.reason) == (400, "BadRequest")


async def test_pod_logs(fake: FakeApiServer, kube: Kube) -> None:
    await kube.create(job("j"))
    pod = fake.add_job_pod("default", "j", containers=("worker", "engine"))["metadata"]["name"]
    fake.set_log("default", pod, "line 1\nline 2\n", container="worker")
    assert await kube.logs("default", pod, container="worker") == "line 1\nline 2\n"
    assert await kube.logs("default", pod, container="worker", tail_lines=1) == "line 2\n"
    with pytest.raises(KubernetesError) as err:
        await kube.logs("default", pod)
    assert err.value.status == 400 and "container name must be specified" in err.value.message


# ---------------------------------------------------------------------------
# retries and errors


async def test_transient_errors_are_retried(fake: FakeApiServer, kube: Kube) -> None:
    fake.create(cm("c"))
    fake.fail_next(500, times=2, method="GET")
    assert (await kube.get("ConfigMap", "default", "c"))["metadata"]["name"] == "c"
    fake.fail_next(429, times=1, retry_after=0)
    fake.fail_next(0, times=1)  # a dropped connection
    assert (await kube.get("ConfigMap", "default", "c"))["metadata"]["name"] == "c"
    assert len([r for r in fake.requests if r.method == "GET"]) == 6


async def test_retries_are_bounded_and_the_error_carries_the_status(fake: FakeApiServer, kube: Kube) -> None:
    fake.fail_next(429, times=100, retry_after=0, message="slow down")
    with pytest.raises(KubernetesError) as err:
        await kube.list("Job", "default")
    assert (err.value.status, err.value.reason, err.value.retryable) == (429, "TooManyRequests", True)
    assert "slow down" in err.value.message
    assert len(fake.requests) == FAST.attempts
    fake.clear_faults()
    fake.fail_next(503, times=100)
    fake.clear_requests()
    with pytest.raises(KubernetesError) as err:
        await kube.delete("Job", "default", "j")
    assert err.value.status == 503 and len(fake.requests) == FAST.attempts


async def test_client_errors_are_not_retried(fake: FakeApiServer, kube: Kube) -> None:
    fake.fail_next(403, message='jobs.batch is forbidden: User "x" cannot list resource "jobs"')
    with pytest.raises(KubernetesError) as err:
        await kube.list("Job", "default")
    assert (err.value.status, err.value.reason, err.value.retryable) == (403, "Forbidden", False)
    assert "forbidden" in str(err.value) and len(fake.requests) == 1


async def test_an_unreachable_server_is_a_connection_error() -> None:
    with FakeApiServer() as fake:
        url = fake.url
    async with Kube(KubeConfig(api_url=url), retry=FAST, request_timeout_s=2) as kube:
        with pytest.raises(KubernetesError) as err:
            await kube.get("Job", "default", "j")
    assert (err.value.status, err.value.reason, err.value.retryable) == (None, "ConnectionError", True)


# ---------------------------------------------------------------------------
# list_then_watch


class Collector:
    """Consumes a watch in the background, as a runtime does, so its watches stay open between checks."""

    def __init__(self, events: AsyncIterator[WatchEvent]) -> None:
        self.queue: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(events))

    async def _run(self, events: AsyncIterator[WatchEvent]) -> None:
        try:
            async for ev in events:
                self.queue.put_nowait(ev)
        except Exception as exc:  # handed to the test by take()
            self.queue.put_nowait(exc)

    async def _next(self, timeout: float) -> WatchEvent:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def take(self, until: str = "SYNCED", timeout: float = 10) -> list[WatchEvent]:
        """Events up to and including the first of type ``until``."""
        out = [await self._next(timeout)]
        while out[-1].type != until:
            out.append(await self._next(timeout))
        return out

    async def take_n(self, n: int, timeout: float = 10) -> list[WatchEvent]:
        return [await self._next(timeout) for _ in range(n)]

    def pending(self) -> int:
        return self.queue.qsize()


@contextlib.asynccontextmanager
async def collect(events: AsyncIterator[WatchEvent]) -> AsyncIterator[Collector]:
    collector = Collector(events)
    try:
        yield collector
    finally:
        collector.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector.task


async def until(predicate: Callable[[], object], timeout: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def summary(events: list[WatchEvent]) -> list[tuple[str, str | None]]:
    return [(e.type, e.name) for e in events]


def watch_requests(fake: FakeApiServer) -> list[dict[str, str]]:
    return [r.query for r in fake.requests if r.query.get("watch")]


async def test_list_then_watch_sees_changes_in_order(fake: FakeApiServer, kube: Kube) -> None:
    fake.create(cm("a", app="web"))
    fake.create(cm("b", app="web"))
    fake.create(cm("x", app="other"))
    async with collect(list_then_watch(kube, "ConfigMap", "default", label_selector={"app": "web"},
                                       timeout_s=30)) as events:
        start = await events.take()
        assert summary(start) == [("ADDED", "a"), ("ADDED", "b"), ("SYNCED", None)]
        assert start[0].object["kind"] == "ConfigMap"
        fake.create(cm("c", app="web"))
        fake.patch("ConfigMap", "default", "a", {"data": {"k": "changed"}})
        fake.patch("ConfigMap", "default", "x", {"data": {"k": "changed"}})  # not selected
        fake.delete("ConfigMap", "default", "b")
        fake.patch("ConfigMap", "default", "c", {"metadata": {"labels": {"app": "db"}}})  # leaves the selection
        changes = await events.take_n(4)
        await asyncio.sleep(0.2)
        assert events.pending() == 0  # nothing else (x is not selected)
    assert summary(changes) == [("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "b"), ("DELETED", "c")]
    assert changes[1].object["data"] == {"k": "changed"}
    rvs = [int(e.resource_version) for e in changes]
    assert rvs == sorted(rvs)
    # the watch started from the list's resourceVersion, with bookmarks allowed
    first = watch_requests(fake)[0]
    assert first["resourceVersion"] == start[-1].resource_version and first["allowWatchBookmarks"].lower() == "true"
    no_discovery(fake)


async def test_list_then_watch_survives_server_timeouts(fake: FakeApiServer, kube: Kube) -> None:
    fake.create(cm("a"))
    async with collect(list_then_watch(kube, "ConfigMap", "default", timeout_s=1)) as events:
        await events.take()
        await until(lambda: len(watch_requests(fake)) >= 2)  # the first watch timed out on the server
        fake.create(cm("b"))
        assert summary(await events.take_n(1)) == [("ADDED", "b")]
        opened = len(watch_requests(fake))
        fake.close_watches()  # the server ends the open watch early
        await until(lambda: len(watch_requests(fake)) > opened)
        fake.create(cm("c"))
        assert summary(await events.take_n(1)) == [("ADDED", "c")]
    watches = watch_requests(fake)
    assert all(q["resourceVersion"] for q in watches)  # never a fresh watch from "now"
    rvs = [int(q["resourceVersion"]) for q in watches]
    assert rvs == sorted(rvs) and rvs[-1] >= fake.resource_version - 1  # each watch went on from the last seen
    assert sum(1 for r in fake.requests if r.method == "GET" and not r.query.get("watch")) == 1  # listed once


async def test_list_then_watch_resumes_from_bookmarks(fake: FakeApiServer, kube: Kube) -> None:
    fake.create(cm("a", app="web"))
    async with collect(list_then_watch(kube, "ConfigMap", "default", label_selector="app=web",
                                       timeout_s=30)) as events:
        await events.take()
        await until(fake.watches_open)
        for n in range(3):
            fake.create(cm(f"other-{n}", app="db"))  # moves the RV on; nothing for this watch
        bookmark_rv = fake.resource_version
        fake.send_bookmarks()
        await asyncio.sleep(0.3)
        fake.close_watches()
        await until(lambda: len(watch_requests(fake)) == 2)
        fake.create(cm("b", app="web"))
        got = await events.take_n(1)
    assert summary(got) == [("ADDED", "b")]
    assert watch_requests(fake)[1]["resourceVersion"] == str(bookmark_rv)


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_list_then_watch_recovers_from_410_with_an_exact_view(kube: Kube, fake: FakeApiServer, as_http: bool) -> None:
    fake.expired_as_http = as_http
    for name in ("a", "b", "c", "e"):
        fake.create(cm(name, app="web"))
    async with collect(list_then_watch(kube, "ConfigMap", "default", label_selector="app=web",
                                       timeout_s=30)) as events:
        await events.take()
        await until(fake.watches_open)
        old_e = fake.get("ConfigMap", "default", "e")
        with fake.atomically():  # changes the watch never delivers, then the server forgets them
            fake.close_watches()
            fake.delete("ConfigMap", "default", "b")
            fake.patch("ConfigMap", "default", "a", {"data": {"k": "new"}})
            fake.create(cm("d", app="web"))
            fake.delete("ConfigMap", "default", "e")
            fake.create(cm("e", app="web"))  # same name, a new object
            fake.patch("ConfigMap", "default", "c", {"metadata": {"labels": {"app": "db"}}})
            fake.expire_history()
        resync = await events.take()
        fake.create(cm("f", app="web"))
        after = await events.take_n(1)
    assert summary(resync) == [
        ("DELETED", "b"), ("DELETED", "c"), ("DELETED", "e"),
        ("MODIFIED", "a"), ("ADDED", "d"), ("ADDED", "e"), ("SYNCED", None)]
    assert resync[2].object["metadata"]["uid"] == old_e["metadata"]["uid"]
    assert resync[5].object["metadata"]["uid"] == fake.get("ConfigMap", "default", "e")["metadata"]["uid"]
    assert resync[3].object["data"] == {"k": "new"}
    assert summary(after) == [("ADDED", "f")]
    lists = [r for r in fake.requests if r.method == "GET" and not r.query.get("watch")]
    assert len(lists) == 2 and "resourceVersion" not in lists[1].query  # re-listed from the latest state


async def test_list_then_watch_retries_transient_watch_failures(fake: FakeApiServer, kube: Kube) -> None:
    fake.create(cm("a"))
    fake.fail_next(503, times=2, watch=True)
    fake.fail_next(0, times=1, watch=True)
    async with collect(list_then_watch(kube, "ConfigMap", "default", timeout_s=30)) as events:
        await events.take()
        await until(fake.watches_open)
        fake.create(cm("b"))
        assert summary(await events.take_n(1)) == [("ADDED", "b")]
    assert len(watch_requests(fake)) == 4


async def test_a_watch_that_ends_cleanly_resets_the_failure_count(fake: FakeApiServer, kube: Kube) -> None:
    fake.fail_next(503, times=FAST.attempts - 1, watch=True)
    async with collect(list_then_watch(kube, "ConfigMap", "default", timeout_s=1)) as events:
        await events.take()
        await until(fake.watches_open)  # the last retry got through; the server ends it after 1 s
        fake.fail_next(503, times=FAST.attempts - 1, watch=True)
        await until(lambda: len(watch_requests(fake)) == 2 * FAST.attempts)
        fake.create(cm("b"))
        assert summary(await events.take_n(1)) == [("ADDED", "b")]


async def test_list_then_watch_gives_up_after_bounded_failures(fake: FakeApiServer, kube: Kube) -> None:
    fake.fail_next(500, times=100, watch=True, message="etcd is down")
    async with collect(list_then_watch(kube, "ConfigMap", "default", timeout_s=30)) as events:
        await events.take()
        with pytest.raises(KubernetesError) as err:
            await events.take_n(1)
    assert err.value.status == 500 and "etcd is down" in err.value.message
    assert len(watch_requests(fake)) == FAST.attempts


async def test_list_then_watch_raises_what_retrying_cannot_fix(fake: FakeApiServer, kube: Kube) -> None:
    fake.fail_next(403, watch=True)
    async with collect(list_then_watch(kube, "ConfigMap", "default")) as events:
        await events.take()
        with pytest.raises(KubernetesError) as err:
            await events.take_n(1)
    assert err.value.status == 403 and len(watch_requests(fake)) == 1


# ---------------------------------------------------------------------------
# configuration


async def test_kubeconfig_file(tmp_path: Path) -> None:
    with FakeApiServer(token="user-token") as fake:
        path = fake.write_kubeconfig(tmp_path / "config", namespace="team-a")
        async with Kube(KubeConfig(kubeconfig=str(path)), retry=FAST) as kube:
            assert kube.namespace == "team-a" and str(path) in kube.source
            await kube.create(cm("c"))
        assert fake.get("ConfigMap", "team-a", "c") is not None
        assert {r.authorization for r in fake.requests} == {"Bearer user-token"}
        wrong = fake.write_kubeconfig(tmp_path / "wrong", token="not-it")
        async with Kube(KubeConfig(kubeconfig=str(wrong)), retry=FAST) as kube:
            with pytest.raises(KubernetesError) as err:
                await kube.get("ConfigMap", "team-a", "c")
        assert (err.value.status, err.value.reason) == (401, "Unauthorized")


async def test_kubeconfig_from_the_environment(tmp_path: Path, fake: FakeApiServer) -> None:
    path = fake.write_kubeconfig(tmp_path / "config", namespace="from-env")
    resolved = await load_config(environ={"KUBECONFIG": str(path), "KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert resolved.namespace == "from-env" and resolved.configuration.host == fake.url
    explicit = await load_config(KubeConfig(kubeconfig=str(path), namespace="mine"), environ={})
    assert explicit.namespace == "mine"


async def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(KubernetesError) as err:
        await load_config(KubeConfig(kubeconfig=str(tmp_path / "missing")))
    assert err.value.reason == "ConfigError" and "missing" in err.value.message
    (tmp_path / "bad").write_text("apiVersion: v1\nkind: Config\ncurrent-context: nope\ncontexts: []\n")
    with pytest.raises(KubernetesError) as err:
        await load_config(KubeConfig(kubeconfig=str(tmp_path / "bad")))
    assert err.value.reason == "ConfigError"
    with pytest.raises(KubernetesError) as err:
        await load_config(environ={"HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")})
    assert err.value.reason == "ConfigError" and "KUBECONFIG" in err.value.message
    with pytest.raises(KubernetesError) as err:
        await load_config(KubeConfig(in_cluster=True, service_account_dir=str(tmp_path)),
                          environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "1"})
    assert err.value.reason == "ConfigError" and "token" in err.value.message.lower()


async def test_in_cluster_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeApiServer(tls=True, token="sa-token") as fake:
        sa = tmp_path / "serviceaccount"
        sa.mkdir()
        (sa / "token").write_text("sa-token")
        assert fake.ca_path is not None
        (sa / "ca.crt").write_bytes(fake.ca_path.read_bytes())
        (sa / "namespace").write_text("batch-ns\n")
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
        async with Kube(KubeConfig(in_cluster=True, service_account_dir=str(sa)), retry=FAST) as kube:
            assert kube.namespace == "batch-ns" and fake.url.startswith("https://")
            await kube.create(job("j"))
            assert (await kube.list("Job", "batch-ns")).items[0]["metadata"]["name"] == "j"
        assert {r.authorization for r in fake.requests} == {"Bearer sa-token"}
        # a CA that did not sign the server's certificate: refused, as a connection error
        with FakeApiServer(tls=True) as other:
            assert other.ca_path is not None
            (sa / "ca.crt").write_bytes(other.ca_path.read_bytes())
        async with Kube(KubeConfig(in_cluster=True, service_account_dir=str(sa)), retry=FAST) as kube:
            with pytest.raises(KubernetesError) as err:
                await kube.get("Job", "batch-ns", "j")
        assert err.value.reason == "ConnectionError" and "certificate" in err.value.message.lower()
