"""The ``lambdaCloud`` provider against the fake Lambda Cloud API (real HTTP, the
provider's own httpx client), in process; sshd is a probe the tests control.

What is checked: GPU family matching and the choice of type and region, launch
bodies, pacing and 429s, idempotency after a lost answer, readiness, release
through ``terminating`` and its failures, ownership by tag, error codes, the
catalog, settings, and one job taken by the planner through an API outage."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from overnight.console import jobs
from overnight.console.planner import Planner, PlannerConfig
from overnight.console.provisioners.base import ProvisionError, ProvisionRequest
from overnight.console.provisioners.lambda_cloud import (
    INSTALLATION_TAG,
    JOB_TAG,
    LambdaCloudProvisioner,
    NoCapacity,
    NoGpuType,
    gpu_family,
)
from overnight.store.memory import MemoryStore
from overnight.templates.resolve import resolve
from overnight.templates.source import StaticSource
from tests.fakes.lambda_cloud import DEFAULT_INSTANCE_TYPES, FakeLambdaCloud

KEY = "secret-lambda-key"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForTestsOnly0000000000000000000"


def _template(gpu: str = "H100", count: int = 1, dp: int = 1, image: str | None = "vllm/vllm-openai:v0.9.0",
              name: str = "big") -> dict[str, Any]:
    engine: dict[str, Any] = {"type": "vllm"}
    if image:
        engine["image"] = image
    return {"kind": "ModelDeploymentTemplate", "name": name, "version": "1", "spec": {
        "engine": engine, "model_source": {"type": "huggingface", "uri": "Qwen/Qwen2.5-7B-Instruct"},
        "accelerator": {"type": gpu, "count": count}, "parallelism": {"dp": dp},
        "supported_endpoints": ["/v1/chat/completions"]}}


def _request(job_id: str = "job_0000000000000000000000a1", installation: str = "inst-a", **tpl: Any,
             ) -> ProvisionRequest:
    t = _template(**tpl)
    resolved = resolve(StaticSource([t]), {"name": t["name"]}, None)
    dp = t["spec"]["parallelism"]["dp"]
    return ProvisionRequest(job_id=job_id, tenant="t", installation_id=installation, idempotency_key=job_id,
                            template=resolved.to_record(), replicas=dp,
                            gpus_per_replica=resolved.gpus // dp, gpu_type=t["spec"]["accelerator"]["type"])


class Sshd:
    """The probe: sshd answers (with HOST_KEY) only when ``up``; records each call."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.calls: list[tuple[str, int, str]] = []

    async def __call__(self, host: str, port: int, user: str, key: Any) -> str:
        self.calls.append((host, port, user))
        if not self.up:
            raise ConnectionRefusedError(111, f"Connect call failed ('{host}', {port})")
        return HOST_KEY


@pytest.fixture
def fake():
    with FakeLambdaCloud(api_key=KEY, ssh_keys=("laptop", "ci")) as server:
        yield server


@pytest.fixture
async def make(fake):
    made: list[LambdaCloudProvisioner] = []

    def build(**kw: Any) -> LambdaCloudProvisioner:
        opts: dict[str, Any] = {"api_key": KEY, "ssh_key_names": "laptop,ci", "base_url": fake.url,
                                "probe": Sshd(), "launch_interval_s": 0.0, "request_interval_s": 0.0,
                                "backoff_s": 0.05, "release_wait_s": 1.0, "release_poll_s": 0.05, "ssh_port": 2222}
        opts.update(kw)
        p = LambdaCloudProvisioner(**opts)
        made.append(p)
        return p

    yield build
    for p in made:
        await p.aclose()


def _types(capacity: dict[str, list[str]] | None = None) -> dict[str, Any]:
    return {n: {"instance_type": t, "regions_with_capacity_available": [
        {"name": r, "description": r} for r in (capacity or {}).get(n, ["us-east-1"])]}
        for n, t in DEFAULT_INSTANCE_TYPES.items()}


