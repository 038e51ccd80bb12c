"""``job.*`` webhooks of console jobs, in process: the real planner (a provider and a
batches service written for the tests), a real SQLite store, the real delivery
loop, and receivers over real HTTP that verify every delivery (overnight's
``verify`` and the ``openai`` SDK's ``unwrap``). One process test at the end runs
``overnight serve`` with the fake provider."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography.fernet import Fernet

from overnight.console import jobs
from overnight.console.planner import BatchView, Planner, PlannerConfig
from overnight.console.provisioners.base import (
    ProvisionError,
    ProvisionRequest,
    ProvisionState,
)
from overnight.console.retention import remove_expired_jobs
from overnight.errors import InvalidRequestError
from overnight.runtimes.egress import EndpointPolicy
from overnight.secret_box import SecretBox
from overnight.store import connect_store
from overnight.store.base import Store
from overnight.store.records import DocRecord
from overnight.templates.resolve import resolve
from overnight.templates.source import StaticSource
from overnight.webhooks import generate_secret
from overnight.webhooks import jobs as job_hooks
from overnight.webhooks.config import (
    SEALED_SECRET,
    WebhookConfig,
    check_batch_webhook,
    parse_batch_webhook,
)
from overnight.webhooks.dispatcher import WebhookDispatcher
from overnight.webhooks.signing import parse_secrets
from overnight.webhooks.state import RetryRules
from tests.webhooks.receiver import Receiver

SECRET = generate_secret()
FAST = RetryRules(max_attempts=50, max_age_s=600.0, base_s=0.1, max_s=0.3)
TEMPLATE = {"kind": "ModelDeploymentTemplate", "name": "tiny", "version": "1", "spec": {
    "engine": {"type": "mock"}, "model_source": {"type": "local", "uri": "mock"},
    "accelerator": {"type": "cpu", "count": 0}, "supported_endpoints": ["/v1/chat/completions"]}}
TERMINAL = sorted(job_hooks.EVENT_TYPES)


class Provider:
    """Resources run as soon as they are asked for; ``refuse`` names jobs it turns down for good."""

    name = "fake"
    ready_timeout_s = 60.0

    def __init__(self) -> None:
        self.held: dict[str, str] = {}  # resource -> job
        self.refuse: set[str] = set()

    async def provision(self, req: ProvisionRequest) -> ProvisionState:
        if req.job_id in self.refuse:
            raise ProvisionError("no capacity of that kind, ever (the test says so)")
        rid = f"res-{req.job_id}"
        self.held[rid] = req.job_id
        return self._state(rid)

    def _state(self, rid: str) -> ProvisionState:
        gone = rid not in self.held
        return ProvisionState(provision_id=rid, provider="fake", status="released" if gone else "running",
                              endpoint=None if gone else "http://127.0.0.1:9", job_id=rid[4:])

    async def status(self, pid: str) -> ProvisionState:
        return self._state(pid)

    async def release(self, pid: str) -> bool:
        self.held.pop(pid, None)
        return True

    async def list_owned(self, inst: str) -> list[ProvisionState]:
        return [self._state(rid) for rid in self.held]

    async def catalog(self) -> list[dict[str, Any]]:
        return []

    async def aclose(self) -> None:
        return None


class Batches:
    """The batches service as the planner sees it: a job's batch ends in ``final[job]``
    once set; ``refuse`` names jobs whose batch cannot be created (submit_failed)."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self.final: dict[str, str] = {}
        self.refuse: set[str] = set()

    def _view(self, batch_id: str) -> BatchView:
        job_id = batch_id.removeprefix("batch_")
        status = self.status[batch_id]
        if status == "in_progress" and job_id in self.final:
            status = self.status[batch_id] = self.final[job_id]
        return BatchView(id=batch_id, status=status, total=2, completed=2 if status == "completed" else 0,
                         output_file_id="file-out" if status == "completed" else None)

    async def create(self, *, tenant: str, job_id: str, body: Any) -> BatchView:
        if job_id in self.refuse:
            raise InvalidRequestError("the input file has no valid request (the test says so)")
        self.status.setdefault(f"batch_{job_id}", "in_progress")
        return self._view(f"batch_{job_id}")

    async def find(self, *, tenant: str, job_id: str) -> BatchView | None:
        return self._view(f"batch_{job_id}") if f"batch_{job_id}" in self.status else None

    async def get(self, *, tenant: str, batch_id: str) -> BatchView:
        return self._view(batch_id)

    async def cancel(self, *, tenant: str, batch_id: str) -> BatchView:
        self.status[batch_id] = "cancelled"
        return self._view(batch_id)

    async def input_file(self, *, tenant: str, file_id: str) -> str:
        return "batch"


