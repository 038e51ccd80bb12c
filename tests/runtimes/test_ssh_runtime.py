"""The ssh runtime against a real OpenSSH server (``tests/sshd.py``): engines started
through its vllm/docker shims, reached only through the runtime's port-forward."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncssh
import httpx
import pytest

from overnight.errors import OvernightError, RuntimeStartError
from overnight.runtimes.ssh import ENGINE_NAME_ENV, SshRuntime, engine_name
from tests.conftest import free_port
from tests.e2e.helpers import (
    assert_exactly_once,
    client_for,
    results,
    wait_progress,
    wait_status,
)
from tests.factories import make_input_file
from tests.sshd import Sshd


def ssh_spec(sshd: Sshd, **over) -> dict:
    spec = {
        "type": "ssh", "host": sshd.host, "port": sshd.port, "user": sshd.user, "host_key": sshd.host_key_line(),
        "launch": "process", "engine_port": free_port(), "provision_id": "prov-" + uuid.uuid4().hex[:6],
        "command": ["vllm", "serve", "org/model-x", "--host", "{host}", "--port", "{port}",
                    "--served-model-name", "tm", "--max-num-seqs", "8"],
        "ready_timeout_seconds": 30,
    }
    spec.update(over)
    return spec


def docker_spec(sshd: Sshd, **over) -> dict:
    # As ssh_runtime_spec builds it for the vllm/vllm-openai image (its entrypoint is `vllm serve`).
    over.setdefault("gpus", 1)
    return ssh_spec(sshd, launch="docker", image="vllm/vllm-openai:v0.11.0",
                    command=["org/model-x", "--host", "{host}", "--port", "{port}", "--served-model-name", "tm"],
                    **over)


@pytest.fixture
async def runtimes(sshd: Sshd, tmp_path: Path):
    """``make(**kw)`` -> an SshRuntime with the test sshd's key; all closed afterwards."""
    made: list[SshRuntime] = []

    def make(**kw) -> SshRuntime:
        kw.setdefault("log_dir", tmp_path / "engines")
        kw.setdefault("key_file", sshd.client_key_path)
        kw.setdefault("connect_retry_s", 0.2)
        rt = SshRuntime(**kw)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        await rt.aclose()


class Recorder:
    def __init__(self) -> None:
        self.handles: list[dict] = []

    async def __call__(self, handle: dict) -> None:
        self.handles.append(dict(handle))


async def chat(url: str, model: str = "tm") -> dict:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(url + "/v1/chat/completions",
                         json={"model": model, "messages": [{"role": "user", "content": "hello"}]})
        r.raise_for_status()
        return r.json()