# -- matching -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "family"), [
    ("H100", "H100"), ("NVIDIA H100", "H100"), ("H100-SXM5", "H100"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("nvidia-h100-80gb", "H100"), ("H100 NVL", "H100"), ("gpu_8x_h100_sxm5", "H100"), ("gpu_1x_h100_pcie", "H100"),
    ("H100 (80 GB SXM5)", "H100"), ("A10", "A10"), ("gpu_1x_a10", "A10"), ("A10 (24 GB PCIe)", "A10"),
    ("A100", "A100"), ("NVIDIA A100-SXM4-40GB", "A100"), ("gpu_8x_a100_80gb_sxm4", "A100"),
    ("RTX A6000", "A6000"), ("gpu_1x_a6000", "A6000"), ("Quadro RTX 6000", "RTX6000"), ("gpu_1x_rtx6000", "RTX6000"),
    ("GH200 (96 GB)", "GH200"), ("H200", "H200"), ("Tesla V100 (16 GB)", "V100"), ("B200 (180 GB SXM6)", "B200"),
    ("cpu", None), ("nvidia.com/gpu", None), ("", None),
])
def test_gpu_family_normalises_vendor_memory_form_factor_and_count(text: str, family: str | None) -> None:
    assert gpu_family(text) == family


@pytest.mark.parametrize(("gpu", "gpus", "chosen"), [
    ("A10", 1, "gpu_1x_a10"),                 # never an A100
    ("NVIDIA A100", 1, "gpu_1x_a100_sxm4"),   # never an A10
    ("A100-80GB", 8, "gpu_8x_a100_80gb_sxm4"),
    ("H100", 1, "gpu_1x_h100_pcie"),          # the cheapest H100 with one GPU
    ("NVIDIA H100 80GB HBM3", 2, "gpu_2x_h100_sxm5"),
    ("H100-SXM5", 8, "gpu_8x_h100_sxm5"),
    ("GH200", 1, "gpu_1x_gh200"),
])
def test_the_type_matches_family_and_exact_gpu_count(gpu: str, gpus: int, chosen: str) -> None:
    p = LambdaCloudProvisioner(api_key="k", ssh_key_names="x")
    name, region, itype = p.choose(_types(), gpu, gpus)
    assert (name, region) == (chosen, "us-east-1") and itype["name"] == chosen


def test_no_type_of_that_family_and_count_is_not_retryable_and_lists_what_exists() -> None:
    p = LambdaCloudProvisioner(api_key="k", ssh_key_names="x")
    with pytest.raises(NoGpuType) as e:
        p.choose(_types(), "H100", 4)
    assert not e.value.retryable and e.value.code == "no_gpu_type"
    for text in ("4x H100", "gpu_1x_h100_pcie (1 GPUs)", "gpu_8x_h100_sxm5 (8 GPUs)", "'H100'"):
        assert text in e.value.message
    with pytest.raises(NoGpuType) as e:
        p.choose(_types(), "B200", 8)
    assert "no B200 instance type" in e.value.message and "A10, A100, A6000, GH200, H100, RTX6000" in e.value.message
    with pytest.raises(NoGpuType) as e:
        p.choose(_types(), "nvidia.com/gpu", 1)
    assert "names no GPU model" in e.value.message


def test_the_cheapest_with_capacity_wins_in_the_configured_region_only() -> None:
    cap = {"gpu_1x_h100_pcie": [], "gpu_1x_h100_sxm5": ["us-west-1", "us-south-1"]}
    p = LambdaCloudProvisioner(api_key="k", ssh_key_names="x")
    assert p.choose(_types(cap), "H100", 1)[:2] == ("gpu_1x_h100_sxm5", "us-west-1")
    cap["gpu_1x_h100_pcie"] = ["us-south-1"]
    assert p.choose(_types(cap), "H100", 1)[:2] == ("gpu_1x_h100_pcie", "us-south-1")
    south = LambdaCloudProvisioner(api_key="k", ssh_key_names="x", region="us-west-1")
    assert south.choose(_types(cap), "H100", 1)[:2] == ("gpu_1x_h100_sxm5", "us-west-1")
    nowhere = LambdaCloudProvisioner(api_key="k", ssh_key_names="x", region="europe-central-1")
    with pytest.raises(NoCapacity) as e:
        nowhere.choose(_types(cap), "H100", 1)
    assert e.value.retryable and e.value.code == "no_capacity"
    msg = e.value.message
    assert "1x H100 in region europe-central-1 (LAMBDA_CLOUD_REGION)" in msg
    assert "gpu_1x_h100_pcie (1x H100 (80 GB PCIe), $2.49/h): capacity in us-south-1" in msg
    assert "gpu_1x_h100_sxm5 (1x H100 (80 GB SXM5), $3.29/h): capacity in us-west-1, us-south-1" in msg


