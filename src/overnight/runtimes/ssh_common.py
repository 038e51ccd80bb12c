"""What the SSH runtime and the neocloud provisioners share: the runtime's spec,
the client key and the first-connect host-key probe.

A RunPod pod or a Lambda Cloud instance is a machine with sshd and a GPU. The
provisioner (``console/provisioners/runpod.py``, ``lambda_cloud.py``) rents it
and reports it ``running`` once sshd answers our key; at that first connect it
records the host key it saw (``probe_host_key``). The batch then carries an
``ssh`` runtime spec (``ssh_runtime_spec``) naming the host, the pinned host key
and the engine to launch; the SSH runtime (``runtimes/ssh.py``) in the process
that dispatches connects with that key required, starts the engine bound to
127.0.0.1 on the machine and dispatches through an SSH local port-forward.

The spec carries no secret: a profile's secrets travel as the *names* of
environment variables of the dispatching process, read when the engine starts.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from overnight.errors import OvernightError
from overnight.runtimes.base import RuntimeSpec

__all__ = [
    "KEY_FILE_ENV",
    "SshKeyError",
    "SshSpec",
    "key_file_from_env",
    "load_client_key",
    "probe_host_key",
    "ssh_runtime_spec",
]

#: Where the private key is read from (AIBrix's name is accepted too).
KEY_FILE_ENV = ("OVERNIGHT_SSH_KEY_FILE", "AIBRIX_BATCH_SSH_KEY_FILE")


class SshKeyError(OvernightError):
    code = "ssh_key_invalid"


class SshSpec(RuntimeSpec):
    """``{"type": "ssh", ...}``: an engine that overnight starts over SSH on a rented machine."""

    type: Literal["ssh"] = "ssh"
    host: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(min_length=1)
    #: The host key seen at the provisioner's first connect (OpenSSH public key line);
    #: every later connect requires it.
    host_key: str = Field(min_length=1)
    #: ``process``: run ``command`` on the machine (RunPod; its image has vllm);
    #: ``docker``: ``sudo docker run`` ``image`` with ``command`` as its arguments (Lambda).
    launch: Literal["process", "docker"] = "process"
    #: argv; ``{host}`` and ``{port}`` are filled in (127.0.0.1 and ``engine_port``).
    command: list[str] = Field(min_length=1)
    image: str | None = None
    engine_port: int = Field(8000, ge=1, le=65535)
    #: Plain environment for the engine (a profile's ``env``).
    env: dict[str, str] = Field(default_factory=dict)
    #: Engine variable -> the dispatching process's environment variable holding its value.
    secrets: dict[str, str] = Field(default_factory=dict)
    health_endpoint: str = "/health"
    ready_timeout_seconds: float = Field(1800.0, ge=1)
    gpus: int = Field(0, ge=0)
    #: The console provision this machine belongs to (names the engine's container / log).
    provision_id: str = Field(min_length=1)
    provider: str = ""


def ssh_runtime_spec(template: dict[str, Any], *, host: str, port: int, user: str, host_key: str,
                     launch: str, provision_id: str, provider: str, image: str | None = None,
                     ready_timeout_s: float | None = None) -> dict[str, Any]:
    """The ``ssh`` runtime spec (a plain dict, stored with the batch) that starts the
    engine of ``template`` (a ``Resolved.to_record()``) on ``host``."""
    from overnight.templates.commands import engine_command
    from overnight.templates.resolve import Resolved

    resolved = Resolved.from_record(template)
    t = resolved.template
    argv = engine_command(t)
    if launch == "docker" and argv[:2] == ["vllm", "serve"]:
        # The vllm/vllm-openai image's entrypoint is already ``vllm serve``.
        argv = argv[2:]
    env: dict[str, str] = {}
    secrets: dict[str, str] = {}
    if resolved.profile is not None:
        env.update(resolved.profile.env)
        for var, ref in resolved.profile.secrets.items():
            if ref.env is None:
                raise OvernightError(
                    f"profile {resolved.profile.name!r}: secrets.{var} is a Kubernetes Secret reference; an engine "
                    "started over SSH reads only environment variables ({env: VAR})", code="invalid_template")
            secrets[var] = ref.env
    spec = SshSpec(
        host=host, port=port, user=user, host_key=host_key, launch=launch,  # type: ignore[arg-type]
        command=argv, image=(image or t.spec.engine.image) if launch == "docker" else None,
        engine_port=t.spec.engine.port, env=env, secrets=secrets, health_endpoint=t.spec.engine.health_endpoint,
        ready_timeout_seconds=ready_timeout_s or t.spec.engine.ready_timeout_seconds,
        gpus=t.spec.accelerator.gpus, provision_id=provision_id, provider=provider,
    )
    return spec.model_dump()


def key_file_from_env(environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    for name in KEY_FILE_ENV:
        if env.get(name):
            return env[name]
    return None


def load_client_key(path: str | os.PathLike[str]) -> Any:
    """The private key at ``path`` (asyncssh ``SSHKey``); refuses a key that others
    can read, as OpenSSH does."""
    import asyncssh

    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise SshKeyError(f"the SSH private key {p} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SshKeyError(
            f"the SSH private key {p} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {p}")
    try:
        return asyncssh.read_private_key(str(p))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise SshKeyError(f"the SSH private key {p} cannot be loaded: {exc}") from None


async def probe_host_key(host: str, port: int, user: str, client_key: Any, *, timeout_s: float = 10.0,
                         expected: str | None = None) -> str:
    """Connect once as ``user`` with ``client_key`` and return the server's host key
    (OpenSSH line). ``expected`` (a key recorded earlier) must match. Raises
    ``OSError`` / ``asyncssh.Error`` while sshd is not up or refuses the key."""
    import asyncssh

    opts: dict[str, Any] = {"known_hosts": None}
    if expected:
        opts["known_hosts"] = ([asyncssh.import_public_key(expected)], [], [])
    async with asyncio_timeout(timeout_s):
        conn = await asyncssh.connect(host, port, username=user, client_keys=[client_key],
                                      agent_path=None, config=None, **opts)
    try:
        key = conn.get_server_host_key()
        assert key is not None
        return key.export_public_key("openssh").decode().strip()
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            await conn.wait_closed()


def asyncio_timeout(seconds: float) -> Any:
    import asyncio

    return asyncio.timeout(seconds)
