"""The ``runpod`` provider against the fake RunPod API (real HTTP, both REST
versions), in process: create bodies, readiness, idempotency, status, verified
release, ownership, error mapping, catalog, proxy mode, settings; and the
executor's ``proxy_timeout`` for RunPod's 100 s proxy. The sshd probe is injected
(the lead's end-to-end tests run a real sshd)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from overnight.console import jobs
from overnight.console.planner import Planner, PlannerConfig
from overnight.console.provisioners.base import ProvisionError, ProvisionRequest
from overnight.console.provisioners.runpod import (
    ENGINE_KEY_ENV,
    INSTALLATION_ENV,
    JOB_ENV,
    KEY_ENV,
    RunPodProvisioner,
    sshd_script,
)
from overnight.store.memory import MemoryStore
from overnight.templates.resolve import resolve
from overnight.templates.source import StaticSource
from tests.fakes.runpod import CAPACITY_MESSAGE, FakeRunPod

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ2dGVzdGtleXRlc3RrZXl0ZXN0a2V5dGVzdGtleQ overnight@test"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHBvZGhvc3RrZXlwb2Rob3N0a2V5cG9kaG9zdGtleQ"
H100 = "NVIDIA H100 80GB HBM3"
SSH_IMAGE = "ghcr.io/acme/vllm-sshd:0.9.0"  # an image whose entrypoint starts sshd from PUBLIC_KEY


def _template(gpu: str = H100, count: int = 1, dp: int = 1, tp: int = 1, **engine: Any) -> dict[str, Any]:
    return {"kind": "ModelDeploymentTemplate", "name": "qwen", "version": "1", "spec": {
        "engine": {"type": "vllm", "image": "vllm/vllm-openai:v0.9.0", **engine},
        "model_source": {"type": "huggingface", "uri": "Qwen/Qwen2.5-7B-Instruct"},
        "accelerator": {"type": gpu, "count": count}, "parallelism": {"dp": dp, "tp": tp},
        "supported_endpoints": ["/v1/chat/completions"]}}


def _request(job_id: str = "job_0000000000000000000000a1", installation: str = "inst-a",
             **tpl: Any) -> ProvisionRequest:
    t = _template(**tpl)
    resolved = resolve(StaticSource([t]), {"name": t["name"]}, None)
    dp = max(1, int(resolved.template.spec.parallelism.dp or 1))
    return ProvisionRequest(job_id=job_id, tenant="t", installation_id=installation, idempotency_key=job_id,
                            template=resolved.to_record(), replicas=dp, gpus_per_replica=resolved.gpus // dp,
                            gpu_type=resolved.template.spec.accelerator.type)


class Probe:
    """Stands in for sshd: fails until ``up``; records every connect."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.calls: list[tuple[str, int, str]] = []

    async def __call__(self, host: str, port: int, user: str, key: Any) -> str:
        self.calls.append((host, port, user))
        if not self.up:
            raise ConnectionRefusedError(f"connect to {host}:{port} refused")
        return HOST_KEY


@pytest.fixture
def fake():
    with FakeRunPod(api_key="rp-key", ssh_host="203.0.113.7", ssh_port=40022) as server:
        yield server


@pytest.fixture
async def make(fake):
    made: list[RunPodProvisioner] = []

    def build(version: str = "v2", mode: str = "ssh", **kw: Any) -> RunPodProvisioner:
        defaults: dict[str, Any] = {
            "api_key": "rp-key", "ssh_public_key": PUB, "base_url": fake.url_v2 if version == "v2" else fake.url_v1,
            "image": SSH_IMAGE if version == "v2" and mode == "ssh" else "vllm/vllm-openai:v0.9.0",
            "endpoint_mode": mode, "client_key": object() if mode == "ssh" else None, "probe": Probe(),
            "proxy_url_template": fake.proxy_url_template, "release_wait_s": 0.3, "max_retry_after_s": 5.0,
            "http_timeout_s": 5.0}
        p = RunPodProvisioner(**{**defaults, **kw})
        made.append(p)
        return p

    yield build
    for p in made:
        await p.aclose()


# -- what is created --------------------------------------------------------------------------------
async def test_v2_create_body_names_markers_ports_and_no_volume(fake, make) -> None:
    p = make(cloud_type="COMMUNITY", data_centers=["US-KS-2", "EU-RO-1"], container_disk_gb=80)
    state = await p.provision(_request())
    [body] = fake.create_bodies("v2")
    assert body["name"] == "overnight-job_0000000000000000000000a1-0"
    assert body["gpu"] == {"id": H100, "count": 1} and body["cloud"] == "COMMUNITY"
    assert body["dataCenterIds"] == ["US-KS-2", "EU-RO-1"] and body["image"] == SSH_IMAGE
    assert body["ports"] == ["22/tcp", "8000/http"] and body["disk"] == 80
    assert "mounts" not in body and "args" not in body  # no volume; ssh mode: the image's entrypoint runs sshd
    env = body["env"]
    assert env[JOB_ENV] == "job_0000000000000000000000a1" and env[INSTALLATION_ENV] == "inst-a"
    assert env[KEY_ENV] == "job_0000000000000000000000a1"
    assert env["PUBLIC_KEY"] == PUB and env["SSH_PUBLIC_KEY"] == PUB and ENGINE_KEY_ENV not in env
    pod_id = fake.live_pods()[0]["id"]
    assert state.provision_id == f"{pod_id}/job_0000000000000000000000a1/inst-a"
    assert state.resource_ids == [pod_id] and state.job_id == "job_0000000000000000000000a1"