async def test_no_capacity_anywhere_is_retryable_and_says_what_was_asked(fake, make) -> None:
    for n in ("gpu_1x_h100_pcie", "gpu_1x_h100_sxm5"):
        fake.set_capacity(n, [])
    p = make()
    with pytest.raises(NoCapacity) as e:
        await p.provision(_request())
    assert e.value.retryable and "no capacity now for 1x H100" in e.value.message
    assert "capacity in no region" in e.value.message and fake.launch_bodies() == []
    with pytest.raises(NoGpuType):
        await p.provision(_request(gpu="cpu", count=0))


# -- launching ----------------------------------------------------------------------------------
async def test_launch_body_tags_name_and_one_ssh_key(fake, make) -> None:
    job = "job_" + "x" * 70  # the name is cut to 64 characters; the tag keeps the whole id
    p = make()
    state = await p.provision(_request(job_id=job, count=2, dp=2))
    body = fake.launch_bodies()[0]
    assert body == {"region_name": "us-east-1", "instance_type_name": "gpu_2x_h100_sxm5", "ssh_key_names": ["laptop"],
                    "name": f"overnight-{job}"[:64],
                    "tags": [{"key": JOB_TAG, "value": job}, {"key": INSTALLATION_TAG, "value": "inst-a"}]}
    assert len(body["name"]) == 64 and "quantity" not in body
    assert state.status == "provisioning" and state.provision_id == fake.live_for(job)[0]["id"]
    assert state.resource_ids == [state.provision_id] and state.price_per_hour == 6.38
    assert state.job_id == job and state.installation_id == "inst-a"
    req = fake.requests[-1]
    assert req.path == "/instance-operations/launch" and req.status == 200


async def test_concurrent_provisions_of_one_job_launch_once_and_leave_no_lock_behind(fake, make) -> None:
    import asyncio

    p = make()
    first, second = await asyncio.gather(p.provision(_request(job_id="job_same")),
                                         p.provision(_request(job_id="job_same")))
    assert first.provision_id == second.provision_id and len(fake.launch_bodies()) == 1
    assert p._key_locks == {}  # one entry per provision under way, not per job ever seen


async def test_launches_are_paced_process_wide(fake, make) -> None:
    a, b = make(launch_interval_s=0.6, request_interval_s=0.2), make(launch_interval_s=0.6, request_interval_s=0.2)
    await a.provision(_request(job_id="job_a"))
    await b.provision(_request(job_id="job_b"))  # another provisioner of the same account
    await a.provision(_request(job_id="job_c"))
    t = fake.launch_times
    # (arrival times: a little jitter on top of the client's send times)
    assert len(t) == 3 and t[1] - t[0] >= 0.55 and t[2] - t[1] >= 0.55
    gaps = [y.at - x.at for x, y in zip(fake.requests, fake.requests[1:], strict=False)]
    assert min(gaps) >= 0.15  # about one request per request_interval_s, whatever the endpoint


async def test_a_429_is_waited_out_with_retry_after_else_backoff(fake, make) -> None:
    p = make(backoff_s=0.2)
    fake.inject("/instance-operations/launch", 429, retry_after=0.6)
    await p.provision(_request(job_id="job_a"))
    launches = [r for r in fake.requests if r.path == "/instance-operations/launch"]
    assert [r.status for r in launches] == [429, 200] and launches[1].at - launches[0].at >= 0.58
    fake.inject("/instances", 429, method="GET", times=2)  # no Retry-After: 0.2 s then 0.4 s
    await p.provision(_request(job_id="job_b"))
    lists = [r for r in fake.requests if r.path == "/instances" and r.at > launches[1].at]
    assert [r.status for r in lists] == [429, 429, 200]
    assert lists[1].at - lists[0].at >= 0.19 and lists[2].at - lists[1].at >= 0.39
    fake.inject("/instances", 429, times=10, retry_after=0)
    with pytest.raises(ProvisionError) as e:
        await make(max_retries=2).provision(_request(job_id="job_c"))
    assert e.value.retryable and "rate limited 3 times" in e.value.message