def config(url: str | None, *, keyed: bool = False, allowed: str | None = None, **kw: Any) -> WebhookConfig:
    base: dict[str, Any] = {"retry": FAST, "timeout_s": 2.0, "poll_s": 0.05}
    return WebhookConfig(url=url, keys=parse_secrets(SECRET), keyed=keyed, **{**base, **kw},
                         policy=EndpointPolicy(allowed, keyed=keyed, setting="OVERNIGHT_ALLOWED_WEBHOOK_URLS"))


class World:
    """A console's planner and a delivery loop on one SQLite file (both can be
    "killed" and started again on a fresh connection)."""

    def __init__(self, path: Path, cfg: WebhookConfig) -> None:
        self.path, self.cfg = path, cfg
        self.secrets = SecretBox(Fernet.generate_key().decode())
        self.provider, self.batches = Provider(), Batches()
        self.store: Store | None = None
        self.dispatcher: WebhookDispatcher | None = None
        self.hooks = job_hooks.JobWebhooks(cfg)
        self.planner: Planner | None = None

    async def open(self) -> World:
        self.store = connect_store(f"sqlite:///{self.path}")
        await self.store.open()
        self.planner = Planner(store=self.store, storage=None, provisioners={"fake": self.provider}, limits=None,
                               batches=self.batches, webhooks=self.hooks,
                               config=PlannerConfig(installation_id="inst", poll_s=0, retry_base_s=0))
        return self

    async def deliver(self, replica: str = "r1") -> None:
        assert self.store is not None
        self.dispatcher = WebhookDispatcher(store=self.store, config=self.cfg, secrets=self.secrets,
                                            replica_id=replica, batches=False, jobs=True)
        self.hooks.on_event = self.dispatcher.wake
        await self.dispatcher.start()

    async def kill(self) -> None:
        """Gone without a word (what a SIGKILL leaves is what was written): no delivery
        loop ran, the planner's memory is lost, the store is opened afresh."""
        assert self.dispatcher is None
        self.planner = None
        if self.store is not None:
            await self.store.aclose()
            self.store = None

    async def close(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.stop()
            self.dispatcher = None
        if self.store is not None:
            await self.store.aclose()
            self.store = None

    async def job(self, tenant: str = "t", hook: dict[str, Any] | None = None) -> DocRecord:
        assert self.store is not None
        resolved = resolve(StaticSource([TEMPLATE]), {"name": "tiny"}, None)
        req = jobs.JobCreate({"input_dataset": "file-in", "endpoint": "/v1/chat/completions",
                              **({"webhook_url": hook["url"], "webhook_secret": hook.get("secret")} if hook else {})})
        checked = None
        if req.webhook is not None:
            checked = await check_batch_webhook(req.webhook, key="", config=self.cfg, secrets=self.secrets)
        return await jobs.create_job(store=self.store, tenant=tenant, req=req, resolved=resolved.to_record(),
                                     provider="fake", installation_id="inst", webhook=checked)

    async def get(self, job_id: str) -> DocRecord:
        assert self.store is not None
        rec = await self.store.get_doc(jobs.JOB, job_id)
        assert rec is not None
        return rec

    async def run(self, job_id: str, until: frozenset[str] = jobs.TERMINAL) -> DocRecord:
        """Step the job until it is in ``until`` (and release what it held once terminal)."""
        assert self.planner is not None and self.store is not None
        for _ in range(20):
            rec = await self.get(job_id)
            if rec.status in until:
                break
            await self.planner.step(job_id)
        else:
            raise AssertionError(f"job {job_id} is still {rec.status}: {rec.body['events']}")
        for prov in await self.store.list_docs(jobs.PROVISION, statuses=("release_pending",), limit=100):
            await self.planner.release(prov.id)
        return await self.get(job_id)

    async def settled(self, job_id: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """The job's finished deliveries, once none is pending."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = (await self.get(job_id)).body.get(job_hooks.STATE)
            if st is not None and not st["pending"]:
                return st["done"]
            await asyncio.sleep(0.05)
        raise AssertionError(f"still pending: {st}")

    async def markers(self) -> list[str]:
        assert self.store is not None
        return [m.id for m in await self.store.list_docs(job_hooks.OWED, limit=1000)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET).start()
    yield r
    r.close()


@pytest.fixture
async def world(tmp_path: Path, receiver: Receiver) -> AsyncIterator[World]:
    w = await World(tmp_path / "overnight.db", config(receiver.url)).open()
    yield w
    await w.close()


async def ended(w: World, status: str, hook: dict[str, Any] | None = None, tenant: str = "t") -> DocRecord:
    """A job taken to ``status`` the way a real one gets there."""
    job = await w.job(tenant, hook)
    if status == "resource_failed":
        w.provider.refuse.add(job.id)
    elif status == "submit_failed":
        w.batches.refuse.add(job.id)
    elif status in ("completed", "failed", "expired"):
        w.batches.final[job.id] = status
    elif status == "cancelled":  # cancelled while its batch runs: the planner cancels the batch
        await w.run(job.id, until=frozenset({"in_progress"}))
        await jobs.cancel_job(store=w.store, tenant=tenant, job_id=job.id, webhooks=w.hooks)
    rec = await w.run(job.id)
    assert rec.status == status, rec.body["events"]
    return rec


async def test_every_terminal_job_is_one_verified_delivery_in_openais_shape(world: World, receiver: Receiver) -> None:
    own_secret = generate_secret()
    own = Receiver(own_secret, path="/tenant/hook").start()
    try:
        await world.deliver()
        done = {status: await ended(world, status) for status in TERMINAL}
        queued = await world.job()  # cancelled before the planner ever took it: cancel_job ends it
        cancelled = await jobs.cancel_job(store=world.store, tenant="t", job_id=queued.id, webhooks=world.hooks)
        assert cancelled.status == "cancelled"
        mine = await ended(world, "completed", hook={"url": own.url, "secret": own_secret})

        got = await receiver.arrived(len(done) + 2)
        (to_own,) = await own.arrived(1)
        await asyncio.sleep(0.5)  # nothing more arrives: one delivery per event
    finally:
        own.close()
    assert len(receiver.deliveries) == len(done) + 2 and len(own.deliveries) == 1
    assert not receiver.rejected and not own.rejected
    expected = {rec.id: f"job.{status}" for status, rec in done.items()}
    expected |= {queued.id: "job.cancelled", mine.id: "job.completed"}
    assert {d.event["data"]["id"]: d.event["type"] for d in got} == expected
    for d in got:
        job = await world.get(d.event["data"]["id"])
        body = orjson.loads(d.body)
        assert set(body) == {"object", "id", "type", "created_at", "data"} and body["data"] == {"id": job.id}
        assert body["object"] == "event" and body["id"].startswith("evt_") and d.headers["webhook-id"] == body["id"]
        assert d.headers["content-type"] == "application/json"
        assert body["created_at"] == job.body["timestamps"][f"{job.status}_at"]
        (event,) = job.body[job_hooks.STATE]["events"]
        assert event["id"] == body["id"]
    assert to_own.body == next(d.body for d in got if d.event["data"]["id"] == mine.id)
    assert [(d["target"], d["outcome"], d["attempts"]) for d in await world.settled(mine.id)] == [
        ("server", "delivered", 1), ("job", "delivered", 1)]
    view = jobs.job_object(await world.get(mine.id))
    assert {(v["target"], v["status"]) for v in view["webhooks"]} == {("server", "delivered"), ("job", "delivered")}
    assert view["webhook_url"] == own.url and view["release_confirmed"] is True
    assert await world.markers() == []  # nothing owed: no marker is left behind


async def test_the_event_is_written_with_the_terminal_status_and_nowhere_before(
    world: World, receiver: Receiver
) -> None:
    job = await world.job()
    world.batches.final[job.id] = "completed"
    seen = []
    for _ in range(10):
        rec = await world.get(job.id)
        seen.append((rec.status, bool(rec.body.get(job_hooks.STATE))))
        if rec.status in jobs.TERMINAL:
            break
        await world.planner.step(job.id)
    assert seen[-1] == ("completed", True) and all(not owed for _, owed in seen[:-1]), seen
    assert await world.markers() == [job.id]  # written before the terminal write, found by the loop
    assert jobs.job_object(rec)["webhooks"] == [
        {"event_id": rec.body[job_hooks.STATE]["events"][0]["id"], "type": "job.completed", "target": "server",
         "status": "pending", "attempts": 0}]
    await world.deliver()
    (got,) = await receiver.arrived(1)
    assert got.event["data"]["id"] == job.id


async def test_a_receiver_down_for_a_while_gets_the_event_once_it_is_back(world: World, receiver: Receiver) -> None:
    receiver.down()
    await world.deliver()
    job = await ended(world, "failed")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        (d,) = (await world.get(job.id)).body[job_hooks.STATE]["pending"]
        if d["attempts"] >= 2:
            break
        await asyncio.sleep(0.05)
    assert d["attempts"] >= 2 and "cannot connect" in d["error"], d
    assert await world.markers() == [job.id]
    receiver.fail_with = 500
    receiver.up()
    while len(receiver.attempts) < 2 and time.monotonic() < deadline + 10:
        await asyncio.sleep(0.05)
    receiver.fail_with = None
    (got,) = await receiver.arrived(1)
    (done,) = await world.settled(job.id)
    await asyncio.sleep(0.5)
    assert len(receiver.deliveries) == 1 and not receiver.rejected
    assert got.event["type"] == "job.failed" and done["outcome"] == "delivered"
    assert done["attempts"] >= 2 + sum(1 for status, _ in receiver.attempts if status == 500) + 1
    assert {h["webhook-id"] for _, h in receiver.attempts} == {got.event["id"]}  # the same event every time
    assert await world.markers() == []


async def test_a_tenant_never_receives_another_tenants_job_events(tmp_path: Path, receiver: Receiver) -> None:
    # Keyed mode: each tenant's own URL must be allowed and bring its own secret.
    w = await World(tmp_path / "overnight.db", config(receiver.url, keyed=True, allowed="127.0.0.1")).open()
    secrets = {t: generate_secret() for t in ("a", "b")}
    tenants = {t: Receiver(s, path=f"/{t}/hook").start() for t, s in secrets.items()}
    try:
        await w.deliver()
        with pytest.raises(InvalidRequestError) as err:
            await w.job("a", hook={"url": tenants["a"].url})  # no secret of its own
        assert err.value.param == "webhook_secret"
        ids: dict[str, list[str]] = {"a": [], "b": []}
        for status in ("completed", "failed", "cancelled"):
            for t in ("a", "b"):
                ids[t].append((await ended(w, status, hook={"url": tenants[t].url, "secret": secrets[t]},
                                           tenant=t)).id)
        for t, r in tenants.items():
            got = await r.arrived(3)
            assert sorted(d.event["data"]["id"] for d in got) == sorted(ids[t])
        server = await receiver.arrived(6)  # the operator's URL gets every tenant's
        await asyncio.sleep(0.5)
        for t, r in tenants.items():
            assert len(r.deliveries) == 3 and not r.rejected and {h.get("webhook-id") for _, h in r.attempts} == {
                d.event["id"] for d in r.deliveries}
        assert Counter(d.event["data"]["id"] for d in server) == Counter(ids["a"] + ids["b"])
        # The sealed secret is all the record keeps of it.
        rec = await w.get(ids["a"][0])
        assert secrets["a"] not in repr(rec) and rec.body[job_hooks.HOOK][SEALED_SECRET]
    finally:
        for r in tenants.values():
            r.close()
        await w.close()


async def test_a_job_webhook_url_is_checked_like_a_batches(tmp_path: Path) -> None:
    assert parse_batch_webhook({}, "") is None
    with pytest.raises(InvalidRequestError) as err:
        jobs.JobCreate({"input_dataset": "f", "endpoint": "/v1/chat/completions", "webhook_url": "ftp://x/y"})
    assert err.value.param == "webhook_url"
    with pytest.raises(InvalidRequestError) as err:
        jobs.JobCreate({"input_dataset": "f", "endpoint": "/v1/chat/completions", "webhook_secret": SECRET})
    assert err.value.param == "webhook_secret" and "needs a webhook_url" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        jobs.JobCreate({"input_dataset": "f", "endpoint": "/v1/chat/completions", "webhook_url": "http://h/x",
                        "webhook_secret": "whsec_short"})
    assert err.value.param == "webhook_secret" and "whsec_short" not in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        await check_batch_webhook({"url": "http://169.254.169.254/latest"}, key="", config=config(None),
                                  secrets=None)
    assert (err.value.param, err.value.code) == ("webhook_url", "webhook_url_not_allowed")
    with pytest.raises(InvalidRequestError) as err:
        await check_batch_webhook({"url": "http://127.0.0.1/x"}, key="", config=None, secrets=None)
    assert "does not send webhooks" in err.value.message


async def test_what_a_killed_server_owed_is_delivered_after_the_restart(world: World, receiver: Receiver) -> None:
    # 1. Killed right after the terminal write: nothing was sent.
    first = await ended(world, "expired")
    # 2. Killed between the marker and the terminal write: the job is not terminal yet.
    second = await world.job()
    await world.run(second.id, until=frozenset({"in_progress"}))
    await world.hooks.owe(world.store, await world.get(second.id))
    await world.kill()
    assert receiver.deliveries == []

    await world.open()
    assert sorted(await world.markers()) == sorted([first.id, second.id])
    await world.deliver(replica="r2")
    (got,) = await receiver.arrived(1)
    assert got.event["data"]["id"] == first.id and got.event["type"] == "job.expired"
    await asyncio.sleep(0.3)
    assert await world.markers() == [second.id]  # its job is not terminal: left for its terminal write
    world.batches.final[second.id] = "completed"
    await world.run(second.id)  # the planner carries on where the store says
    got = await receiver.arrived(2)
    assert got[1].event["data"]["id"] == second.id and got[1].event["type"] == "job.completed"
    await asyncio.sleep(0.5)
    assert len(receiver.deliveries) == 2 and await world.markers() == []


async def test_a_claim_of_a_replica_that_died_mid_delivery_is_taken_over(tmp_path: Path, receiver: Receiver) -> None:
    # A replica claimed the delivery (until next_at) and died: once the claim lapses another sends it.
    w = await World(tmp_path / "overnight.db", config(receiver.url)).open()
    try:
        job = await ended(w, "completed")

        def claimed(rec: DocRecord) -> DocRecord:
            (d,) = rec.body[job_hooks.STATE]["pending"]
            d.update(claimed_by="dead", next_at=time.time() + 1.0)
            return rec

        from overnight.console.docs import update_doc

        await update_doc(w.store, jobs.JOB, job.id, claimed)
        await w.deliver(replica="alive")
        await asyncio.sleep(0.5)
        assert receiver.deliveries == []  # still claimed
        (got,) = await receiver.arrived(1, timeout_s=10)
        assert got.event["data"]["id"] == job.id
        (done,) = await w.settled(job.id)
        assert done["outcome"] == "delivered" and "claimed_by" not in done
    finally:
        await w.close()


async def test_retention_keeps_a_job_until_its_delivery_is_settled(world: World, receiver: Receiver) -> None:
    receiver.down()
    job = await ended(world, "submit_failed")
    later = time.time() + 3600
    assert await remove_expired_jobs(world.store, retention_s=60, now=later) == []  # still owed
    receiver.up()
    await world.deliver()
    await receiver.arrived(1)
    await world.settled(job.id)
    assert await remove_expired_jobs(world.store, retention_s=60, now=later) == [job.id]


async def test_no_event_without_a_url_and_none_from_a_server_without_webhooks(tmp_path: Path) -> None:
    for cfg in (config(None), None):
        w = await World(tmp_path / f"{cfg is None}.db", cfg).open()  # type: ignore[arg-type]
        try:
            job = await ended(w, "completed")
            assert job_hooks.STATE not in job.body and await w.markers() == []
            assert jobs.job_object(job)["webhooks"] == []
        finally:
            await w.close()


# -- through overnight serve ---------------------------------------------------------------------
@pytest.mark.slow
def test_serve_delivers_job_events_once_the_job_is_readable(cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.console.test_console_e2e import Console

    console = Console(cluster, tmp_path)
    api: dict[str, Any] = {}

    def look(event: dict[str, Any]) -> dict[str, Any] | None:
        if not event["type"].startswith("job."):
            return None
        return httpx.get(f"{api['url']}/api/v1/jobs/{event['data']['id']}", timeout=10).json()

    receiver = Receiver(SECRET, on_delivery=look).start()
    own_secret = generate_secret()
    own = Receiver(own_secret, path="/mine").start()
    try:
        server = console.start(OVERNIGHT_WEBHOOK_URL=receiver.url, OVERNIGHT_WEBHOOK_SECRET=SECRET,
                               OVERNIGHT_WEBHOOK_POLL_S="0.1")
        api["url"] = server.url
        c = console.http()
        r = c.post("/api/v1/jobs", json={"input_dataset": console.upload(c, 2), "endpoint": "/v1/chat/completions",
                                         "model_template_name": "tiny",
                                         "webhook_url": "http://169.254.169.254/latest/meta-data"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
        job = console.job(c, 5, webhook_url=own.url, webhook_secret=own_secret)
        assert job["webhook_url"] == own.url and job["webhooks"] == [] and job["release_confirmed"] is None
        done = console.wait(c, job["id"])
        assert done["status"] == "completed", done["events"]
        # The server's URL gets the job's batch's event (batch.completed) and the job's.
        events = {d.event["type"]: d for d in receiver.wait_for(2)}
        assert set(events) == {"batch.completed", "job.completed"}
        assert events["batch.completed"].event["data"] == {"id": done["batch_id"]}
        got = events["job.completed"]
        (mine,) = own.wait_for(1)  # the job's own URL gets the job's event only
        assert got.event["data"] == {"id": job["id"]}
        assert mine.body == got.body and not receiver.rejected and not own.rejected
        # Sent once the terminal status and the output were readable through the API.
        assert got.seen["status"] == "completed" and got.seen["output_dataset"]
        console.wait_released(c, job["id"])
        time.sleep(1.0)
        final = c.get(f"/api/v1/jobs/{job['id']}").json()
        assert final["release_confirmed"] is True and len(receiver.deliveries) == 2 and len(own.deliveries) == 1
        assert {(v["target"], v["status"]) for v in final["webhooks"]} == {("server", "delivered"),
                                                                          ("job", "delivered")}
        assert "webhook" in server.log() and "delivered (attempt 1)" in server.log()
        assert console.clean_up() == []
    finally:
        receiver.close()
        own.close()
        console.clean_up()


@pytest.mark.slow
def test_serve_killed_with_a_job_event_pending_sends_it_after_the_restart(cluster, tmp_path) -> None:  # type: ignore
    import signal

    from tests.console.test_console_e2e import Console

    console = Console(cluster, tmp_path)
    receiver = Receiver(SECRET).start()
    env = {"OVERNIGHT_WEBHOOK_URL": receiver.url, "OVERNIGHT_WEBHOOK_SECRET": SECRET,
           "OVERNIGHT_WEBHOOK_POLL_S": "0.1", "OVERNIGHT_WEBHOOK_BACKOFF_BASE_S": "0.2",
           "OVERNIGHT_WEBHOOK_BACKOFF_MAX_S": "1"}
    try:
        receiver.down()
        server = console.start(**env)
        c = console.http()
        job = console.job(c, 3)
        assert console.wait(c, job["id"])["status"] == "completed"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            view = c.get(f"/api/v1/jobs/{job['id']}").json()["webhooks"]
            if view and view[0]["attempts"] >= 1:
                break
            time.sleep(0.05)
        assert view[0]["status"] == "pending" and "cannot connect" in view[0]["last_error"], view
        server.signal(signal.SIGKILL)
        receiver.up()
        time.sleep(0.5)
        assert receiver.deliveries == []  # nobody is left to send it
        console.start(**env)
        c = console.http()
        got = receiver.wait_for(2, timeout_s=40)  # the job's batch's event and the job's
        assert {d.event["type"]: d.event["data"]["id"] for d in got}["job.completed"] == job["id"]
        console.wait_released(c, job["id"])
        time.sleep(1.0)
        assert len(receiver.deliveries) == 2 and not receiver.rejected
        assert console.clean_up() == []
    finally:
        receiver.close()
        console.clean_up()


@pytest.mark.slow
def test_the_console_as_its_own_process_sends_its_jobs_events(cluster, tmp_path) -> None:  # type: ignore
    from tests.console.test_console_process import SplitConsole

    console = SplitConsole(cluster, tmp_path)
    receiver = Receiver(SECRET).start()
    own_secret = generate_secret()
    own = Receiver(own_secret, path="/mine").start()
    try:
        console.start_mds()  # the batches service sends no webhooks here: every delivery is the console's
        # Each resource is ready 3 s after it is asked for: the cancel below lands
        # before the job could end (without it, a 3-line job on a loaded machine
        # could complete between its create and the cancel: a 409).
        console.start(OVERNIGHT_WEBHOOK_URL=receiver.url, OVERNIGHT_WEBHOOK_SECRET=SECRET,
                      OVERNIGHT_WEBHOOK_POLL_S="0.1", OVERNIGHT_FAKE_PROVIDER_DELAY_S="3")
        with console.http() as c:
            job = console.job(c, 3, webhook_url=own.url, webhook_secret=own_secret)
            cancelled = console.job(c, 3)
            r = c.post(f"/api/v1/jobs/{cancelled['id']}/cancel")
            assert r.status_code == 200, (r.text, c.get(f"/api/v1/jobs/{cancelled['id']}").json()["events"])
            done = console.wait(c, job["id"])
            assert done["status"] == "completed", done
            done = console.wait(c, cancelled["id"])
            assert done["status"] == "cancelled", done
            got = receiver.wait_for(2)
            (mine,) = own.wait_for(1)
            for j in (job, cancelled):
                console.wait_released(c, j["id"])
        time.sleep(1.0)
        assert {d.event["data"]["id"]: d.event["type"] for d in got} == {
            job["id"]: "job.completed", cancelled["id"]: "job.cancelled"}
        assert len(receiver.deliveries) == 2 and not receiver.rejected and not own.rejected
        assert mine.event["data"]["id"] == job["id"] and len(own.deliveries) == 1
    finally:
        receiver.close()
        own.close()
        cluster.close()
        left = console.clean_up()
    assert left == []