async def test_v1_create_body_has_an_explicit_zero_volume_and_an_sshd_entrypoint(fake, make) -> None:
    p = make("v1", data_centers=["EU-RO-1"], container_disk_gb=60)
    await p.provision(_request())
    [body] = fake.create_bodies("v1")
    assert body["name"] == "overnight-job_0000000000000000000000a1-0"
    assert body["gpuTypeIds"] == [H100] and body["gpuCount"] == 1 and body["cloudType"] == "SECURE"
    assert body["computeType"] == "GPU" and body["dataCenterIds"] == ["EU-RO-1"]
    assert body["volumeInGb"] == 0 and body["containerDiskInGb"] == 60 and body["supportPublicIp"] is True
    assert body["ports"] == ["22/tcp", "8000/http"] and body["imageName"] == "vllm/vllm-openai:v0.9.0"
    assert body["dockerEntrypoint"] == ["/bin/bash", "-c"] and body["dockerStartCmd"] == [sshd_script()]
    assert body["env"]["PUBLIC_KEY"] == PUB and body["env"][INSTALLATION_ENV] == "inst-a"
    assert fake.live_pods()[0]["mounts"] == {}  # RunPod's 20 GB default volume was not applied


def test_the_sshd_script_installs_authorizes_and_runs_sshd_in_the_foreground(tmp_path) -> None:
    script = sshd_script()
    path = tmp_path / "start.sh"
    path.write_text(script)
    assert os.system(f"bash -n {shlex.quote(str(path))}") == 0  # it parses
    assert "apt-get install" in script and "openssh-server" in script and "[ ! -x /usr/sbin/sshd ]" in script
    assert '"${PUBLIC_KEY:-${SSH_PUBLIC_KEY:-}}" >> "$HOME/.ssh/authorized_keys"' in script
    assert "PasswordAuthentication=no" in script and "AllowTcpForwarding=yes" in script
    assert script.strip().splitlines()[-2].startswith("exec /usr/sbin/sshd -D -e")


_NS_RUN = r"""set -e
ip link set lo up
mount --bind {home} /root
mount --bind {etc_ssh} /etc/ssh
export HOME=/root PUBLIC_KEY="$(cat {key}.pub)" CUDA_HOME=/usr/local/cuda-test PATH="/opt/test-bin:$PATH"
bash -c "$(cat {script})" > {log} 2>&1 &
sshd_pid=$!
for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/22) 2>/dev/null && break; sleep 0.1; done
ssh="ssh -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
$ssh root@127.0.0.1 'echo "CUDA_HOME=$CUDA_HOME PATH=$PATH PUBLIC_KEY=${{PUBLIC_KEY:-none}}"'
$ssh -o ExitOnForwardFailure=yes -L 127.0.0.1:18999:127.0.0.1:22 root@127.0.0.1 'echo forward-ok'
kill $sshd_pid
"""