async def test_a_launch_whose_answer_was_lost_is_adopted_not_made_twice(fake, make) -> None:
    p = make()
    fake.inject("/instance-operations/launch", 500, after=True)  # made the instance, answered 500
    with pytest.raises(ProvisionError) as e:
        await p.provision(_request())
    assert e.value.retryable and e.value.code == "launch_unconfirmed"
    assert len(fake.live_for("job_0000000000000000000000a1")) == 1
    state = await p.provision(_request())
    assert state.provision_id == fake.live_for("job_0000000000000000000000a1")[0]["id"]
    # the connection dropped after the launch was carried out; and a new process (a restart) asks
    fake.inject("/instance-operations/launch", 0, after=True, drop=True)
    with pytest.raises(ProvisionError):
        await p.provision(_request(job_id="job_b"))
    again = await make().provision(_request(job_id="job_b"))
    assert [i["id"] for i in fake.live_for("job_b")] == [again.provision_id]
    assert len(fake.launch_bodies()) == 2 and len(fake.live_instances()) == 2


async def test_an_unconfirmed_launch_is_not_repeated_within_the_grace_period(fake, make) -> None:
    p = make(launch_grace_s=0.5)
    fake.inject("/instance-operations/launch", 503)  # not made
    with pytest.raises(ProvisionError):
        await p.provision(_request())
    with pytest.raises(ProvisionError) as e:
        await p.provision(_request())
    assert "waiting up to 0.5 s" in e.value.message and len(fake.launch_bodies()) == 1
    await asyncio.sleep(0.5)
    state = await p.provision(_request())
    assert len(fake.launch_bodies()) == 2 and [i["id"] for i in fake.live_instances()] == [state.provision_id]


async def test_a_refused_type_is_passed_over_for_the_next_cheapest(fake, make) -> None:
    p = make()
    fake.refuse_capacity(1, "gpu_1x_h100_pcie")  # listed with capacity, refused at launch
    with pytest.raises(NoCapacity) as e:
        await p.provision(_request())
    assert "instance-operations/launch/insufficient-capacity" in e.value.message and e.value.retryable
    await p.provision(_request())
    assert [b["instance_type_name"] for b in fake.launch_bodies()] == ["gpu_1x_h100_pcie", "gpu_1x_h100_sxm5"]


@pytest.mark.parametrize(("setup", "code", "retryable"), [
    (lambda f: setattr(f, "quota", 0), "global/quota-exceeded", False),
    (lambda f: setattr(f, "account_inactive", True), "global/account-inactive", False),
    (lambda f: f.inject("/instance-operations/launch", 400, "global/invalid-parameters", "Invalid request data."),
     "global/invalid-parameters", False),
    (lambda f: f.inject("/instance-operations/launch", 400, "instance-operations/launch/insufficient-capacity",
                        "Not enough capacity"), "instance-operations/launch/insufficient-capacity", True),
    (lambda f: f.inject("/instance-operations/launch", 502, "provider/internal-unavailable", "upstream"),
     "provider/internal-unavailable", True),
])
async def test_lambda_error_codes_map_to_retryable_or_not(fake, make, setup, code, retryable) -> None:
    setup(fake)
    with pytest.raises(ProvisionError) as e:
        await make().provision(_request())
    assert e.value.retryable is retryable and code in e.value.message


async def test_a_wrong_api_key_is_not_retryable_and_names_lambdas_code(fake, make) -> None:
    p = make(api_key="wrong")
    with pytest.raises(ProvisionError) as e:
        await p.provision(_request())
    assert not e.value.retryable and e.value.code == "invalid_api_key"
    assert "global/invalid-api-key, HTTP 401" in e.value.message and "Lambda suggests" in e.value.message
    with pytest.raises(ProvisionError):
        await p.catalog()


def test_errors_without_a_clear_answer_are_retryable() -> None:
    from overnight.console.provisioners.lambda_cloud import LambdaApiError

    assert LambdaApiError(None, "network", "no answer", ambiguous=True).retryable
    assert LambdaApiError(200, "bad-answer", "not JSON").retryable
    assert LambdaApiError(503, "http/503", "Service Unavailable").retryable
    assert not LambdaApiError(404, "global/object-does-not-exist", "gone").retryable
    assert not LambdaApiError(418, "something/new", "unknown 4xx").retryable


