"""The fake API server speaks the real API's wire shapes (tested with plain HTTP, not the client).

These pin the behaviour the client tests rely on: if the fake drifted from
the real server (410 as an ERROR event, Status bodies, selector semantics),
the client tests would prove nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.kubernetes.fake_apiserver import FakeApiServer, parse_label_selector

JOBS = "/apis/batch/v1/namespaces/default/jobs"
PODS = "/api/v1/namespaces/default/pods"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def http(fake: FakeApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        yield client


def job(name: str, **labels: str) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "w", "image": "busybox"}]}}},
    }


def cm(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


def watch_events(http: httpx.Client, path: str, stop_after: int | None = None, into: list[dict] | None = None,
                 **params: str) -> tuple[int, list[dict]]:
    """A watch request's status and events (appended to ``into`` as they come), read until the
    server ends it (or stop_after events)."""
    events: list[dict] = [] if into is None else into
    with http.stream("GET", path, params={"watch": "1", **params}) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, [resp.json()]
        for line in resp.iter_lines():
            if line.strip():
                events.append(orjson.loads(line))
                if stop_after is not None and len(events) >= stop_after:
                    break
    return 200, events


def test_create_get_and_error_statuses(fake: FakeApiServer, http: httpx.Client) -> None:
    r = http.post(JOBS, json=job("a", team="x"))
    assert r.status_code == 201
    created = r.json()
    md = created["metadata"]
    assert md["namespace"] == "default" and md["uid"] and md["creationTimestamp"].endswith("Z")
    assert md["generation"] == 1 and md["resourceVersion"] == str(fake.resource_version)
    # the API server's Job defaults: selector and pod labels from the uid
    assert created["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": md["uid"]}}
    assert created["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "a"
    assert http.get(f"{JOBS}/a").json()["metadata"]["uid"] == md["uid"]

    dup = http.post(JOBS, json=job("a"))
    assert dup.status_code == 409
    assert dup.json() | {"details": None} == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'jobs.batch "a" already exists', "reason": "AlreadyExists", "code": 409, "details": None,
    }
    missing = http.get(f"{JOBS}/nope")
    assert (missing.status_code, missing.json()["reason"], missing.json()["message"]) == (
        404, "NotFound", 'jobs.batch "nope" not found')
    too_long = http.post(JOBS, json=job("b", batch="x" * 64))
    assert too_long.status_code == 422 and too_long.json()["reason"] == "Invalid"
    assert "63" in too_long.json()["message"]
    bad_ns = http.post(JOBS, json=job("c") | {"metadata": {"name": "c", "namespace": "other"}})
    assert bad_ns.status_code == 400
    # discovery is not served (a client that needs it fails loudly here)
    assert http.get("/apis").status_code == 404


def test_resource_version_is_global_and_monotonic(fake: FakeApiServer, http: httpx.Client) -> None:
    rvs = [int(http.post(JOBS, json=job("a")).json()["metadata"]["resourceVersion"])]
    rvs.append(int(http.post(CONFIGMAPS, json=cm("b")).json()["metadata"]["resourceVersion"]))
    rvs.append(int(http.patch(f"{JOBS}/a", json={"metadata": {"labels": {"x": "1"}}},
                              headers={"Content-Type": "application/merge-patch+json"}).json()["metadata"]["resourceVersion"]))
    assert rvs == sorted(rvs) and len(set(rvs)) == 3
    listed = http.get(CONFIGMAPS).json()
    assert listed["kind"] == "ConfigMapList" and listed["metadata"]["resourceVersion"] == str(rvs[-1])
    assert "kind" not in listed["items"][0]  # list items come without kind, as from a real server


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", {"a", "b"}),
        ("app==web", {"a", "b"}),
        ("app!=web", {"c", "d"}),  # no label at all matches !=
        ("tier", {"a", "c"}),
        ("!tier", {"b", "d"}),
        ("app in (web, db)", {"a", "b", "c"}),
        ("app notin (web)", {"c", "d"}),
        ("app=web,tier=front", {"a"}),
        ("app in (web),!tier", {"b"}),
        ("", {"a", "b", "c", "d"}),
    ],
)
def test_label_selectors(fake: FakeApiServer, http: httpx.Client, selector: str, expected: set[str]) -> None:
    fake.create(cm("a", app="web", tier="front"))
    fake.create(cm("b", app="web"))
    fake.create(cm("c", app="db", tier="back"))
    fake.create(cm("d"))
    items = http.get(CONFIGMAPS, params={"labelSelector": selector}).json()["items"]
    assert {i["metadata"]["name"] for i in items} == expected
    assert {o["metadata"]["name"] for o in fake.objects("ConfigMap", "default", selector)} == expected


def test_bad_selectors_are_400(http: httpx.Client) -> None:
    for sel in ("app in ()", "a b c", "=x"):
        r = http.get(CONFIGMAPS, params={"labelSelector": sel})
        assert (r.status_code, r.json()["reason"]) == (400, "BadRequest"), sel
    r = http.get(CONFIGMAPS, params={"fieldSelector": "spec.nodeName=x"})
    assert r.status_code == 400 and "field label not supported" in r.json()["message"]
    with pytest.raises(ValueError):
        parse_label_selector("a in (x")


def test_field_selector_and_namespaces(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(cm("a"))
    fake.create(cm("b"))
    fake.create(cm("a") | {"metadata": {"name": "a", "namespace": "other"}})
    assert [i["metadata"]["name"] for i in http.get(CONFIGMAPS, params={"fieldSelector": "metadata.name=a"}).json()["items"]] == ["a"]
    assert [i["metadata"]["name"] for i in http.get(CONFIGMAPS, params={"fieldSelector": "metadata.name!=a"}).json()["items"]] == ["b"]
    everywhere = http.get("/api/v1/configmaps").json()["items"]
    assert sorted((i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere) == [
        ("default", "a"), ("default", "b"), ("other", "a")]


def test_watch_streams_changes_from_a_resource_version(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(cm("a"))
    rv = http.get(CONFIGMAPS).json()["metadata"]["resourceVersion"]
    fake.create(cm("b"))
    fake.patch("ConfigMap", "default", "a", {"data": {"k": "w"}})
    fake.delete("ConfigMap", "default", "b")
    status, events = watch_events(http, CONFIGMAPS, resourceVersion=rv, timeoutSeconds="1")
    assert status == 200
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and events[0]["object"]["kind"] == "ConfigMap"


def test_watch_without_resource_version_starts_with_the_current_state(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(cm("a"))
    fake.create(cm("b"))
    _, events = watch_events(http, CONFIGMAPS, timeoutSeconds="1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_from_a_compacted_resource_version_is_410_expired(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(cm("a"))
    old = str(fake.resource_version)
    fake.create(cm("b"))
    fake.create(cm("c"))
    fake.compact(keep=1)  # only c's event remains: watching from a's RV would miss b
    status, events = watch_events(http, CONFIGMAPS, resourceVersion=old, timeoutSeconds="5")
    assert status == 200  # the real server answers 200, then one ERROR event
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    err = events[0]["object"]
    assert (err["kind"], err["code"], err["reason"], err["status"]) == ("Status", 410, "Expired", "Failure")
    assert err["message"].startswith(f"too old resource version: {old}")
    # the RV just before the kept history is still fine
    status, events = watch_events(http, CONFIGMAPS, resourceVersion=str(fake.resource_version - 1), timeoutSeconds="1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "c")]
    fake.expire_history()
    status, events = watch_events(http, CONFIGMAPS, resourceVersion=str(fake.resource_version - 1), timeoutSeconds="1")
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_bounded_history_expires_old_versions_by_itself() -> None:
    with FakeApiServer(history=3, expired_as_http=True) as fake, httpx.Client(base_url=fake.url) as http:
        fake.create(cm("a"))
        first = str(fake.resource_version)
        for n in range(4):
            fake.patch("ConfigMap", "default", "a", {"data": {"n": str(n)}})
        status, body = watch_events(http, CONFIGMAPS, resourceVersion=first, timeoutSeconds="1")
        assert status == 410 and body[0]["reason"] == "Expired"


def test_watch_selector_transitions_and_bookmarks(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(cm("a", app="web"))
    rv = str(fake.resource_version)
    got: list[dict] = []

    def read() -> None:
        watch_events(http, CONFIGMAPS, stop_after=3, into=got, resourceVersion=rv, labelSelector="app=web",
                     allowWatchBookmarks="true", timeoutSeconds="5")

    reader = threading.Thread(target=read)
    reader.start()
    fake.patch("ConfigMap", "default", "a", {"metadata": {"labels": {"app": "db"}}})  # leaves the selection
    fake.patch("ConfigMap", "default", "a", {"metadata": {"labels": {"app": "web"}}})  # comes back
    while len(got) < 2 and reader.is_alive():
        reader.join(0.05)
    fake.create(cm("z", app="other"))  # not selected, but moves the RV on
    fake.send_bookmarks()
    reader.join(5)
    assert [e["type"] for e in got] == ["DELETED", "ADDED", "BOOKMARK"]
    bookmark = got[2]["object"]
    assert bookmark["kind"] == "ConfigMap" and bookmark["metadata"] == {"resourceVersion": str(fake.resource_version)}


def test_watch_ends_at_its_timeout(fake: FakeApiServer, http: httpx.Client) -> None:
    status, events = watch_events(http, CONFIGMAPS, resourceVersion=str(fake.resource_version), timeoutSeconds="1")
    assert (status, events) == (200, [])


def test_patches_status_subresource_and_preconditions(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(job("a"))
    merge = {"Content-Type": "application/merge-patch+json"}
    smp = {"Content-Type": "application/strategic-merge-patch+json"}
    # the main resource ignores status; /status ignores everything else
    r = http.patch(f"{JOBS}/a", json={"status": {"active": 3}, "metadata": {"labels": {"l": "1"}}}, headers=merge)
    assert r.json()["metadata"]["labels"] == {"l": "1"} and r.json()["status"] == {}
    r = http.patch(f"{JOBS}/a/status", json={"status": {"active": 2}, "spec": {"parallelism": 9}}, headers=merge)
    assert r.json()["status"] == {"active": 2} and r.json()["spec"]["parallelism"] == 1
    # strategic merge: conditions merge by type (merge patch would replace the list)
    cond = {"type": "Complete", "status": "True"}
    http.patch(f"{JOBS}/a/status", json={"status": {"conditions": [{"type": "Suspended", "status": "False"}]}}, headers=smp)
    r = http.patch(f"{JOBS}/a/status", json={"status": {"conditions": [cond]}}, headers=smp)
    assert [c["type"] for c in r.json()["status"]["conditions"]] == ["Suspended", "Complete"]
    r = http.patch(f"{JOBS}/a/status", json={"status": {"conditions": [cond]}}, headers=merge)
    assert r.json()["status"]["conditions"] == [cond]
    # generation follows spec changes only
    assert r.json()["metadata"]["generation"] == 1
    r = http.patch(f"{JOBS}/a", json={"spec": {"suspend": True}}, headers=merge)
    assert r.json()["metadata"]["generation"] == 2
    # a no-op patch writes nothing
    before = fake.resource_version
    r = http.patch(f"{JOBS}/a", json={"spec": {"suspend": True}}, headers=merge)
    assert fake.resource_version == before and r.json()["metadata"]["resourceVersion"] == str(before)
    # resourceVersion in a patch is a precondition
    r = http.patch(f"{JOBS}/a", json={"metadata": {"resourceVersion": "1", "labels": {"l": "2"}}}, headers=merge)
    assert (r.status_code, r.json()["reason"]) == (409, "Conflict")
    r = http.patch(f"{JOBS}/a", json=[{"op": "add"}], headers={"Content-Type": "application/json-patch+json"})
    assert r.status_code == 415
    # finalizers: SMP unions them and removes with the directive
    r = http.patch(f"{JOBS}/a", json={"metadata": {"finalizers": ["x/a"]}}, headers=smp)
    r = http.patch(f"{JOBS}/a", json={"metadata": {"finalizers": ["x/b"]}}, headers=smp)
    assert r.json()["metadata"]["finalizers"] == ["x/a", "x/b"]
    r = http.patch(f"{JOBS}/a", json={"metadata": {"$deleteFromPrimitiveList/finalizers": ["x/a"]}}, headers=smp)
    assert r.json()["metadata"]["finalizers"] == ["x/b"]
    assert http.patch("/api/v1/namespaces/default/configmaps/none/status", json={}, headers=merge).status_code == 404


def test_delete_propagation(fake: FakeApiServer, http: httpx.Client) -> None:
    for name in ("bg", "orphan", "default"):
        fake.create(job(name))
        fake.add_job_pod("default", name)
        fake.add_job_pod("default", name)
    fake.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bystander", "labels": {"job-name": "bg",
                 "batch.kubernetes.io/controller-uid": "someone-else"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}})
    r = http.request("DELETE", f"{JOBS}/bg", json={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
    assert r.status_code == 200 and r.json()["status"] == "Success"
    assert [p["metadata"]["name"] for p in fake.objects("Pod", "default")] != []
    assert not fake.objects("Pod", "default", {"job-name": "bg", "batch.kubernetes.io/controller-uid": "x"})
    remaining = {p["metadata"]["labels"]["job-name"] for p in fake.objects("Pod", "default")}
    assert remaining == {"bg", "orphan", "default"}  # bg's only pod left is the bystander with another uid
    assert len(fake.objects("Pod", "default", "job-name=bg")) == 1
    http.delete(f"{JOBS}/orphan", params={"propagationPolicy": "Orphan"})
    orphans = fake.objects("Pod", "default", "job-name=orphan")
    assert len(orphans) == 2 and all("ownerReferences" not in p["metadata"] for p in orphans)
    http.delete(f"{JOBS}/default")  # batch/v1 Jobs orphan by default
    assert len(fake.objects("Pod", "default", "job-name=default")) == 2
    assert [(d.name, d.policy, d.effective) for d in fake.deletions] == [
        ("bg", "Background", "Background"), ("orphan", "Orphan", "Orphan"), ("default", None, "Orphan")]
    assert http.delete(f"{JOBS}/bg").status_code == 404


def test_foreground_delete_waits_for_dependents_and_finalizers(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(job("fg"))
    pod = fake.add_job_pod("default", "fg")
    fake.patch("Pod", "default", pod["metadata"]["name"], {"metadata": {"finalizers": ["test/hold"]}})
    r = http.request("DELETE", f"{JOBS}/fg", json={"propagationPolicy": "Foreground"})
    assert r.status_code == 200 and r.json()["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert fake.get("Job", "default", "fg")["metadata"]["deletionTimestamp"]
    held = fake.get("Pod", "default", pod["metadata"]["name"])
    assert held["metadata"]["deletionTimestamp"]  # being deleted, held by its finalizer
    fake.remove_finalizers("Pod", "default", pod["metadata"]["name"])
    assert fake.get("Pod", "default", pod["metadata"]["name"]) is None
    assert fake.get("Job", "default", "fg") is None


def test_delete_uid_precondition(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(cm("a"))
    r = http.request("DELETE", f"{CONFIGMAPS}/a", json={"preconditions": {"uid": "not-its-uid"}})
    assert (r.status_code, r.json()["reason"]) == (409, "Conflict") and "Precondition failed" in r.json()["message"]
    assert fake.get("ConfigMap", "default", "a") is not None


def test_pod_logs(fake: FakeApiServer, http: httpx.Client) -> None:
    fake.create(job("j"))
    one = fake.add_job_pod("default", "j")["metadata"]["name"]
    two = fake.add_job_pod("default", "j", containers=("worker", "engine"))["metadata"]["name"]
    fake.set_log("default", one, "a\nb\nc\n")
    fake.set_log("default", two, "engine says hi\n", container="engine")
    assert http.get(f"{PODS}/{one}/log").text == "a\nb\nc\n"
    assert http.get(f"{PODS}/{one}/log", params={"tailLines": "1"}).text == "c\n"
    r = http.get(f"{PODS}/{two}/log")
    assert r.status_code == 400 and "a container name must be specified" in r.json()["message"]
    assert http.get(f"{PODS}/{two}/log", params={"container": "engine"}).text == "engine says hi\n"
    assert http.get(f"{PODS}/missing/log").status_code == 404


def test_token_faults_and_request_log() -> None:
    with FakeApiServer(token="s3cret") as fake, httpx.Client(base_url=fake.url) as http:
        r = http.get(CONFIGMAPS)
        assert (r.status_code, r.json()["reason"]) == (401, "Unauthorized")
        auth = {"Authorization": "Bearer s3cret"}
        fake.fail_next(503, times=2, method="GET", retry_after=1)
        assert [http.get(CONFIGMAPS, headers=auth).status_code for _ in range(3)] == [503, 503, 200]
        fake.fail_next(0)
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(CONFIGMAPS, headers=auth)
        fake.fail_next(500, method="POST", after_apply=True)
        assert http.post(CONFIGMAPS, json=cm("lost"), headers=auth).status_code == 500
        assert fake.get("ConfigMap", "default", "lost") is not None  # the create happened; its answer was lost
        paths = [(r.method, r.path, r.authorization) for r in fake.requests]
        assert paths[0] == ("GET", CONFIGMAPS, None) and paths[1] == ("GET", CONFIGMAPS, "Bearer s3cret")