async def eventually(cond, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


def refuses(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.HTTPError:
        return True
    return False


# -- launch process --------------------------------------------------------------------------
async def test_process_engine_served_through_the_port_forward(sshd: Sshd, runtimes) -> None:
    rt = runtimes()
    spec = ssh_spec(sshd)
    rec = Recorder()
    handle = await rt.acquire(spec, owner="ssh-owner-1", record=rec)
    name = engine_name(spec["provision_id"], "ssh-owner-1")
    assert handle["name"] == name and handle["type"] == "ssh" and handle["target"] == \
        f"ssh://{sshd.user}@{sshd.host}:{sshd.port}"
    # Recorded before the engine started (and again with its pid).
    assert rec.handles[0]["name"] == name and "pid" not in rec.handles[0] and rec.handles[-1]["pid"] > 0
    # The exact command, bound to the machine's loopback.
    await eventually(lambda: sshd.calls("vllm"))
    assert sshd.calls("vllm") == [["serve", "org/model-x", "--host", "127.0.0.1", "--port",
                                   str(spec["engine_port"]), "--served-model-name", "tm", "--max-num-seqs", "8"]]
    endpoint = await rt.wait_ready(handle, timeout_s=30)
    local_port = int(endpoint.url.rsplit(":", 1)[1])
    assert endpoint.url.startswith("http://127.0.0.1:") and local_port != spec["engine_port"]
    answer = await chat(endpoint.url)
    assert answer["model"] == "tm" and answer["choices"][0]["message"]["content"]
    assert await rt.alive(handle)
    [pid] = sshd.engines_running()
    assert sshd.engine_environ(pid)[ENGINE_NAME_ENV] == name
    # The engine's output reaches the local log.
    line = f"overnight mock engine on http://127.0.0.1:{spec['engine_port']}"
    assert await eventually(lambda: line in rt.log_tail(handle, 50))
    assert f"starting engine {name}" in rt.log_tail(handle, 50)
    assert Path(handle["log_path"]).parent == Path(rt.log_dir).resolve()
    # The URL is the forward: closing the runtime's connections (engines keep running)
    # closes it, while the engine still answers on the machine.
    await rt.aclose()
    assert await eventually(lambda: refuses(endpoint.url), 5)
    assert sshd.engines_running() == [pid]
    async with httpx.AsyncClient(timeout=5) as c:
        (await c.get(f"http://127.0.0.1:{spec['engine_port']}/health")).raise_for_status()
    # A new runtime (this service restarted) adopts it and releases it: the whole engine
    # is gone, and so is the log stream. (It stops only what it holds: a release before
    # its acquire would leave the engine to the process that last started or adopted it.)
    rt2 = runtimes()
    handle2 = await rt2.acquire(spec, owner="ssh-owner-1")
    assert handle2["adopted"] is True and handle2["name"] == name
    await rt2.release(handle2)
    assert sshd.engines_running() == []
    assert await eventually(lambda: sshd.processes() == [], 5), sshd.processes()
    await rt2.release(handle2)  # idempotent
    assert not await rt2.alive(handle2)


async def test_release_stops_the_engine_and_its_stream(sshd: Sshd, runtimes) -> None:
    rt = runtimes()
    handle = await rt.acquire(ssh_spec(sshd), owner="o")
    endpoint = await rt.wait_ready(handle, timeout_s=30)
    await chat(endpoint.url)
    assert len(sshd.engines_running()) == 1
    await rt.release(handle)
    assert sshd.engines_running() == []
    assert await eventually(lambda: sshd.processes() == [], 5), sshd.processes()
    assert refuses(endpoint.url)
    assert "engine " + handle["name"] + " stopped" in rt.log_tail(handle, 5)


async def test_engine_killed_on_the_machine_is_not_alive(sshd: Sshd, runtimes) -> None:
    rt = runtimes()
    handle = await rt.acquire(ssh_spec(sshd), owner="o")
    await rt.wait_ready(handle, timeout_s=30)
    [pid] = sshd.engines_running()
    os.kill(pid, signal.SIGKILL)
    assert await eventually(lambda: sshd.engines_running() == [])
    assert not await rt.alive(handle)
    info = rt.exit_info(handle)
    assert info["exit_code"] == 128 + signal.SIGKILL
    assert "overnight mock engine on" in info["log_tail"]
    await rt.release(handle)


async def test_engine_that_exits_fails_wait_ready_with_its_log(sshd: Sshd, runtimes) -> None:
    rt = runtimes()
    spec = ssh_spec(sshd, command=["sh", "-c", "echo model weights missing >&2; exit 3"])
    handle = await rt.acquire(spec, owner="o")
    t0 = time.monotonic()
    with pytest.raises(RuntimeStartError) as err:
        await rt.wait_ready(handle, timeout_s=30)
    assert time.monotonic() - t0 < 10  # noticed, not waited out
    assert "exited with code 3 before it was ready" in err.value.message
    assert "model weights missing" in err.value.message
    await rt.release(handle)


async def test_not_ready_in_time(sshd: Sshd, runtimes) -> None:
    rt = runtimes()
    # Something that runs but never serves the health endpoint.
    handle = await rt.acquire(ssh_spec(sshd, command=["sh", "-c", "echo loading; exec sleep 60"]), owner="o")
    with pytest.raises(RuntimeStartError) as err:
        await rt.wait_ready(handle, timeout_s=2)
    assert "was not ready within 2 s" in err.value.message and "loading" in err.value.message
    await rt.release(handle)
    assert await eventually(lambda: sshd.processes() == [], 5), sshd.processes()


async def test_missing_secret_is_named_before_anything_starts(sshd: Sshd, runtimes, monkeypatch) -> None:
    rt = runtimes()
    var = "OVERNIGHT_TEST_NOT_SET_" + uuid.uuid4().hex[:6].upper()
    monkeypatch.delenv(var, raising=False)
    rec = Recorder()
    with pytest.raises(RuntimeStartError) as err:
        await rt.acquire(ssh_spec(sshd, secrets={"HF_TOKEN": var}), owner="o", record=rec)
    assert var in err.value.message and "HF_TOKEN" in err.value.message
    assert rec.handles == [] and sshd.calls() == []


async def test_secrets_reach_the_engine_and_no_command_line(sshd: Sshd, runtimes, monkeypatch) -> None:
    rt = runtimes()
    secret = "hf_" + uuid.uuid4().hex
    monkeypatch.setenv("OVERNIGHT_TEST_HF", secret)
    handle = await rt.acquire(ssh_spec(sshd, env={"PLAIN": "a b'c"}, secrets={"HF_TOKEN": "OVERNIGHT_TEST_HF"}),
                              owner="o")
    await rt.wait_ready(handle, timeout_s=30)
    [pid] = sshd.engines_running()
    env = sshd.engine_environ(pid)
    assert env["HF_TOKEN"] == secret and env["PLAIN"] == "a b'c"
    assert secret not in sshd.calls_log.read_text()
    assert secret not in (sshd.log_path.read_text() if sshd.log_path.exists() else "")
    await rt.release(handle)


# -- launch docker ----------------------------------------------------------------------------
async def test_docker_engine_flags_and_tunnel(sshd: Sshd, runtimes, monkeypatch) -> None:
    rt = runtimes()
    secret = "hf_" + uuid.uuid4().hex
    monkeypatch.setenv("OVERNIGHT_TEST_HF", secret)
    spec = docker_spec(sshd, env={"VLLM_LOGGING_LEVEL": "INFO"}, secrets={"HF_TOKEN": "OVERNIGHT_TEST_HF"})
    handle = await rt.acquire(spec, owner="o-docker")
    name, p = handle["name"], spec["engine_port"]
    assert sshd.calls("nvidia-smi") == [["-L"]]
    docker = sshd.calls("docker")
    # Checked first: Docker works; no engine of that name runs (else it is adopted); then started.
    assert [c[0] for c in docker] == ["info", "inspect", "rm", "run"]
    assert docker[1] == ["inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", name]
    assert docker[2] == ["rm", "-f", name]
    run = [c for c in docker if c[0] == "run"]
    assert run == [["run", "-d", "--name", name, "--gpus", "all", "--ipc=host", "-p", f"127.0.0.1:{p}:{p}",
                    "--label", f"overnight.engine={name}", "-e", f"{ENGINE_NAME_ENV}={name}",
                    "-e", "VLLM_LOGGING_LEVEL=INFO", "--env-file", "secrets.env", "vllm/vllm-openai:v0.11.0",
                    "org/model-x", "--host", "0.0.0.0", "--port", str(p), "--served-model-name", "tm"]]
    # Every docker call went through sudo -n.
    assert [c[:2] for c in sshd.calls("sudo")] == [["-n", "docker"]] * len(sshd.calls("sudo"))
    assert len(sshd.calls("sudo")) == len(docker)
    endpoint = await rt.wait_ready(handle, timeout_s=30)
    assert (await chat(endpoint.url))["model"] == "tm"
    [pid] = sshd.engines_running()
    assert sshd.engine_environ(pid)["HF_TOKEN"] == secret
    assert secret not in sshd.calls_log.read_text()
    assert not list(sshd.home.rglob("secrets.env"))  # removed once docker read it
    line = f"overnight mock engine on http://127.0.0.1:{p}"
    assert await eventually(lambda: line in rt.log_tail(handle, 50))
    await rt.release(handle)
    assert sshd.calls("docker")[-2:][0] == ["rm", "-f", name]
    assert sshd.engines_running() == []
    assert await eventually(lambda: sshd.processes() == [], 5), sshd.processes()


async def test_docker_container_that_exits(sshd: Sshd, runtimes) -> None:
    rt = runtimes()
    handle = await rt.acquire(docker_spec(sshd), owner="o")
    await rt.wait_ready(handle, timeout_s=30)
    [pid] = sshd.engines_running()
    os.kill(pid, signal.SIGKILL)
    assert await eventually(lambda: sshd.engines_running() == [])
    assert not await rt.alive(handle)
    assert rt.exit_info(handle)["exit_code"] == 137
    await rt.release(handle)


@pytest.mark.parametrize("missing", ["nvidia-smi", "docker"])
async def test_docker_preflight_names_what_is_missing(sshd: Sshd, runtimes, missing: str) -> None:
    rt = runtimes()
    (sshd.fail_nvidia_smi if missing == "nvidia-smi" else sshd.fail_docker)(True)
    rec = Recorder()
    with pytest.raises(RuntimeStartError) as err:
        await rt.acquire(docker_spec(sshd), owner="o", record=rec)
    if missing == "nvidia-smi":
        assert "needs 1 GPU(s), but `nvidia-smi -L` fails" in err.value.message
        assert "NVIDIA driver" in err.value.message
    else:
        assert "`sudo -n docker info` fails" in err.value.message and "Docker daemon" in err.value.message
    assert rec.handles == []
    assert not [c for c in sshd.calls("docker") if c[0] == "run"]


async def test_docker_without_gpus_needs_no_driver(sshd: Sshd, runtimes) -> None:
    rt = runtimes()
    sshd.fail_nvidia_smi(True)
    handle = await rt.acquire(docker_spec(sshd, gpus=0), owner="o")
    assert "--gpus" not in next(c for c in sshd.calls("docker") if c[0] == "run")
    assert sshd.calls("nvidia-smi") == []
    await rt.wait_ready(handle, timeout_s=30)
    await rt.release(handle)


# -- adoption -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("launch", ["process", "docker"])
async def test_second_acquire_after_a_restart_adopts_the_engine(sshd: Sshd, runtimes, launch: str) -> None:
    spec = ssh_spec(sshd) if launch == "process" else docker_spec(sshd)
    rt1 = runtimes()
    h1 = await rt1.acquire(spec, owner="ssh-key-1")
    e1 = await rt1.wait_ready(h1, timeout_s=30)
    await chat(e1.url)
    [pid] = sshd.engines_running()
    await rt1.aclose()  # the service stopped (SIGKILL would leave the same: engines run on)
    assert sshd.engines_running() == [pid]

    rt2 = runtimes()
    rec = Recorder()
    h2 = await rt2.acquire(spec, owner="ssh-key-1", record=rec)
    assert h2["adopted"] is True and h2["name"] == h1["name"] and rec.handles[0]["adopted"]
    e2 = await rt2.wait_ready(h2, timeout_s=30)
    assert (await chat(e2.url))["model"] == "tm"
    assert sshd.engines_running() == [pid]  # the same engine: none started
    starts = sshd.calls("vllm") if launch == "process" else [c for c in sshd.calls("docker") if c[0] == "run"]
    assert len(starts) == 1
    assert "adopted engine" in rt2.log_tail(h2, 100)
    # Another owner on the same machine gets its own engine.
    h3 = await rt2.acquire(dict(spec, engine_port=free_port()), owner="ssh-key-2")
    assert h3["name"] != h2["name"] and not h3.get("adopted")
    await rt2.release(h3)
    await rt2.release(h2)
    assert sshd.engines_running() == []


async def test_a_process_that_no_longer_holds_the_engine_does_not_stop_it(sshd: Sshd, runtimes) -> None:
    """Two replicas: A ran the batch, B took it over (A's lease ran out while A was slow)
    and adopted the engine. A's release, when it finds out, must not stop B's engine."""
    spec = ssh_spec(sshd)
    a, b = runtimes(), runtimes()
    ha = await a.acquire(spec, owner="batch-1")
    await a.wait_ready(ha, timeout_s=30)
    [pid] = sshd.engines_running()
    hb = await b.acquire(spec, owner="batch-1")
    assert hb["adopted"] is True and hb["name"] == ha["name"]
    eb = await b.wait_ready(hb, timeout_s=30)
    await a.release(ha)
    assert sshd.engines_running() == [pid]
    assert (await chat(eb.url))["model"] == "tm"  # B's forward still reaches it
    assert "left running" in Path(ha["log_path"]).read_text()
    await b.release(hb)  # the holder stops it
    assert sshd.engines_running() == []


# -- connections --------------------------------------------------------------------------------
async def test_host_key_mismatch_is_refused(sshd: Sshd, runtimes, tmp_path: Path) -> None:
    other = tmp_path / "other_host_key"
    await asyncio.to_thread(subprocess.run, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                            check=True)
    wrong = " ".join(Path(str(other) + ".pub").read_text().split()[:2])
    rt = runtimes()
    with pytest.raises(RuntimeStartError) as err:
        await rt.acquire(ssh_spec(sshd, host_key=wrong), owner="o")
    msg = err.value.message
    pinned = asyncssh.import_public_key(wrong).get_fingerprint()
    offered = asyncssh.import_public_key(sshd.host_key_line()).get_fingerprint()
    assert f"{sshd.host}:{sshd.port} does not match" in msg and pinned in msg and offered in msg
    assert sshd.calls() == []


async def test_key_readable_by_others_is_refused(sshd: Sshd, runtimes, tmp_path: Path) -> None:
    loose = tmp_path / "loose_key"
    loose.write_bytes(sshd.client_key_path.read_bytes())
    loose.chmod(0o644)
    rt = runtimes(key_file=loose)
    with pytest.raises(RuntimeStartError) as err:
        await rt.acquire(ssh_spec(sshd), owner="o")
    assert f"chmod 600 {loose}" in err.value.message and "0644" in err.value.message
    rt = runtimes(key_file=None)
    rt.key_file = None
    with pytest.raises(RuntimeStartError) as err:
        await rt.acquire(ssh_spec(sshd), owner="o")
    assert "OVERNIGHT_SSH_KEY_FILE" in err.value.message
    assert sshd.calls() == []


async def test_key_file_from_the_environment(sshd: Sshd, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OVERNIGHT_SSH_KEY_FILE", raising=False)
    monkeypatch.setenv("AIBRIX_BATCH_SSH_KEY_FILE", str(sshd.client_key_path))
    rt = SshRuntime(log_dir=tmp_path / "e")
    assert rt.key_file == str(sshd.client_key_path)
    monkeypatch.setenv("OVERNIGHT_SSH_KEY_FILE", "/nowhere")
    assert SshRuntime(log_dir=tmp_path / "e").key_file == "/nowhere"


async def test_connect_is_retried_while_sshd_starts(tmp_path: Path, runtimes) -> None:
    late = Sshd(tmp_path / "late")
    try:
        rt = runtimes(key_file=late.client_key_path, connect_timeout_s=30, connect_retry_s=0.3)
        spec = ssh_spec(late)
        task = asyncio.create_task(rt.acquire(spec, owner="o"))
        await asyncio.sleep(1.5)
        assert not task.done()
        await asyncio.to_thread(late.start)
        handle = await task
        endpoint = await rt.wait_ready(handle, timeout_s=30)
        await chat(endpoint.url)
        await rt.release(handle)
    finally:
        late.close()


async def test_a_machine_that_never_answers(tmp_path: Path, runtimes) -> None:
    gone = Sshd(tmp_path / "gone")  # never started
    try:
        rt = runtimes(key_file=gone.client_key_path, connect_timeout_s=1.5, connect_retry_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(RuntimeStartError) as err:
            await rt.acquire(ssh_spec(gone), owner="o")
        assert time.monotonic() - t0 < 10
        assert f"cannot connect to sshd at {gone.user}@{gone.host}:{gone.port} within 1.5 s" in err.value.message
    finally:
        gone.close()


@pytest.mark.slow
async def test_dropped_connection_reconnects_on_the_same_url(sshd: Sshd, runtimes) -> None:
    rt = runtimes()
    handle = await rt.acquire(ssh_spec(sshd), owner="o")
    endpoint = await rt.wait_ready(handle, timeout_s=30)
    await chat(endpoint.url)
    sshd.drop_connections()
    assert await eventually(lambda: refuses(endpoint.url), 5)  # the forward died with the connection
    assert await rt.alive(handle)  # reconnected, forward re-opened on the same port
    assert (await chat(endpoint.url))["model"] == "tm"
    # The log stream resumed where it was: a line the engine writes now arrives, and
    # nothing arrives twice.
    remote_log = sshd.home / ".overnight" / "engines" / handle["name"] / "engine.log"
    with remote_log.open("a") as f:
        f.write("a line written after the reconnect\n")
    assert await eventually(lambda: "a line written after the reconnect" in rt.log_tail(handle, 20))
    assert rt.log_tail(handle, 100).count("overnight mock engine on") == 1
    await rt.release(handle)
    assert sshd.engines_running() == []


async def test_unreachable_machine(sshd: Sshd, runtimes, caplog) -> None:
    rt = runtimes(unreachable_grace_s=60, release_connect_timeout_s=1, attempt_timeout_s=2)
    handle = await rt.acquire(ssh_spec(sshd), owner="o")
    await rt.wait_ready(handle, timeout_s=30)
    sshd.drop_connections()
    sshd.stop()  # sshd and its connections gone; the engine runs on
    assert await rt.alive(handle)  # within the grace: requests fail to connect meanwhile
    rt.unreachable_grace_s = 0
    assert not await rt.alive(handle)
    caplog.clear()
    await rt.release(handle)  # counts as released, with a warning
    assert any("counted as released" in r.getMessage() for r in caplog.records)


# -- wiring: settings, batches, the engine manager, serve ------------------------------------------
def test_choosing_a_neocloud_provider_turns_the_ssh_runtime_on(monkeypatch) -> None:
    from overnight.config import Settings

    for var in ("RUNPOD_API_KEY", "LAMBDA_CLOUD_API_KEY", "PROVISIONER", "OVERNIGHT_PROVISIONER", "OVERNIGHT_RUNTIMES"):
        monkeypatch.delenv(var, raising=False)
    assert "ssh" not in Settings().allowed_runtimes()
    assert "ssh" in Settings(runpod_api_key="k").allowed_runtimes()
    assert "ssh" in Settings(lambda_cloud_api_key="k").allowed_runtimes()
    assert "ssh" in Settings(provisioner="lambdaCloud").allowed_runtimes()
    # Naming the runtimes is the operator's choice, both ways.
    assert "ssh" not in Settings(runpod_api_key="k", runtimes="endpoint,local").allowed_runtimes()
    monkeypatch.setenv("OVERNIGHT_RUNTIMES", "endpoint,ssh")
    assert Settings().allowed_runtimes() == {"endpoint", "ssh"}


def test_the_engine_manager_keys_an_ssh_engine_by_machine_and_command(sshd: Sshd) -> None:
    from overnight.runtimes.manager import EngineManager

    spec = ssh_spec(sshd, provision_id="prov-a", ready_timeout_seconds=900)
    key = EngineManager.key_for({"runtime": spec})
    assert key.startswith("ssh-prov-a-") and key == EngineManager.key_for({"runtime": dict(spec)})
    assert key != EngineManager.key_for({"runtime": dict(spec, provision_id="prov-b")})
    assert key != EngineManager.key_for({"runtime": dict(spec, command=["vllm", "serve", "other"])})
    kind, got, ready, keep = EngineManager({})._spec_for({"runtime": spec})
    assert (kind, got, ready, keep) == ("ssh", spec, 900.0, 0.0)


async def test_a_batch_through_the_engine_manager(sshd: Sshd, runtimes) -> None:
    from overnight.executor.engine import HttpEngineClient
    from overnight.runtimes.manager import EngineManager

    manager = EngineManager({"ssh": runtimes()}, watch_interval_s=0.2)
    options = {"runtime": ssh_spec(sshd)}
    rec = Recorder()
    url = await manager.attach("batch_1", options, record=rec)
    assert rec.handles and rec.handles[-1]["type"] == "ssh"
    # A second batch on the same machine and command shares the engine.
    assert await manager.attach("batch_2", options, record=rec) == url
    client = HttpEngineClient(url, timeout_s=10)
    try:
        body = b'{"model": "tm", "messages": [{"role": "user", "content": "hi"}]}'
        replies = await asyncio.gather(*(client.send("/v1/chat/completions", body) for _ in range(20)))
    finally:
        await client.aclose()
    assert {r.status for r in replies} == {200}
    key = EngineManager.key_for(options)
    assert "overnight mock engine on" in (manager.log_tail(key, 50) or "")
    assert len(sshd.engines_running()) == 1
    await manager.detach("batch_1", options)
    assert len(sshd.engines_running()) == 1
    await manager.detach("batch_2", options)  # the last batch: released (keep-alive 0)
    assert sshd.engines_running() == []
    await manager.aclose()


async def test_an_engine_manager_without_the_ssh_runtime_fails_the_batch(sshd: Sshd) -> None:
    from overnight.runtimes.manager import EngineFailed, EngineManager

    with pytest.raises(EngineFailed, match="does not run the 'ssh' runtime"):
        await EngineManager({}).attach("b", {"runtime": ssh_spec(sshd)}, record=Recorder())


@pytest.fixture
async def batch_env():
    from overnight.files.service import create_file
    from overnight.storage.memory import MemoryStorage
    from overnight.store.memory import MemoryStore
    from tests.factories import request_line

    store, storage = MemoryStore(), MemoryStorage()

    async def chunks():
        import json

        yield (json.dumps(request_line(0)) + "\n").encode()

    f = await create_file(store=store, storage=storage, tenant="t", filename="in.jsonl", purpose="batch",
                          chunks=chunks())
    return store, storage, f


async def _create_ssh_batch(env, runtime: dict, **kw):
    from overnight.batches import service
    from overnight.batches.validation import ValidationLimits

    store, storage, f = env
    body = service.BatchCreate(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                               extension={"runtime": runtime})
    return await service.create_batch(store=store, storage=storage, tenant="t", body=body,
                                      limits=ValidationLimits(max_requests=10, max_bytes=10**6), **kw)


async def test_keyed_mode_allows_only_machines_the_console_provisioned(sshd: Sshd, batch_env) -> None:
    from overnight.errors import InvalidRequestError
    from overnight.runtimes.egress import EndpointPolicy
    from overnight.scheduler.loop import EnginePool

    policy = EndpointPolicy(None, keyed=True)
    spec = ssh_spec(sshd, secrets={"HF_TOKEN": "SOME_VAR"})
    target = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}"
    with pytest.raises(InvalidRequestError) as err:
        await _create_ssh_batch(batch_env, spec, policy=policy)
    assert err.value.code == "endpoint_not_allowed" and err.value.param == "overnight.runtime"
    assert target in err.value.message and "did not provision" in err.value.message
    policy.trust(target)  # what the console's planner does while the provision lives
    rec = await _create_ssh_batch(batch_env, spec, policy=policy)
    assert rec.options["runtime"]["type"] == "ssh" and rec.options["runtime"]["host_key"] == spec["host_key"]
    # Checked again before dispatch: the provision ended meanwhile.
    pool = EnginePool(default_url=None, default_api_key=None, timeout_s=5, policy=policy)
    await pool.check(rec)
    policy.trust(target, live=False)
    with pytest.raises(OvernightError) as err2:
        await pool.check(rec)
    assert err2.value.code == "endpoint_not_allowed"


async def test_open_mode_takes_any_machine_but_not_with_this_servers_secrets(sshd: Sshd, batch_env) -> None:
    from overnight.errors import InvalidRequestError
    from overnight.runtimes.egress import EndpointPolicy

    policy = EndpointPolicy(None)  # open mode
    rec = await _create_ssh_batch(batch_env, ssh_spec(sshd, env={"HF_TOKEN": "mine"}), policy=policy)
    assert rec.options["runtime"]["env"] == {"HF_TOKEN": "mine"}
    with pytest.raises(InvalidRequestError) as err:
        await _create_ssh_batch(batch_env, ssh_spec(sshd, secrets={"T": "OVERNIGHT_SECRET_KEY"}), policy=policy)
    assert "'secrets'" in err.value.message and err.value.code == "endpoint_not_allowed"


async def test_a_malformed_ssh_runtime_names_the_field(sshd: Sshd, batch_env) -> None:
    from overnight.batches.service import RuntimeRules
    from overnight.errors import InvalidRequestError

    spec = ssh_spec(sshd)
    del spec["host_key"]
    with pytest.raises(InvalidRequestError) as err:
        await _create_ssh_batch(batch_env, spec)
    assert err.value.param == "overnight.runtime.host_key"
    with pytest.raises(InvalidRequestError) as err:
        await _create_ssh_batch(batch_env, ssh_spec(sshd, port=0))
    assert err.value.param == "overnight.runtime.port"
    with pytest.raises(InvalidRequestError) as err:
        await _create_ssh_batch(batch_env, ssh_spec(sshd, launch="docker"))
    assert err.value.param == "overnight.runtime.image"
    with pytest.raises(InvalidRequestError) as err:
        await _create_ssh_batch(batch_env, ssh_spec(sshd, extra=1))
    assert err.value.param == "overnight.runtime.extra"
    with pytest.raises(InvalidRequestError) as err:
        await _create_ssh_batch(batch_env, ssh_spec(sshd), rules=RuntimeRules(allowed=frozenset({"endpoint"})))
    assert err.value.code == "runtime_not_allowed"


def _serve_batch(sshd: Sshd, cluster, tmp_path: Path, spec: dict, n: int, *, data_dir: Path | None = None):
    server = cluster.server(engine_url=None, data_dir=data_dir, env={
        "OVERNIGHT_RUNTIMES": "endpoint,ssh", "OVERNIGHT_SSH_KEY_FILE": str(sshd.client_key_path)})
    client = client_for(server.url)
    with make_input_file(tmp_path / "in.jsonl", n, model="tm").open("rb") as f:
        fobj = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=fobj.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  extra_body={"overnight": {"runtime": spec}})
    return server, client, batch


@pytest.mark.slow
def test_serve_runs_a_batch_on_an_ssh_engine(sshd: Sshd, cluster, tmp_path: Path) -> None:
    server, client, batch = _serve_batch(sshd, cluster, tmp_path, ssh_spec(sshd), 40)
    b = wait_status(client, batch.id, timeout_s=60)
    assert b.status == "completed", b.errors
    out, err = results(client, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(40)})
    assert {line["response"]["status_code"] for line in out} == {200}
    logs = httpx.get(f"{server.url}/v1/batches/{b.id}/engine/logs", headers={"Authorization": "Bearer x"}).json()
    assert any("overnight mock engine on" in line for line in logs["lines"])
    # Its engine went with its batch.
    deadline = time.monotonic() + 10
    while sshd.engines_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sshd.engines_running() == []
    assert len(sshd.calls("vllm")) == 1


@pytest.mark.slow
def test_serve_killed_mid_batch_adopts_the_engine_after_restart(sshd: Sshd, cluster, tmp_path: Path) -> None:
    spec = ssh_spec(sshd, command=[sys.executable, "-m", "overnight.cli.main", "mock-engine", "--host", "{host}",
                                   "--port", "{port}", "--model", "tm", "--latency-ms", "100",
                                   "--max-concurrency", "4"])
    data = tmp_path / "data"
    server, client, batch = _serve_batch(sshd, cluster, tmp_path, spec, 200, data_dir=data)
    wait_progress(client, batch.id, at_least=20, timeout_s=60)
    [pid] = sshd.engines_running()
    server.signal(signal.SIGKILL)
    assert sshd.engines_running() == [pid]  # on the machine, the engine runs on
    server2 = cluster.server(engine_url=None, data_dir=data, env={
        "OVERNIGHT_RUNTIMES": "endpoint,ssh", "OVERNIGHT_SSH_KEY_FILE": str(sshd.client_key_path)})
    client2 = client_for(server2.url)
    b = wait_status(client2, batch.id, timeout_s=120)
    assert b.status == "completed", b.errors
    out, err = results(client2, b)
    assert_exactly_once(out, err, {f"req-{i}" for i in range(200)})
    assert not err
    deadline = time.monotonic() + 10
    while sshd.engines_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sshd.engines_running() == []
    rec = httpx.get(f"{server2.url}/v1/batches/{b.id}/engine/logs", headers={"Authorization": "Bearer x"}).json()
    assert any("adopted engine" in line for line in rec["lines"])


async def test_the_scheduler_checks_the_machine_again_before_starting_its_engine(sshd: Sshd, runtimes, tmp_path):
    from overnight.runtimes.egress import EndpointPolicy
    from overnight.runtimes.manager import EngineManager
    from tests.scheduler.test_loop import Harness

    h = Harness(tmp_path)
    manager = EngineManager({"ssh": runtimes()})
    h.scheduler.runtimes = manager
    manager.on_engine_died = h.scheduler._engine_died
    policy = h.scheduler.engines.policy = EndpointPolicy(None, keyed=True)
    target = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}"
    try:
        # Created while its provision lived; the provision ended before it was dispatched.
        gone = await h.batch("gone", 3, runtime=ssh_spec(sshd))
        await h.scheduler.drain(15)
        rec = await h.store.get_batch(gone)
        assert rec.status == "failed" and rec.errors[0]["code"] == "endpoint_not_allowed", rec.errors
        assert target in rec.errors[0]["message"]
        assert sshd.calls() == []  # nothing was started for it
        # A live provision: the engine starts on the machine and serves the batch through the tunnel.
        policy.trust(target)
        live = await h.batch("live", 12, runtime=ssh_spec(sshd, provision_id="prov-live"))
        await h.scheduler.drain(30)
        rec = await h.store.get_batch(live)
        assert rec.status == "completed" and rec.completed == 12, (rec.status, rec.errors)
        assert rec.runtime["handle"]["type"] == "ssh" and rec.runtime["handle"]["target"] == target
        assert sshd.engines_running() == []  # released with its batch
        assert len(sshd.calls("vllm")) == 1
    finally:
        await h.scheduler.stop()
        await h.scheduler.engines.aclose()
        await manager.aclose()