# -- status -------------------------------------------------------------------------------------
async def test_ready_only_when_active_with_an_ip_and_sshd_answering(fake, make) -> None:
    fake.boot_s, fake.ip_delay_s, fake.instance_ip = 0.4, 0.4, "127.0.0.7"
    sshd = Sshd(up=False)
    p = make(probe=sshd, image="my/vllm:fallback")
    state = await p.provision(_request(image=None))
    pid = state.provision_id
    s = await p.status(pid)
    assert (s.status, s.runtime, s.ssh) == ("provisioning", None, None) and "booting" in s.error
    await asyncio.sleep(0.45)
    s = await p.status(pid)
    assert s.status == "provisioning" and "active but has no IP address yet" in s.error and not sshd.calls
    await asyncio.sleep(0.4)
    s = await p.status(pid)
    assert s.status == "provisioning" and "sshd at ubuntu@127.0.0.7:2222 does not accept our key yet" in s.error
    assert sshd.calls == [("127.0.0.7", 2222, "ubuntu")]
    sshd.up = True
    s = await p.status(pid)
    assert s.status == "running" and s.error is None
    assert s.ssh == {"host": "127.0.0.7", "port": 2222, "user": "ubuntu", "host_key": HOST_KEY}
    rt = s.runtime
    assert rt["type"] == "ssh" and rt["launch"] == "docker" and rt["image"] == "my/vllm:fallback"
    assert (rt["host"], rt["port"], rt["user"], rt["host_key"]) == ("127.0.0.7", 2222, "ubuntu", HOST_KEY)
    assert rt["provision_id"] == pid and rt["provider"] == "lambdaCloud" and rt["gpus"] == 1
    assert rt["command"][0] == "Qwen/Qwen2.5-7B-Instruct"  # the image's entrypoint is vllm serve
    assert s.price_per_hour == 2.49 and s.resource_ids == [pid] and s.raw["id"] == pid and s.raw["ip"] == "127.0.0.7"


async def test_the_runtime_spec_after_a_restart_needs_the_template(fake, make) -> None:
    req = _request(count=8, dp=8)
    pid = (await make().provision(req)).provision_id
    restarted = make()  # a new process: provision() ran elsewhere
    s = await restarted.status(pid)
    assert s.status == "provisioning" and "does not have the job's template" in s.error
    s = await restarted.status(pid, template=req.template)
    assert s.status == "running" and s.runtime["image"] == "vllm/vllm-openai:v0.9.0" and s.runtime["gpus"] == 8
    assert (await restarted.status(pid)).status == "running"  # remembered


@pytest.mark.parametrize(("forced", "status", "words"), [
    ("unhealthy", "failed", "unhealthy"), ("preempted", "failed", "preempted"),
    ("terminating", "provisioning", "is terminating"), ("terminated", "released", "is terminated"),
])
async def test_instance_statuses_in_words(fake, make, forced, status, words) -> None:
    p = make()
    pid = (await p.provision(_request())).provision_id
    fake.set_status(pid, forced)
    s = await p.status(pid)
    assert s.status == status and words in s.error and s.runtime is None


async def test_a_terminated_or_unknown_instance_is_released(fake, make) -> None:
    p = make()
    pid = (await p.provision(_request())).provision_id
    assert await p.release(pid)
    fake.forget_terminated = True
    s = await p.status(pid)
    assert s.status == "released" and "does not exist" in s.error
    assert (await p.status("0123456789abcdef")).status == "released"


# -- release ------------------------------------------------------------------------------------
async def test_release_polls_through_terminating_and_asks_once(fake, make) -> None:
    fake.terminate_s = 0.6
    p = make(release_wait_s=0.2)
    pid = (await p.provision(_request())).provision_id
    assert await p.release(pid) is False  # asked; Lambda answers "terminating"
    assert fake.instance(pid)["status"] == "terminating"
    assert (await p.status(pid)).status == "provisioning"
    assert await make(release_wait_s=2.0).release(pid) is True
    assert fake.terminate_calls == [[pid]] and fake.live_instances() == []
    assert await p.release(pid) is True  # already gone: success


async def test_a_terminate_answering_500_that_did_terminate_is_confirmed(fake, make) -> None:
    p = make()
    pid = (await p.provision(_request())).provision_id
    fake.inject("/instance-operations/terminate", 500, after=True)
    assert await p.release(pid) is True
    assert fake.requests[-2].path == "/instance-operations/terminate" and fake.requests[-2].status == 500


