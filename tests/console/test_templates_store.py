"""Deployment templates stored per model (``/api/v1/models/{id}/deployment-templates``),
console jobs that find them, and the retention of finished jobs: over HTTP through
``overnight serve`` with the fake provider (as test_console_e2e.py), plus the
retention pass and the template source step by step on the memory store."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from overnight.console import jobs as job_service
from overnight.console import retention
from overnight.console.templates import (
    StoreTemplates,
    create_template,
    resolve_job_template,
)
from overnight.errors import ConflictError, NotFoundError
from overnight.store.memory import MemoryStore
from overnight.store.records import DocRecord
from overnight.templates.source import StaticSource
from tests.conftest import Cluster
from tests.console.test_console_e2e import TERMINAL, Console

SPEC = {"engine": {"type": "mock", "ready_timeout_seconds": 60}, "model_source": {"type": "local", "uri": "mock"},
        "accelerator": {"type": "cpu", "count": 0}, "supported_endpoints": ["/v1/chat/completions"]}


def tpl(name: str, version: str = "1", status: str = "active", **spec: Any) -> dict[str, Any]:
    return {"name": name, "version": version, "status": status, "spec": {**SPEC, **spec}}


@pytest.fixture
def console(cluster: Cluster, tmp_path: Path):
    c = Console(cluster, tmp_path)
    yield c
    cluster.close()
    left = c.clean_up()
    assert not left, left


def model(c: httpx.Client, name: str = "qwen") -> str:
    r = c.post("/api/v1/models", json={"name": name})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def add(c: httpx.Client, model_id: str, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post(f"/api/v1/models/{model_id}/deployment-templates", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def post_job(console: Console, c: httpx.Client, **fields: Any) -> httpx.Response:
    body = {"input_dataset": console.upload(c, 5), "endpoint": "/v1/chat/completions", **fields}
    return c.post("/api/v1/jobs", json=body)


def finish(console: Console, c: httpx.Client, job_id: str) -> dict[str, Any]:
    done = console.wait(c, job_id)
    console.wait_released(c, job_id)
    return done


def error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]


# -- templates through the API ---------------------------------------------------------------
@pytest.mark.slow
def test_a_stored_template_runs_jobs_named_by_template_or_by_model(console: Console) -> None:
    console.start()
    with console.http() as c:
        mid = model(c)
        v1 = add(c, mid, tpl("qwen-mock", "1"))
        assert (v1["object"], v1["model_id"], v1["spec"]["engine"]["type"]) == ("deployment_template", mid, "mock")
        add(c, mid, tpl("qwen-mock", "2"))
        add(c, mid, tpl("qwen-mock", "10", status="draft"))  # draft: only when named

        assert c.get(f"/api/v1/models/{mid}/deployment-templates/{v1['id']}").json() == v1
        latest = c.get(f"/api/v1/models/{mid}/deployment-templates/by-name/qwen-mock").json()
        assert latest["version"] == "2"
        named = c.get(f"/api/v1/models/{mid}/deployment-templates/by-name/qwen-mock", params={"version": "10"})
        assert named.json()["status"] == "draft"
        r = c.get(f"/api/v1/models/{mid}/deployment-templates/by-name/qwen-mock", params={"version": "9"})
        assert r.status_code == 404 and "'9'" in error(r)["message"]
        r = c.get(f"/api/v1/models/{mid}/deployment-templates/by-name/nope")
        assert r.status_code == 404 and "nope" in error(r)["message"]

        by_name = post_job(console, c, model_template_name="qwen-mock")
        assert by_name.status_code == 200, by_name.text
        assert by_name.json()["model_template_version"] == "2"
        by_model = post_job(console, c, model_id=mid)
        assert by_model.status_code == 200, by_model.text
        j = by_model.json()
        assert (j["model_id"], j["model_template_name"], j["model_template_version"]) == (mid, "qwen-mock", "2")
        pinned = post_job(console, c, model_id=mid, model_template_version="10")
        assert pinned.status_code == 200 and pinned.json()["model_template_version"] == "10", pinned.text
        for jid in (by_name.json()["id"], j["id"], pinned.json()["id"]):
            done = finish(console, c, jid)
            assert done["status"] == "completed", (done["error_message"], done["events"])
            assert done["request_counts"]["completed"] == 5


@pytest.mark.slow
def test_the_list_pages_like_jobs_and_holds_only_the_models_templates(console: Console) -> None:
    console.start()
    with console.http() as c:
        a, b = model(c, "a"), model(c, "b")
        mine = [add(c, a, tpl("ta", str(i)))["id"] for i in range(5)]
        add(c, b, tpl("tb"))
        seen, after = [], None
        while True:
            page = c.get(f"/api/v1/models/{a}/deployment-templates",
                         params={"limit": 2, **({"after": after} if after else {})}).json()
            assert page["object"] == "list" and len(page["data"]) <= 2
            if page["data"]:
                assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][-1]["id"])
            seen += [t["id"] for t in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == mine[::-1]  # newest first, each once, none of model b's
        r = c.get(f"/api/v1/models/{b}/deployment-templates", params={"after": mine[0]})
        assert r.status_code == 404  # a cursor of another model's list
        assert c.get(f"/api/v1/models/{b}/deployment-templates/{mine[0]}").status_code == 404
        # deleting the model takes its templates with it (their names are free again)
        assert c.delete(f"/api/v1/models/{a}").status_code == 200
        assert c.get(f"/api/v1/models/{a}/deployment-templates").status_code == 404
        assert add(c, b, tpl("ta", "0"))["model_id"] == b


def test_invalid_templates_are_refused_naming_the_field(console: Console) -> None:
    console.start()
    with console.http() as c:
        mid = model(c)
        url = f"/api/v1/models/{mid}/deployment-templates"
        cases = [
            (tpl("x", accelerator={"type": "cpu", "count": -1}), "spec.accelerator.count"),
            ({"name": "x", "version": "1"}, "spec"),
            (tpl("x", enigne={"type": "mock"}), "spec.enigne"),
            (tpl("x", supported_endpoints=["v1/chat"]), "spec.supported_endpoints"),
            ({**tpl("x"), "version": 1.1}, "version"),
            ({**tpl("x"), "status": "retired"}, "status"),
            ({**tpl("x"), "name": "has space"}, "name"),
            ({**tpl("x"), "kind": "Profile"}, "kind"),
        ]
        for body, field in cases:
            r = c.post(url, json=body)
            assert r.status_code == 400, (field, r.text)
            assert error(r)["param"] == field and field in error(r)["message"], (field, r.json())
        r = c.post(url, content=b"{not json")
        assert r.status_code == 400
        assert c.get(url).json()["data"] == []  # nothing was stored
        assert c.post("/api/v1/models/model_nope/deployment-templates", json=tpl("x")).status_code == 404
        add(c, mid, {**tpl("x"), "kind": "ModelDeploymentTemplate"})
        r = c.post(url, json=tpl("x"))
        assert r.status_code == 409 and "'x' version '1' exists" in error(r)["message"]
        # a name and version the server's directory has
        r = c.post(url, json=tpl("tiny", "1"))
        assert r.status_code == 409 and str(console.tdir / "t.yaml") in error(r)["message"]


def test_another_tenant_can_neither_see_nor_use_a_template(console: Console) -> None:
    console.start(OVERNIGHT_API_KEYS="ka:alice,kb:bob")
    with console.http("ka") as a, console.http("kb") as b:
        am = model(a)
        t = add(a, am, tpl("secret-sauce"))
        assert b.get(f"/api/v1/models/{am}/deployment-templates").status_code == 404
        assert b.get(f"/api/v1/models/{am}/deployment-templates/{t['id']}").status_code == 404
        assert b.get(f"/api/v1/models/{am}/deployment-templates/by-name/secret-sauce").status_code == 404
        assert b.post(f"/api/v1/models/{am}/deployment-templates", json=tpl("y")).status_code == 404
        assert b.delete(f"/api/v1/models/{am}/deployment-templates/{t['id']}").status_code == 404
        bm = model(b)
        assert b.get(f"/api/v1/models/{bm}/deployment-templates/{t['id']}").status_code == 404
        assert b.get(f"/api/v1/models/{bm}/deployment-templates").json()["data"] == []
        r = post_job(console, b, model_template_name="secret-sauce")
        assert r.status_code == 404 and "secret-sauce" in error(r)["message"]
        r = post_job(console, b, model_id=am)
        assert r.status_code == 404 and am in error(r)["message"]
        # the same name and version is bob's own, unrelated template
        assert add(b, bm, tpl("secret-sauce"))["model_id"] == bm
        assert a.get(f"/api/v1/models/{am}/deployment-templates/by-name/secret-sauce").json()["id"] == t["id"]


@pytest.mark.slow
def test_a_template_in_the_store_and_the_directory_is_ambiguous(console: Console) -> None:
    console.start()
    with console.http() as c:
        mid = model(c)
        stored = add(c, mid, tpl("amb", "1"))
        add(c, mid, tpl("amb", "2"))
        # the operator adds the same name and version to the server's directory
        (console.tdir / "amb.yaml").write_text(
            "kind: ModelDeploymentTemplate\nname: amb\nversion: '1'\nspec:\n"
            "  engine: {type: mock}\n  model_source: {type: local, uri: mock}\n"
            "  accelerator: {type: cpu, count: 0}\n  supported_endpoints: [/v1/chat/completions]\n")
        time.sleep(2.5)  # the directory is re-read every 2 s
        r = post_job(console, c, model_template_name="amb", model_template_version="1")
        assert r.status_code == 409, r.text
        e = error(r)
        assert e["code"] == "template_ambiguous"
        assert str(console.tdir / "amb.yaml") in e["message"] and stored["id"] in e["message"]
        # the latest active version is only in the store: no doubt which one runs
        ok = post_job(console, c, model_template_name="amb")
        assert ok.status_code == 200 and ok.json()["model_template_version"] == "2", ok.text
        # the tenant deletes its copy: the server's runs
        assert c.delete(f"/api/v1/models/{mid}/deployment-templates/{stored['id']}").status_code == 200
        again = post_job(console, c, model_template_name="amb", model_template_version="1")
        assert again.status_code == 200, again.text
        for jid in (ok.json()["id"], again.json()["id"]):
            assert finish(console, c, jid)["status"] == "completed"


@pytest.mark.slow
def test_the_default_template_and_what_happens_without_one(console: Console) -> None:
    console.start(OVERNIGHT_API_KEYS="ka:alice,kb:bob", DEFAULT_BATCH_MODEL_DEPLOYMENT_TEMPLATE="house")
    with console.http("ka") as a, console.http("kb") as b:
        # "house" is no server template: alice's own stored one is her default
        add(a, model(a), tpl("house", "3"))
        r = post_job(console, a)
        assert r.status_code == 200, r.text
        assert (r.json()["model_template_name"], r.json()["model_template_version"]) == ("house", "3")
        r2 = post_job(console, b)
        assert r2.status_code == 404
        assert "house" in error(r2)["message"] and "DEFAULT_BATCH_MODEL_DEPLOYMENT_TEMPLATE" in error(r2)["message"]
        # a model without templates does not fall back to the default
        empty = model(b, "empty")
        r3 = post_job(console, b, model_id=empty)
        assert r3.status_code == 404 and empty in error(r3)["message"]
        finish(console, a, r.json()["id"])  # (keyed mode refuses the fake provider's engine URL: it ends failed)
    console.cluster.close()
    console.start()  # no default: a job must name something
    with console.http() as c:
        r = post_job(console, c)
        assert r.status_code == 400 and error(r)["param"] == "model_template_name"
        r = post_job(console, c, model_template_name="tiny")  # the directory's, as before
        assert r.status_code == 200
        assert finish(console, c, r.json()["id"])["status"] == "completed"


@pytest.mark.slow
def test_a_model_with_several_template_names_needs_one_named(console: Console) -> None:
    console.start()
    with console.http() as c:
        mid, other = model(c, "m"), model(c, "other")
        add(c, mid, tpl("m-a"))
        add(c, mid, tpl("m-b"))
        add(c, other, tpl("o-a"))
        r = post_job(console, c, model_id=mid)
        assert r.status_code == 400 and error(r)["param"] == "model_template_name"
        assert "m-a" in error(r)["message"] and "m-b" in error(r)["message"]
        r = post_job(console, c, model_id=mid, model_template_name="o-a")  # another model's template
        assert r.status_code == 400 and other in error(r)["message"]


# -- the template source, in process ---------------------------------------------------------
async def test_a_template_written_through_another_replica_is_found_at_once() -> None:
    store = MemoryStore()
    await store.insert_doc(DocRecord(kind="model", id="model_1", tenant="t", created_at=time.time(), key="m",
                                     body={"name": "m"}))
    here = StoreTemplates(store, max_age_s=3600)  # a snapshot that would not expire during the test
    kw = dict(templates=here, server=None, tenant="t", version=None, model_id=None, default=None, profile=None)
    with pytest.raises(NotFoundError, match="'late'"):
        await resolve_job_template(name="late", **kw)
    await create_template(store=store, tenant="t", model_id="model_1", body=tpl("late"))  # not through `here`
    assert (await resolve_job_template(name="late", **kw)).name == "late"
    # ... and a tenant's snapshot is its own
    with pytest.raises(NotFoundError):
        await resolve_job_template(**{**kw, "tenant": "u"}, name="late")


async def test_the_store_and_the_server_together() -> None:
    store = MemoryStore()
    await store.insert_doc(DocRecord(kind="model", id="model_1", tenant="t", created_at=time.time(), key="m",
                                     body={"name": "m"}))
    server = StaticSource([tpl("both", "1"), tpl("both", "3", status="deprecated"), tpl("srv", "1")],
                          [{"name": "gpu-pool", "env": {"A": "1"}}], label="dir")
    await create_template(store=store, tenant="t", model_id="model_1", body=tpl("both", "2"))
    with pytest.raises(ConflictError, match="on the server"):
        await create_template(store=store, tenant="t", model_id="model_1", body=tpl("srv", "1"), server=server)
    kw = dict(templates=StoreTemplates(store), server=server, tenant="t", model_id=None, default=None)
    # versions of one name from both places: the highest active one wins (3 is deprecated)
    r = await resolve_job_template(name="both", version=None, profile="gpu-pool", **kw)
    assert (r.version, r.profile_name) == ("2", "gpu-pool")  # a stored template with a server profile
    assert (await resolve_job_template(name="both", version="3", profile=None, **kw)).version == "3"
    assert (await resolve_job_template(name="srv", version=None, profile=None, **kw)).name == "srv"
    # the model's own template, when the job names only the model
    r = await resolve_job_template(**{**kw, "model_id": "model_1"}, name=None, version=None, profile=None)
    assert (r.name, r.version) == ("both", "2")


# -- retention through the API ---------------------------------------------------------------
def _gone(c: httpx.Client, job_id: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if c.get(f"/api/v1/jobs/{job_id}").status_code == 404:
            return
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} is still there")


@pytest.mark.slow
def test_finished_jobs_go_after_the_retention_and_active_ones_stay(console: Console) -> None:
    console.start(OVERNIGHT_CONSOLE_JOB_RETENTION_S="1", OVERNIGHT_FAKE_PROVIDER_LATENCY_MS="2000")
    with console.http() as c:
        long = console.job(c, 4000, name="long")  # tens of seconds of work at the engine's concurrency
        short = console.job(c, 1, name="short")
        done = finish(console, c, short["id"])
        assert done["status"] == "completed", done
        _gone(c, short["id"])
        assert short["id"] not in [j["id"] for j in c.get("/api/v1/jobs").json()["data"]]
        time.sleep(1.5)  # the long job is older than the retention, and not finished
        j = c.get(f"/api/v1/jobs/{long['id']}")
        assert j.status_code == 200, j.text
        assert j.json()["status"] not in TERMINAL, j.json()
        assert c.post(f"/api/v1/jobs/{long['id']}/cancel").status_code == 200
        console.wait(c, long["id"])
        _gone(c, long["id"])  # released, then removed


@pytest.mark.slow
def test_a_job_whose_release_is_not_confirmed_is_kept(console: Console) -> None:
    console.start(OVERNIGHT_CONSOLE_JOB_RETENTION_S="1", OVERNIGHT_FAKE_FAIL_RELEASE="2")
    with console.http() as c:
        j = console.job(c, 3)
        done = console.wait(c, j["id"])
        assert done["status"] == "completed"
        kept_late = False  # seen past its retention (and a few passes) while the release was failing
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = c.get(f"/api/v1/jobs/{j['id']}")
            if r.status_code == 404:
                break
            events = [e["type"] for e in r.json()["events"]]
            if "release_confirmed" not in events and time.time() > done["completed_at"] + 2:
                kept_late = True
            time.sleep(0.1)
        else:
            raise TimeoutError("the job was never removed")
        assert kept_late


# -- the retention pass, in process -----------------------------------------------------------
def _job(status: str, *, ended: float, created: float | None = None, provision: str | None = None) -> DocRecord:
    created = created if created is not None else ended
    return DocRecord(kind=job_service.JOB, id=job_service.new_doc_id("job"), tenant="t", created_at=created,
                     status=status, body={"timestamps": {f"{status}_at": int(ended)}, "provision_id": provision})


def _prov(job: DocRecord, status: str) -> DocRecord:
    return DocRecord(kind=job_service.PROVISION, id=job_service.new_doc_id("prov"), tenant=job.tenant,
                     created_at=job.created_at, status=status, key=job.id, body={"job_id": job.id})


async def test_the_retention_pass_removes_only_what_is_due_and_released() -> None:
    store = MemoryStore()
    now = time.time()
    day = 86400.0
    old_done = _job("completed", ended=now - 3 * day)
    old_done_prov = _prov(old_done, "released")
    old_pending = _job("failed", ended=now - 3 * day)
    old_pending_prov = _prov(old_pending, "release_pending")
    queued_cancel = _job("cancelled", ended=now - 3 * day)  # never reached a provider
    recent = _job("completed", ended=now - 60, created=now - 3 * day)
    running = DocRecord(kind=job_service.JOB, id=job_service.new_doc_id("job"), tenant="t",
                        created_at=now - 5 * day, status="in_progress", body={})
    for rec in (old_done, old_done_prov, old_pending, old_pending_prov, queued_cancel, recent, running):
        await store.insert_doc(rec)

    assert await retention.remove_expired_jobs(store, retention_s=0, now=now) == []
    removed = await retention.remove_expired_jobs(store, retention_s=day, now=now)
    assert sorted(removed) == sorted([old_done.id, queued_cancel.id])
    assert await store.get_doc(job_service.PROVISION, old_done_prov.id) is None
    for kept in (old_pending, recent, running):
        assert await store.get_doc(job_service.JOB, kept.id) is not None
    assert await store.get_doc(job_service.PROVISION, old_pending_prov.id) is not None
    # once its release is confirmed, the pending one goes too
    cur = await store.get_doc(job_service.PROVISION, old_pending_prov.id)
    assert cur is not None
    await store.update_doc(dataclasses.replace(cur, status="released"))
    assert await retention.remove_expired_jobs(store, retention_s=day, now=now) == [old_pending.id]
    assert await store.get_doc(job_service.PROVISION, old_pending_prov.id) is None


async def test_the_retention_pass_pages_through_deletions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "_PAGE", 3)
    store = MemoryStore()
    now = time.time()
    jobs = [_job("completed", ended=now - 100 + i) for i in range(10)]
    kept = _job("failed", ended=now - 100)
    await store.insert_doc(_prov(kept, "provisioning"))
    for rec in [*jobs, kept]:
        await store.insert_doc(rec)
    removed = await retention.remove_expired_jobs(store, retention_s=50, now=now)
    assert sorted(removed) == sorted(j.id for j in jobs)
    assert [r.id for r in await store.list_docs(job_service.JOB)] == [kept.id]