def _can_unshare() -> bool:
    import shutil
    import subprocess

    if os.geteuid() != 0 or not all(shutil.which(x) for x in ("unshare", "ssh", "ssh-keygen", "ip")) \
            or not os.access("/usr/sbin/sshd", os.X_OK):
        return False
    return subprocess.run(["unshare", "-mn", "true"], check=False, capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root, unshare and OpenSSH to run sshd in a private namespace")
def test_the_sshd_script_really_starts_sshd_that_takes_the_key_and_forwards(tmp_path) -> None:
    # In a private mount and network namespace: /root and /etc/ssh are this test's
    # directories, port 22 is the namespace's own; nothing on the host changes.
    import contextlib
    import shutil
    import signal
    import subprocess

    home, etc_ssh = tmp_path / "root", tmp_path / "etc-ssh"
    home.mkdir()
    shutil.copytree("/etc/ssh", etc_ssh)
    for f in etc_ssh.glob("ssh_host_*"):
        f.unlink()  # the script makes them (ssh-keygen -A)
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    script = tmp_path / "start.sh"
    script.write_text(sshd_script())
    run = tmp_path / "run.sh"
    run.write_text(_NS_RUN.format(home=home, etc_ssh=etc_ssh, key=key, script=script, log=tmp_path / "sshd.log"))
    proc = subprocess.Popen(["unshare", "-mn", "bash", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:  # sshd is in the script's process group even once the script has ended
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, (out, err, (tmp_path / "sshd.log").read_text())
    assert "CUDA_HOME=/usr/local/cuda-test" in out and "PATH=/opt/test-bin:" in out  # the container's env
    assert "PUBLIC_KEY=none" in out and "forward-ok" in out
    assert (home / ".ssh" / "authorized_keys").read_text().strip() == key.with_suffix(".pub").read_text().strip()


async def test_data_parallel_replicas_make_one_pod_with_every_gpu(fake, make) -> None:
    p = make("v2", "proxy")
    await p.provision(_request(count=4, dp=2, tp=2))
    [body] = fake.create_bodies("v2")
    assert body["gpu"] == {"id": H100, "count": 4} and len(fake.live_pods()) == 1
    assert "--data-parallel-size 2" in body["args"] and "--tensor-parallel-size 2" in body["args"]


async def test_a_template_without_a_gpu_is_refused_before_any_call(fake, make) -> None:
    with pytest.raises(ProvisionError) as err:
        await make().provision(_request(gpu="cpu", count=0))
    assert not err.value.retryable and err.value.code == "no_gpu_type" and not fake.create_bodies()


# -- readiness --------------------------------------------------------------------------------------
async def test_ready_only_when_running_with_an_address_and_sshd_accepting_the_key(fake, make) -> None:
    probe = Probe(up=False)
    p = make(probe=probe)
    fake.provisioning_s = 1000
    state = await p.provision(_request())
    assert state.status == "provisioning" and "PROVISIONING" in state.error
    pid = state.provision_id
    fake.provisioning_s, fake.starting_s = 0, 1000
    state = await p.status(pid)
    assert state.status == "provisioning" and "STARTING" in state.error
    fake.starting_s, fake.ip_delay_s = 0, 1000
    state = await p.status(pid)
    assert state.status == "provisioning" and "public IP" in state.error and probe.calls == []
    fake.ip_delay_s = 0
    state = await p.status(pid)
    assert state.status == "provisioning" and "203.0.113.7:40022" in state.error and "refused" in state.error
    probe.up = True
    state = await p.status(pid)
    assert state.status == "running" and probe.calls[-1] == ("203.0.113.7", 40022, "root")
    assert state.ssh == {"host": "203.0.113.7", "port": 40022, "user": "root", "host_key": HOST_KEY}
    rt = state.runtime
    assert rt["type"] == "ssh" and rt["host"] == "203.0.113.7" and rt["port"] == 40022 and rt["launch"] == "process"
    assert rt["host_key"] == HOST_KEY and rt["command"][:3] == ["vllm", "serve", "Qwen/Qwen2.5-7B-Instruct"]
    assert rt["provision_id"] == pid and rt["provider"] == "runpod" and state.endpoint is None
    assert state.price_per_hour == pytest.approx(2.69)
    assert state.raw["env"]["PUBLIC_KEY"] == "<redacted>" and state.raw["env"][JOB_ENV] == state.job_id


async def test_v1_readiness_reads_public_ip_and_port_mappings(fake, make) -> None:
    p = make("v1")
    fake.ip_delay_s = 1000  # desiredStatus RUNNING, publicIp "" and portMappings {} while initializing
    state = await p.provision(_request())
    assert state.status == "provisioning" and "STARTING" in state.error
    fake.ip_delay_s = 0
    state = await p.status(state.provision_id)
    assert state.status == "running" and state.ssh["port"] == 40022 and state.price_per_hour == pytest.approx(2.69)


async def test_after_a_restart_the_runtime_spec_comes_from_the_template_the_planner_passes(fake, make) -> None:
    req = _request()
    pid = (await make().provision(req)).provision_id
    fresh = make()  # another process: nothing in memory
    state = await fresh.status(pid)
    assert state.status == "provisioning" and "template" in state.error and state.ssh["host_key"] == HOST_KEY
    state = await fresh.status(pid, template=req.template)
    assert state.status == "running" and state.runtime["type"] == "ssh"


async def test_the_planner_gives_status_the_jobs_template(fake, make) -> None:
    store = MemoryStore()
    probe = Probe(up=False)
    first = make(probe=probe)
    planner = Planner(store=store, storage=None, provisioners={"runpod": first}, limits=None,
                      config=PlannerConfig(installation_id="inst-a", poll_s=0, retry_base_s=0))
    t = _template()
    resolved = resolve(StaticSource([t]), {"name": t["name"]}, None)
    job = await jobs.create_job(store=store, tenant="t", req=jobs.JobCreate(
        {"input_dataset": "file-x", "endpoint": "/v1/chat/completions"}), resolved=resolved.to_record(),
        provider="runpod", installation_id="inst-a")
    await planner.step(job.id)  # queued -> resource_preparing
    await planner.step(job.id)  # provision: the pod runs, sshd does not answer yet
    assert (await store.get_doc(jobs.JOB, job.id)).status == "resource_preparing"
    # The console restarts: a new provisioner that never saw the provision.
    planner.provisioners["runpod"] = make(probe=Probe(up=True))
    await planner.step(job.id)
    rec = await store.get_doc(jobs.JOB, job.id)
    # Ready: the planner went on to submit (the batch itself fails here: there is no input file).
    assert "provision_ready" in [e["type"] for e in rec.body["events"]], rec.body["events"]
    assert rec.body["provision"]["runtime"]["type"] == "ssh" and rec.body["price_per_hour"] == pytest.approx(2.69)
    assert len(fake.live_pods()) == 1


# -- idempotency ------------------------------------------------------------------------------------
async def test_a_create_whose_answer_was_lost_is_adopted_not_made_twice(fake, make) -> None:
    p = make()
    fake.inject("/v2/pods", 500, method="POST", after=True)  # created, then answered 500
    with pytest.raises(ProvisionError) as err:
        await p.provision(_request())
    assert err.value.retryable and len(fake.live_pods()) == 1
    state = await make().provision(_request())  # the planner asks again (here: after a restart)
    assert len(fake.create_bodies()) == 1 and len(fake.live_pods()) == 1
    assert state.resource_ids == [fake.live_pods()[0]["id"]]
    again = await p.provision(_request())
    assert again.provision_id == state.provision_id and len(fake.create_bodies()) == 1


async def test_adoption_needs_this_installations_marker_and_key(fake, make) -> None:
    job = "job_0000000000000000000000a1"
    fake.add_pod(name=f"overnight-{job}-0", env={JOB_ENV: job, INSTALLATION_ENV: "inst-b", KEY_ENV: job})
    fake.add_pod(name=f"overnight-{job}-0")  # same name, no markers (made by hand)
    state = await make().provision(_request(job))
    assert len(fake.create_bodies()) == 1 and len(fake.live_for(job)) == 2
    assert state.installation_id == "inst-a"


async def test_two_pods_of_one_job_are_brought_back_to_one(fake, make) -> None:
    job = "job_0000000000000000000000a1"
    marks = {JOB_ENV: job, INSTALLATION_ENV: "inst-a", KEY_ENV: job}
    a, b = fake.add_pod(env=marks), fake.add_pod(env=marks)
    state = await make().provision(_request(job))
    keep = min(a, b)
    assert state.resource_ids == [keep] and [p["id"] for p in fake.live_pods()] == [keep]
    assert not fake.create_bodies()


# -- status -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("forced", ["EXITED", "ERROR"])
async def test_exited_or_error_pods_are_failed_with_the_reason(fake, make, version, forced) -> None:
    p = make(version)
    state = await p.provision(_request())
    fake.set_status(state.resource_ids[0], forced)
    state = await p.status(state.provision_id)
    assert state.status == "failed" and state.resource_ids[0] in state.error
    assert ("EXITED" if version == "v1" else forced) in state.error  # v1 only knows desiredStatus EXITED
    if version == "v1" and forced == "ERROR":
        assert "container crashed" in state.error  # lastStatusChange


async def test_a_deleted_or_terminated_pod_is_released(fake, make) -> None:
    p = make()
    state = await p.provision(_request())
    fake.keep_terminated = True
    assert await p.release(state.provision_id)
    assert (await p.status(state.provision_id)).status == "released"  # GET answers TERMINATED
    fake.keep_terminated = False
    gone = await p.status(state.provision_id)  # GET answers 404
    assert gone.status == "released" and "no longer exists" in gone.error


# -- release ----------------------------------------------------------------------------------------
async def test_a_delete_answering_500_that_did_delete_ends_released(fake, make) -> None:
    p = make()
    state = await p.provision(_request())
    fake.inject("/v2/pods/", 500, method="DELETE", after=True)
    assert await p.release(state.provision_id) is True
    assert not fake.live_pods() and fake.stop_calls == []


async def test_a_failing_release_is_retryable_until_it_succeeds(fake, make) -> None:
    p = make()
    state = await p.provision(_request())
    fake.inject("/v2/pods/", 500, method="DELETE", times=2)  # not deleted
    for _ in range(2):
        with pytest.raises(ProvisionError) as err:
            await p.release(state.provision_id)
        assert err.value.retryable and "still there" in err.value.message and len(fake.live_pods()) == 1
    assert await p.release(state.provision_id) is True and not fake.live_pods()
    assert fake.stop_calls == []


async def test_with_the_api_down_nothing_is_released_until_it_is_back(fake, make) -> None:
    p = make()
    state = await p.provision(_request())
    fake.down = True
    with pytest.raises(ProvisionError) as err:
        await p.release(state.provision_id)
    assert err.value.retryable and err.value.code == "provider_unavailable"
    fake.down = False
    assert len(fake.live_pods()) == 1
    assert await p.release(state.provision_id) is True and not fake.live_pods()


async def test_release_is_true_only_once_a_reread_shows_the_pod_gone(fake, make) -> None:
    p = make(release_wait_s=0.1)
    state = await p.provision(_request())
    fake.delete_s = 0.5  # the terminate takes a while
    assert await p.release(state.provision_id) is False
    await asyncio.sleep(0.5)
    assert await p.release(state.provision_id) is True and not fake.live_pods()


async def test_release_ends_a_duplicate_of_the_job_and_never_an_unmarked_pod(fake, make) -> None:
    p = make()
    state = await p.provision(_request())
    job = state.job_id
    dup = fake.add_pod(env={JOB_ENV: job, INSTALLATION_ENV: "inst-a", KEY_ENV: job})
    stranger = fake.add_pod(name=f"overnight-{job}-0")
    other = fake.add_pod(env={JOB_ENV: job, INSTALLATION_ENV: "inst-b"})
    assert await p.release(state.provision_id) is True
    assert sorted(x["id"] for x in fake.live_pods()) == sorted([stranger, other]) and dup not in fake.pods()


# -- ownership --------------------------------------------------------------------------------------
async def test_list_owned_is_only_this_installations_marked_pods(fake, make) -> None:
    p = make()
    mine = await p.provision(_request("job_a"))
    fake.add_pod()  # unmarked
    fake.add_pod(env={JOB_ENV: "job_b", INSTALLATION_ENV: "inst-b"})
    theirs = await p.provision(_request("job_c", installation="inst-b"))
    owned = await p.list_owned("inst-a")
    assert [s.provision_id for s in owned] == [mine.provision_id] and owned[0].job_id == "job_a"
    assert owned[0].status == "running"
    other = await p.list_owned("inst-b")
    assert sorted(s.job_id for s in other) == ["job_b", "job_c"] and theirs.provision_id in [s.provision_id for s in other]
    await p.release(mine.provision_id)
    assert await p.list_owned("inst-a") == []


# -- errors -----------------------------------------------------------------------------------------
async def test_400_is_retryable_no_capacity_with_runpods_words(fake, make) -> None:
    p = make()
    fake.no_capacity(1)
    with pytest.raises(ProvisionError) as err:
        await p.provision(_request())
    assert err.value.retryable and err.value.code == "no_capacity" and CAPACITY_MESSAGE in err.value.message
    assert (await p.provision(_request())).status == "running"
    assert len(fake.live_pods()) == 1


async def test_v1_errors_are_parsed_tolerantly(fake, make) -> None:
    p = make("v1")
    fake.unavailable.add(H100)
    with pytest.raises(ProvisionError) as err:
        await p.provision(_request())
    assert err.value.code == "no_capacity" and CAPACITY_MESSAGE in err.value.message  # {"error": "..."}
    bad = make("v1", api_key="wrong")
    with pytest.raises(ProvisionError) as err:
        await bad.list_owned("inst-a")
    assert not err.value.retryable and err.value.code == "unauthorized" and "RUNPOD_API_KEY" in err.value.message


async def test_429_is_waited_out_per_retry_after_inside_the_client(fake, make) -> None:
    p = make()
    fake.inject("/v2/pods", 429, method="GET", times=2, retry_after=0.3)
    started = time.monotonic()
    state = await p.provision(_request())
    assert state.status == "running" and time.monotonic() - started >= 0.6
    fake.inject("/v2/pods", 429, method="GET", times=5, retry_after=0.05)
    with pytest.raises(ProvisionError) as err:
        await p.list_owned("inst-a")
    assert err.value.retryable and err.value.code == "rate_limited" and "0.05 s" in err.value.message
    fake.inject("/v2/pods", 429, method="GET", times=1, retry_after=3600)  # longer than we wait
    with pytest.raises(ProvisionError) as err:
        await p.list_owned("inst-a")
    assert err.value.retryable and "3600 s" in err.value.message


@pytest.mark.parametrize(("status", "code", "retryable", "words"), [
    (401, "unauthorized", False, "RUNPOD_API_KEY"),
    (402, "insufficient_balance", False, "balance"),
    (403, "forbidden", False, "no access"),
    (422, "invalid_request", False, "invalid"),
    (500, "provider_unavailable", True, "HTTP 500"),
    (503, "provider_unavailable", True, "HTTP 503"),
])
async def test_http_errors_map_to_retryable_or_not(fake, make, status, code, retryable, words) -> None:
    fake.inject("/v2/pods", status, method="POST", detail="what RunPod said")
    with pytest.raises(ProvisionError) as err:
        await make().provision(_request())
    assert err.value.code == code and err.value.retryable is retryable
    assert words in err.value.message and "what RunPod said" in err.value.message
    assert not fake.live_pods()


async def test_a_wrong_key_is_not_retryable(fake, make) -> None:
    with pytest.raises(ProvisionError) as err:
        await make(api_key="nope").provision(_request())
    assert err.value.code == "unauthorized" and not err.value.retryable


async def test_timeouts_and_dropped_connections_are_retryable(fake, make) -> None:
    p = make(http_timeout_s=0.2)
    fake.inject("/v2/pods", 200, method="GET", delay_s=0.6)
    with pytest.raises(ProvisionError) as err:
        await p.list_owned("inst-a")
    assert err.value.retryable and "in time" in err.value.message
    fake.inject("/v2/pods", 200, method="GET", drop=True)
    with pytest.raises(ProvisionError) as err:
        await p.list_owned("inst-a")
    assert err.value.retryable and err.value.code == "provider_unavailable"


# -- catalog ----------------------------------------------------------------------------------------
async def test_the_v2_catalog_has_types_with_availability_and_price(fake, make) -> None:
    cat = await make(cloud_type="COMMUNITY").catalog()
    h100 = next(c for c in cat if c["gpu_type"] == H100)
    assert h100["provider"] == "runpod" and h100["price_per_hour"] == pytest.approx(2.39)
    assert h100["availability"] == "HIGH" and h100["region"] == "US-KS-2,EU-RO-1" and h100["max_gpus"] == 8
    req = next(r for r in fake.requests if r.path == "/v2/catalog/gpus")
    assert req.query == {"include": ["AVAILABILITY"], "product": ["POD"]}
    only_eu = await make(data_centers=["EU-RO-1"]).catalog()
    assert next(c for c in only_eu if c["gpu_type"] == H100)["availability"] == "LOW"
    assert next(c for c in only_eu if c["gpu_type"] == "NVIDIA H100 PCIe")["availability"] == "NONE"


async def test_the_v1_catalog_is_a_note_saying_why(fake, make) -> None:
    [entry] = await make("v1").catalog()
    assert entry["provider"] == "runpod" and entry["gpu_type"] is None and "v1 has no GPU catalog" in entry["note"]
    assert not any(r.path.startswith("/v1/catalog") for r in fake.requests)


# -- proxy mode -------------------------------------------------------------------------------------
async def test_proxy_mode_starts_the_engine_from_args_and_reports_the_endpoint(fake, make) -> None:
    p = make("v2", "proxy")
    fake.engine_ready = False
    state = await p.provision(_request())
    [body] = fake.create_bodies("v2")
    args = shlex.split(body["args"])
    assert args[:1] == ["Qwen/Qwen2.5-7B-Instruct"]  # appended to the image's ``vllm serve``
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8000"
    key = args[args.index("--api-key") + 1]
    assert len(key) >= 32 and body["env"][ENGINE_KEY_ENV] == key
    assert state.status == "provisioning" and "HTTP 502" in state.error  # the engine is loading
    fake.engine_ready = True
    state = await p.status(state.provision_id)
    pod_id = state.resource_ids[0]
    url = fake.proxy_url_template.format(pod_id=pod_id, port=8000)
    assert state.status == "running" and state.endpoint == url
    assert state.runtime == {"endpoint": url, "api_key": key, "request_timeout_s": 100.0}
    assert key not in json.dumps(state.raw) and key not in json.dumps(state.to_dict()["raw"])


async def test_v1_proxy_mode_passes_the_engine_args_as_the_start_command(fake, make) -> None:
    await make("v1", "proxy").provision(_request())
    [body] = fake.create_bodies("v1")
    assert "dockerEntrypoint" not in body  # the vllm/vllm-openai entrypoint (vllm serve) stays
    cmd = body["dockerStartCmd"]
    assert cmd[0] == "Qwen/Qwen2.5-7B-Instruct" and "--api-key" in cmd and cmd[cmd.index("--port") + 1] == "8000"
    assert body["volumeInGb"] == 0


# -- settings ---------------------------------------------------------------------------------------
def _key_file(tmp_path: Path) -> tuple[str, str]:
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "id_ed25519"
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    return str(path), key.export_public_key("openssh").decode().strip()


def _settings(tmp_path: Path, **kw: Any) -> SimpleNamespace:
    from overnight.config import Settings

    key_file, pub = _key_file(tmp_path)
    base = {k: getattr(Settings(), k) for k in Settings.model_fields if k.startswith("runpod_")}
    base.update(runpod_api_key="rp-key", runpod_ssh_public_key=pub, ssh_key_file=key_file, secret_key=None,
                metadata_service_url=None, runpod_image=SSH_IMAGE)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(("override", "named"), [
    ({"runpod_api_key": None}, "RUNPOD_API_KEY"),
    ({"runpod_ssh_public_key": ""}, "RUNPOD_SSH_PUBLIC_KEY"),
    ({"ssh_key_file": None}, "OVERNIGHT_SSH_KEY_FILE"),
    ({"runpod_cloud_type": "SPOT"}, "RUNPOD_CLOUD_TYPE"),
    ({"runpod_endpoint_mode": "tunnel"}, "RUNPOD_ENDPOINT_MODE"),
    ({"runpod_base_url": "https://api.runpod.io/graphql"}, "RUNPOD_BASE_URL"),
    ({"runpod_image": "vllm/vllm-openai:latest"}, "RUNPOD_IMAGE=vllm/vllm-openai:latest cannot run"),
    ({"runpod_ssh_public_key": PUB}, "not the public half of OVERNIGHT_SSH_KEY_FILE"),
    ({"runpod_endpoint_mode": "proxy"}, "OVERNIGHT_SECRET_KEY"),
    ({"runpod_container_disk_gb": 0}, "RUNPOD_CONTAINER_DISK_GB"),
])
def test_settings_errors_name_the_variable(tmp_path, override, named) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        RunPodProvisioner.from_settings(_settings(tmp_path, **override))


async def test_settings_build_both_modes_and_refuse_a_key_others_can_read(tmp_path) -> None:
    s = _settings(tmp_path)
    p = RunPodProvisioner.from_settings(s)
    assert p.api_version == "v2" and p.endpoint_mode == "ssh" and p.ready_timeout_s == 1800.0
    assert p.container_disk_gb == 100 and p.client_key is not None
    await p.aclose()
    v1 = RunPodProvisioner.from_settings(_settings(tmp_path, runpod_base_url="https://rest.runpod.io/v1",
                                                   runpod_image="vllm/vllm-openai:latest",
                                                   runpod_data_centers="EU-RO-1, US-KS-2"))
    assert v1.api_version == "v1" and v1.data_centers == ["EU-RO-1", "US-KS-2"]
    await v1.aclose()
    proxy = RunPodProvisioner.from_settings(_settings(tmp_path, runpod_endpoint_mode="proxy",
                                                      runpod_image="vllm/vllm-openai:latest", secret_key="k" * 44))
    assert proxy.endpoint_mode == "proxy" and proxy.client_key is None
    await proxy.aclose()
    remote = RunPodProvisioner.from_settings(_settings(tmp_path, runpod_endpoint_mode="proxy",
                                                       metadata_service_url="http://mds:8000"))
    await remote.aclose()  # the batches service elsewhere holds the secret key: a warning, not a refusal
    Path(s.ssh_key_file).chmod(0o644)
    assert stat.S_IMODE(os.stat(s.ssh_key_file).st_mode) == 0o644
    with pytest.raises(ValueError, match="OVERNIGHT_SSH_KEY_FILE.*readable by group or others"):
        RunPodProvisioner.from_settings(s)


async def test_build_provisioners_offers_runpod_when_its_key_is_set(tmp_path, monkeypatch) -> None:
    from overnight.config import Settings
    from overnight.console.service import build_provisioners

    key_file, pub = _key_file(tmp_path)
    monkeypatch.setenv("RUNPOD_API_KEY", "rp-key")
    monkeypatch.setenv("RUNPOD_SSH_PUBLIC_KEY", pub)
    monkeypatch.setenv("OVERNIGHT_SSH_KEY_FILE", key_file)
    monkeypatch.setenv("RUNPOD_IMAGE", SSH_IMAGE)
    out = build_provisioners(Settings(data_dir=str(tmp_path)))
    assert isinstance(out["runpod"], RunPodProvisioner)
    for provisioner in out.values():
        await provisioner.aclose()
    monkeypatch.delenv("OVERNIGHT_SSH_KEY_FILE")
    with pytest.raises(ValueError, match="OVERNIGHT_SSH_KEY_FILE is not set"):
        build_provisioners(Settings(data_dir=str(tmp_path)))


# -- the batch side of proxy mode: request_timeout_s and proxy_timeout --------------------------------
class _SlowEngine:
    """A real HTTP engine: answers after ``delay_s``, or with ``status`` (524: Cloudflare's timeout)."""

    def __init__(self, *, delay_s: float = 0.0, status: int = 200) -> None:
        self.delay_s, self.status, self.calls = delay_s, status, 0
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                engine.calls += 1
                time.sleep(engine.delay_s)
                body = (b'{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
                        if engine.status == 200 else b"<html>error code: 524</html>")
                try:
                    self.send_response(engine.status)
                    self.send_header("Content-Type", "application/json" if engine.status == 200 else "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def slow_engine():
    made: list[_SlowEngine] = []

    def build(**kw: Any) -> _SlowEngine:
        made.append(_SlowEngine(**kw))
        return made[-1]

    yield build
    for e in made:
        e.close()


@pytest.mark.parametrize("case", ["slow", "524"])
async def test_a_request_past_the_proxy_limit_ends_as_proxy_timeout(tmp_path, slow_engine, case) -> None:
    from overnight.executor.engine import HttpEngineClient, RequestLimit
    from overnight.executor.retry import RetryPolicy
    from tests.executor.test_run import Batch

    engine = slow_engine(delay_s=1.0) if case == "slow" else slow_engine(status=524)
    b = Batch(tmp_path, 2)
    await b.upload()
    client = RequestLimit(HttpEngineClient(engine.url, timeout_s=30.0), 0.3)
    started = time.monotonic()
    try:
        await b.run(client, policy=RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.02))
    finally:
        await client.aclose()
    out, err = await b.lines()
    assert not out and len(err) == 2
    for line in err:
        assert line["response"] is None and line["error"]["code"] == "proxy_timeout"
        assert "RunPod's HTTP proxy limits a request to 100 s" in line["error"]["message"]
        assert "RUNPOD_ENDPOINT_MODE=ssh" in line["error"]["message"] and "after 2 attempts" in line["error"]["message"]
    assert engine.calls == 4  # counted against the attempts, never retried until the deadline
    if case == "slow":
        assert time.monotonic() - started < 5.0  # each attempt cut at 0.3 s, not the client's 30 s
    else:
        assert "HTTP 524" in err[0]["error"]["message"]


async def test_without_request_timeout_s_a_slow_answer_is_waited_for(tmp_path, slow_engine) -> None:
    from overnight.executor.engine import HttpEngineClient
    from tests.executor.test_run import Batch

    engine = slow_engine(delay_s=0.4)
    b = Batch(tmp_path, 2)
    await b.upload()
    client = HttpEngineClient(engine.url, timeout_s=30.0)
    try:
        await b.run(client)
    finally:
        await client.aclose()
    out, err = await b.lines()
    assert len(out) == 2 and not err


def test_the_batch_runtime_takes_request_timeout_s_from_1_to_3600() -> None:
    from overnight.batches.service import parse_extension
    from overnight.errors import InvalidRequestError

    rt = parse_extension({"runtime": {"endpoint": "https://p-8000.proxy.runpod.net", "api_key": "k",
                                      "request_timeout_s": 100}})["runtime"]
    assert rt == {"type": "endpoint", "endpoint": "https://p-8000.proxy.runpod.net", "api_key": "k",
                  "request_timeout_s": 100.0}
    assert "request_timeout_s" not in parse_extension({"runtime": {"endpoint": "http://e:8000"}})["runtime"]
    for bad in (0, 3601, "100", True):
        with pytest.raises(InvalidRequestError) as err:
            parse_extension({"runtime": {"endpoint": "http://e:8000", "request_timeout_s": bad}})
        assert err.value.param == "overnight.runtime.request_timeout_s"
    with pytest.raises(InvalidRequestError, match="does not apply"):
        parse_extension({"runtime": {"type": "mock", "request_timeout_s": 100}})


def test_the_engine_pool_limits_only_batches_that_ask() -> None:
    from overnight.executor.engine import RequestLimit
    from overnight.scheduler.loop import EnginePool

    pool = EnginePool(default_url="http://127.0.0.1:9", default_api_key=None, timeout_s=600.0)

    def batch(runtime: dict[str, Any] | None) -> Any:
        return SimpleNamespace(id="batch_x", options={"runtime": runtime} if runtime else {})

    limited = pool.client_for(batch({"type": "endpoint", "endpoint": "http://127.0.0.1:9", "api_key": None,
                                     "request_timeout_s": 100.0}))
    assert isinstance(limited, RequestLimit) and limited.limit_s == 100.0
    plain = pool.client_for(batch({"type": "endpoint", "endpoint": "http://127.0.0.1:9", "api_key": None}))
    assert not isinstance(plain, RequestLimit) and not isinstance(pool.client_for(batch(None)), RequestLimit)
    assert limited.inner is plain  # the same connection pool and health


async def test_the_proxy_engine_key_is_stored_sealed_in_the_job_and_opened_for_the_batch(fake, make) -> None:
    from cryptography.fernet import Fernet

    from overnight.batches.service import BatchCreate
    from overnight.secret_box import SecretBox

    store = MemoryStore()
    planner = Planner(store=store, storage=None, provisioners={"runpod": make("v2", "proxy")}, limits=None,
                      config=PlannerConfig(installation_id="inst-a", poll_s=0, retry_base_s=0))
    planner.secrets = SecretBox(Fernet.generate_key().decode())
    created: list[BatchCreate] = []

    class Batches:  # records what the planner would create
        async def find(self, **_: Any) -> None:
            return None

        async def create(self, *, tenant: str, job_id: str, body: BatchCreate) -> Any:
            created.append(body)
            raise ProvisionError("stop here")  # an OvernightError: the job ends submit_failed

    planner.batches = Batches()
    t = _template()
    resolved = resolve(StaticSource([t]), {"name": t["name"]}, None)
    job = await jobs.create_job(store=store, tenant="t", req=jobs.JobCreate(
        {"input_dataset": "file-x", "endpoint": "/v1/chat/completions"}), resolved=resolved.to_record(),
        provider="runpod", installation_id="inst-a")
    await planner.step(job.id)  # queued -> resource_preparing
    await planner.step(job.id)  # the pod runs and its proxy answers: submitting
    rec = await store.get_doc(jobs.JOB, job.id)
    assert rec.status == "submitting", rec.body["events"]
    [pod] = fake.live_pods()
    key = pod["env"][ENGINE_KEY_ENV]
    assert key not in json.dumps(rec.body), "the engine's API key is stored in the clear"
    assert rec.body["provision"]["runtime"]["api_key_sealed"]
    await planner.step(job.id)  # submit: the batch gets the key itself
    assert created and created[0].extension["runtime"]["api_key"] == key
    assert "api_key_sealed" not in created[0].extension["runtime"]
    await planner.release(rec.body["provision_id"])