async def test_a_failing_release_is_retryable_until_it_succeeds(fake, make) -> None:
    p = make()
    pid = (await p.provision(_request())).provision_id
    fake.inject("/instance-operations/terminate", 503, "provider/internal-unavailable", "try later", times=2)
    for _ in range(2):
        with pytest.raises(ProvisionError) as e:
            await p.release(pid)
        assert e.value.retryable and "provider/internal-unavailable" in e.value.message
        assert fake.instance(pid)["status"] == "active"
    assert await p.release(pid) is True and fake.live_instances() == []


async def test_release_also_ends_a_duplicate_of_the_same_job_and_never_an_untagged_instance(fake, make) -> None:
    p = make()
    req = _request()
    pid = (await p.provision(req)).provision_id
    tags = [{"key": JOB_TAG, "value": req.job_id}, {"key": INSTALLATION_TAG, "value": "inst-a"}]
    dup = fake.add_instance(type_name="gpu_1x_h100_pcie", tags=tags)
    other_inst = fake.add_instance(tags=[{"key": JOB_TAG, "value": req.job_id}, {"key": INSTALLATION_TAG,
                                                                               "value": "inst-b"}])
    plain = fake.add_instance()
    assert await p.release(pid) is True
    assert sorted(fake.terminate_calls[0]) == sorted([pid, dup])
    assert {i["id"] for i in fake.live_instances()} == {other_inst, plain}
    with pytest.raises(ProvisionError) as e:
        await p.release(plain)
    assert "will not terminate it" in e.value.message and fake.instance(plain)["status"] == "active"


async def test_api_down_makes_every_call_retryable_and_nothing_is_lost(fake, make) -> None:
    p = make()
    pid = (await p.provision(_request(job_id="job_a"))).provision_id
    fake.down = True
    for call in (p.provision(_request(job_id="job_b")), p.status(pid), p.release(pid), p.list_owned("inst-a")):
        with pytest.raises(ProvisionError) as e:
            await call
        assert e.value.retryable, e.value.message
    fake.down = False
    assert (await p.status(pid)).status == "running" and len(fake.live_instances()) == 1
    assert await p.release(pid) is True


# -- listing ------------------------------------------------------------------------------------
async def test_list_owned_is_only_this_installations_tagged_instances(fake, make) -> None:
    a, b = make(), make()
    mine = await a.provision(_request(job_id="job_a", installation="inst-a"))
    theirs = await b.provision(_request(job_id="job_b", installation="inst-b"))
    fake.add_instance(name="someone-elses")
    fake.add_instance(tags=[{"key": JOB_TAG, "value": "job_x"}])  # no installation tag
    owned = await a.list_owned("inst-a")
    assert [(s.provision_id, s.job_id, s.installation_id) for s in owned] == [(mine.provision_id, "job_a", "inst-a")]
    assert [s.provision_id for s in await b.list_owned("inst-b")] == [theirs.provision_id]
    assert await a.release(mine.provision_id)
    assert await a.list_owned("inst-a") == []


async def test_the_catalog_lists_types_with_usd_prices_and_regions(fake, make) -> None:
    fake.set_capacity("gpu_8x_h100_sxm5", ["us-south-1", "us-east-1"])
    fake.set_capacity("gpu_1x_a10", [])
    cat = await make(region="us-east-1").catalog()
    by = {c["instance_type"]: c for c in cat}
    assert set(by) == set(DEFAULT_INSTANCE_TYPES)
    assert by["gpu_8x_h100_sxm5"] == {
        "provider": "lambdaCloud", "instance_type": "gpu_8x_h100_sxm5", "gpu_type": "H100 (80 GB SXM5)",
        "gpu_family": "H100", "gpus": 8, "description": "8x H100 (80 GB SXM5)", "price_per_hour": 23.92,
        "regions": ["us-south-1", "us-east-1"], "region": "us-east-1"}
    assert by["gpu_1x_a10"]["regions"] == [] and by["gpu_1x_a10"]["region"] is None
    assert [c["gpu_family"] for c in cat] == sorted(c["gpu_family"] for c in cat)


# -- settings -----------------------------------------------------------------------------------
def _settings(**kw: Any) -> SimpleNamespace:
    base = {"lambda_cloud_api_key": "k", "lambda_cloud_ssh_keys": "laptop, ci", "ssh_key_file": None,
            "lambda_cloud_base_url": "https://cloud.lambda.ai/api/v1", "lambda_cloud_region": None,
            "lambda_cloud_ssh_user": "ubuntu", "lambda_cloud_ssh_port": 22, "lambda_cloud_image": "img",
            "lambda_cloud_ready_timeout_s": 1800.0}
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(("override", "named"), [
    ({"lambda_cloud_api_key": None}, "LAMBDA_CLOUD_API_KEY"),
    ({"lambda_cloud_ssh_keys": " , "}, "LAMBDA_CLOUD_SSH_KEYS"),
    ({}, "OVERNIGHT_SSH_KEY_FILE"),
])
def test_settings_errors_name_the_missing_variable(override: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        LambdaCloudProvisioner.from_settings(_settings(**override))


async def test_settings_build_a_provider_and_refuse_a_key_others_can_read(tmp_path) -> None:
    import asyncssh

    key = tmp_path / "id_ed25519"
    key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    key.chmod(0o644)
    with pytest.raises(ValueError, match="OVERNIGHT_SSH_KEY_FILE: .*chmod 600"):
        LambdaCloudProvisioner.from_settings(_settings(ssh_key_file=str(key)))
    key.chmod(0o600)
    p = LambdaCloudProvisioner.from_settings(_settings(ssh_key_file=str(key), lambda_cloud_region="us-south-1",
                                                       lambda_cloud_ready_timeout_s=900.0))
    assert (p.ssh_key_name, p.region, p.image, p.ready_timeout_s) == ("laptop", "us-south-1", "img", 900.0)
    assert p.name == "lambdaCloud" and p._key() is not None
    await p.aclose()


def test_build_provisioners_offers_lambda_cloud_when_its_key_is_set(tmp_path, monkeypatch) -> None:
    from overnight.config import Settings
    from overnight.console.service import build_provisioners

    for var in ("LAMBDA_CLOUD_API_KEY", "LAMBDA_CLOUD_SSH_KEYS", "OVERNIGHT_SSH_KEY_FILE", "AIBRIX_BATCH_SSH_KEY_FILE",
                "RUNPOD_API_KEY", "PROVISIONER", "OVERNIGHT_PROVISIONER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LAMBDA_CLOUD_API_KEY", "k")
    with pytest.raises(ValueError, match="LAMBDA_CLOUD_SSH_KEYS, OVERNIGHT_SSH_KEY_FILE"):
        build_provisioners(Settings(data_dir=str(tmp_path)))


# -- with the planner ---------------------------------------------------------------------------
async def test_the_planner_waits_out_an_api_outage_then_runs_the_job(fake, make) -> None:
    p = make()
    store = MemoryStore()
    t = _template(count=2, dp=2)
    resolved = resolve(StaticSource([t]), {"name": "big"}, None)
    job = await jobs.create_job(store=store, tenant="t", req=jobs.JobCreate(
        {"input_dataset": "file-x", "endpoint": "/v1/chat/completions"}), resolved=resolved.to_record(),
        provider="lambdaCloud", installation_id="inst-a")
    planner = Planner(store=store, storage=None, provisioners={"lambdaCloud": p}, limits=None,
                      config=PlannerConfig(installation_id="inst-a", poll_s=0, retry_base_s=0))
    await planner.step(job.id)  # queued -> resource_preparing
    fake.down = True
    for _ in range(3):
        await planner.step(job.id)
    rec = await store.get_doc(jobs.JOB, job.id)
    assert rec.status == "resource_preparing" and fake.live_instances() == []
    assert [e for e in rec.body["events"] if e["type"] == "provision_retry"]
    fake.down = False
    await planner.step(job.id)  # launched
    # the console restarts: a new provider and planner, nothing kept in memory
    p = make()
    planner = Planner(store=store, storage=None, provisioners={"lambdaCloud": p}, limits=None,
                      config=PlannerConfig(installation_id="inst-a", poll_s=0, retry_base_s=0))
    await planner.step(job.id)  # running: sshd answers; the runtime spec from the job's template
    rec = await store.get_doc(jobs.JOB, job.id)
    assert rec.status == "submitting", rec.body["events"]
    prov = rec.body["provision"]
    assert prov["provider"] == "lambdaCloud" and prov["price_per_hour"] == 6.38
    assert prov["runtime"]["type"] == "ssh" and prov["runtime"]["gpus"] == 2 and prov["runtime"]["host_key"] == HOST_KEY
    assert [i["instance_type"]["name"] for i in fake.live_for(job.id)] == ["gpu_2x_h100_sxm5"]
    assert await p.release(prov["provision_id"]) and fake.live_instances() == []
