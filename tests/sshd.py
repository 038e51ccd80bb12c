"""A real OpenSSH server for tests: Debian's ``/usr/sbin/sshd`` on 127.0.0.1 with
shims standing in for a GPU machine's ``vllm``, ``docker``, ``sudo`` and ``nvidia-smi``.

Use the ``sshd`` fixture (``tests/conftest.py``) or the class directly::

    from tests.sshd import Sshd

    def test_x(sshd: Sshd) -> None:          # started; stopped and cleaned up afterwards
        spec = {"type": "ssh", "host": sshd.host, "port": sshd.port, "user": sshd.user,
                "host_key": sshd.host_key_line(), "command": ["vllm", "serve", "m", "--host", "{host}",
                "--port", "{port}"], "provision_id": "p1"}
        ...  # connect with sshd.client_key_path (mode 600)
        assert sshd.calls("docker")[0][:3] == ["run", "-d", "--name"]
        assert sshd.engines_running() == []

    s = Sshd(tmp_path)    # not started: s.port is already chosen (to start it late)
    s.start(); ...; s.close()

API (all synchronous):

- ``Sshd(tmp_dir, *, port=None)``: a config, host key (ed25519), client key pair and
  authorized_keys under ``tmp_dir/sshd``; ``port`` a free one unless given.
- ``host`` ("127.0.0.1"), ``port``, ``user`` (the user running the tests; sshd runs as
  that user and accepts only it), ``client_key_path`` (private key, mode 600),
  ``shims_dir``, ``state_dir``, ``home`` (``$HOME`` of the sessions: a directory of the test's own).
- ``start()``: runs ``sshd -D -f <cfg>`` and waits until it answers; checks that a plain
  (non-login) exec session finds the shims first on its PATH. ``stop()``: stops sshd
  (mock engines it started keep running, as on a machine whose sshd restarts).
- ``close()``: the finalizer: kills every process started through this sshd (engines,
  ``tail``/``docker logs`` streamers, wrappers: they all carry ``MARK_ENV``) and sshd.
- ``host_key_line()``: the server's host key as one OpenSSH line (``ssh-ed25519 AAAA...``).
- ``calls(name=None)``: the argv (without the program) of every shim call, in order;
  with ``name`` (``vllm``, ``docker``, ``sudo``, ``nvidia-smi``) only that program's.
- ``engines_running()``: pids of mock engines started through the shims that still run.
  ``engine_environ(pid)``: such an engine's environment.
- ``processes()``: pids of every live process started through this sshd.
- ``drop_connections()``: kills sshd's per-connection processes (a network cut as the
  client sees it); sshd itself keeps listening.
- ``fail_nvidia_smi(True)``, ``fail_docker(True)``: make those shims fail like a machine
  without a driver / without Docker.

The shims, put first on PATH with sshd's ``SetEnv`` (so every exec session sees them,
login shell or not):

- ``vllm serve MODEL --host H --port P [--served-model-name N] ...``: execs the built-in mock
  engine on H:P serving N (or MODEL); other flags are ignored.
- ``docker``: ``info``; ``run -d --name N [--gpus all] [--ipc=host] -p 127.0.0.1:P:P
  [-e K=V | -e K] [--env-file F] [--label ...] IMAGE MODEL ARGS`` starts a detached mock
  engine on 127.0.0.1:P (a "container": its own session, environment from -e/--env-file)
  and prints an id; ``rm -f N``; ``inspect [--format F] N`` (``{{.State.Running}}``,
  ``{{.State.ExitCode}}``, ``{{.State.Status}}``, ``{{.Id}}``; JSON without ``--format``);
  ``ps`` (running names); ``logs [-f] [--tail N] N`` (``-f`` ends when the container does).
- ``sudo [-n] CMD ...``: runs CMD (no password, PATH kept).
- ``nvidia-smi [-L]``: one GPU line, or the driver error after ``fail_nvidia_smi(True)``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

__all__ = ["MARK_ENV", "Sshd"]

SSHD = "/usr/sbin/sshd"
#: Every process started through a test sshd carries ``MARK_ENV=<that sshd's id>``.
MARK_ENV = "OVERNIGHT_TEST_SSHD"
SHIMS = ("vllm", "docker", "sudo", "nvidia-smi")

# One script for every shim (symlinked under each name); it reads its settings from
# shim.json next to it. Written for the Python running the tests.
_SHIM = r'''
import json, os, signal, subprocess, sys, time, uuid

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = json.load(open(os.path.join(HERE, "shim.json")))
STATE = CFG["state"]
NAME = os.path.basename(sys.argv[0])
ARGS = sys.argv[1:]


def log_call():
    line = json.dumps([NAME, *ARGS]) + "\n"
    fd = os.open(CFG["calls"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def die(msg, code=1):
    sys.stderr.write(msg + "\n")
    sys.exit(code)


def flag_value(args, i):
    """(value, next index) of the flag at args[i] (``--x v`` or ``--x=v``)."""
    if "=" in args[i] and args[i].startswith("--"):
        return args[i].split("=", 1)[1], i + 1
    if i + 1 >= len(args):
        die(f"{NAME}: flag {args[i]} needs a value", 2)
    return args[i + 1], i + 2


def engine_argv(args, host, port):
    """The mock engine for vLLM's arguments: MODEL first, then flags."""
    model, served = None, None
    i = 0
    if args and not args[0].startswith("-"):
        model, i = args[0], 1
    while i < len(args):
        a = args[i]
        key = a.split("=", 1)[0]
        if key in ("--host", "--port", "--served-model-name", "--model"):
            v, i = flag_value(args, i)
            if key == "--host" and host is None:
                host = v
            elif key == "--port" and port is None:
                port = v
            elif key == "--served-model-name":
                served = v
            elif key == "--model":
                model = v
        else:
            i += 1
    if port is None:
        die(f"{NAME}: no --port", 2)
    return [CFG["python"], "-m", "overnight.cli.main", "mock-engine", "--host", host or "127.0.0.1",
            "--port", str(port), "--model", served or model or "mock-model"]


def engine_env(extra):
    env = dict(os.environ)
    env.update(extra)
    env[CFG["mark_env"]] = CFG["mark"]
    return env


def vllm():
    if not ARGS or ARGS[0] != "serve":
        die("usage: vllm serve MODEL --host H --port P ...", 2)
    argv = engine_argv(ARGS[1:], None, None)
    os.execve(argv[0], argv, engine_env({}))


def nvidia_smi():
    if os.path.exists(os.path.join(STATE, "nvidia-smi-fails")):
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
              "Make sure that the latest NVIDIA driver is installed and running.")
        sys.exit(9)
    print("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)")


def sudo():
    args = list(ARGS)
    while args and args[0].startswith("-"):
        args.pop(0)
    if not args:
        die("usage: sudo [-n] command", 1)
    os.execvp(args[0], args)


# -- docker -------------------------------------------------------------------------------
CONTAINERS = os.path.join(STATE, "containers")


def cdir(name):
    return os.path.join(CONTAINERS, name)


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def running(name):
    pid = read(os.path.join(cdir(name), "pid"))
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except OSError:
        return False
    try:  # a zombie (not reaped yet) has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def no_such(name, what="container"):
    die(f"Error response from daemon: No such {what}: {name}", 1)


def docker_run(args):
    name, image, detach, publish, env, i = None, None, False, None, {}, 0
    while i < len(args):
        a = args[i]
        key = a.split("=", 1)[0]
        if a in ("-d", "--detach", "--rm"):
            detach = detach or a != "--rm"
            i += 1
        elif key in ("--ipc", "--gpus", "--shm-size", "--label", "-v", "--volume", "--name", "-p", "--publish",
                     "-e", "--env", "--env-file"):
            v, i = flag_value(args, i) if key.startswith("--") else (args[i + 1], i + 2)
            if key == "--name":
                name = v
            elif key in ("-p", "--publish"):
                publish = v
            elif key in ("-e", "--env"):
                if "=" in v:
                    k, _, val = v.partition("=")
                    env[k] = val
                elif v in os.environ:
                    env[v] = os.environ[v]
            elif key == "--env-file":
                try:
                    lines = open(v).read().splitlines()
                except OSError as exc:
                    die(f"docker: open {v}: {exc.strerror}", 125)
                for line in lines:
                    if line.strip() and not line.startswith("#"):
                        k, _, val = line.partition("=")
                        env[k] = val
        elif a.startswith("-"):
            die(f"unknown flag: {a}", 125)
        else:
            image = a
            i += 1
            break
    rest = args[i:]
    if not detach or not name or not image:
        die("docker run: this shim needs -d, --name and an image", 125)
    if publish is None or publish.count(":") != 2:
        die("docker run: this shim needs -p HOST_IP:HOST_PORT:CONTAINER_PORT", 125)
    host_ip, host_port, _ = publish.split(":")
    d = cdir(name)
    if os.path.isdir(d):
        die(f'docker: Error response from daemon: Conflict. The container name "/{name}" is already in use.', 125)
    os.makedirs(d)
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    with open(os.path.join(d, "id"), "w") as f:
        f.write(cid)
    with open(os.path.join(d, "image"), "w") as f:
        f.write(image)
    # What listens inside a container on 0.0.0.0:P is reached on the published host address.
    argv = engine_argv(rest, host_ip, host_port)
    log = open(os.path.join(d, "log"), "ab")
    exit_path = os.path.join(d, "exit")
    proc = subprocess.Popen(
        ["sh", "-c", '"$@"; echo $? > "$0"', exit_path, *argv],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=engine_env(env),
        start_new_session=True, close_fds=True,
    )
    with open(os.path.join(d, "pid"), "w") as f:
        f.write(str(proc.pid))
    print(cid)


def docker_rm(args):
    names = [a for a in args if not a.startswith("-")]
    force = any(a in ("-f", "--force") for a in args)
    code = 0
    for name in names:
        d = cdir(name)
        if not os.path.isdir(d):
            if not force:
                sys.stderr.write(f"Error response from daemon: No such container: {name}\n")
                code = 1
            continue
        if running(name):
            if not force:
                die(f"Error response from daemon: cannot remove container {name}: container is running", 1)
            pid = int(read(os.path.join(d, "pid")))
            with __import__("contextlib").suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            for _ in range(200):
                if not running(name):
                    break
                time.sleep(0.05)
        __import__("shutil").rmtree(d, ignore_errors=True)
        print(name)
    sys.exit(code)


def state_of(name):
    d = cdir(name)
    run = running(name)
    code = read(os.path.join(d, "exit"))
    return {"Id": read(os.path.join(d, "id"), ""), "Name": "/" + name,
            "State": {"Running": run, "Status": "running" if run else "exited",
                      "ExitCode": 0 if run else int(code if code is not None else 137)},
            "Config": {"Image": read(os.path.join(d, "image"), "")}}


def docker_inspect(args):
    fmt, names, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a.split("=", 1)[0] in ("-f", "--format"):
            fmt, i = flag_value(args, i) if a.startswith("--") else (args[i + 1], i + 2)
        elif a.startswith("-"):
            i += 1
        else:
            names.append(a)
            i += 1
    out = []
    for name in names:
        if not os.path.isdir(cdir(name)):
            sys.stdout.write("\n".join(out) + ("\n" if out else ""))
            die(f"Error: No such object: {name}", 1)
        s = state_of(name)
        if fmt is None:
            out.append(json.dumps([s]))
        else:
            text = (fmt.replace("{{.State.Running}}", "true" if s["State"]["Running"] else "false")
                    .replace("{{.State.ExitCode}}", str(s["State"]["ExitCode"]))
                    .replace("{{.State.Status}}", s["State"]["Status"]).replace("{{.Id}}", s["Id"]))
            out.append(text)
    print("\n".join(out))


def docker_logs(args):
    follow, tail, name, i = False, "all", None, 0
    while i < len(args):
        a = args[i]
        if a in ("-f", "--follow"):
            follow, i = True, i + 1
        elif a.split("=", 1)[0] in ("-n", "--tail"):
            tail, i = flag_value(args, i) if a.startswith("--") else (args[i + 1], i + 2)
        else:
            name, i = a, i + 1
    if name is None or not os.path.isdir(cdir(name)):
        no_such(name)
    argv = ["tail", "-n", "+1" if tail == "all" else str(int(tail))]
    if follow and running(name):
        argv += ["-F", "--pid", read(os.path.join(cdir(name), "pid"))]
    os.execvp("tail", [*argv, os.path.join(cdir(name), "log")])


def docker():
    if os.path.exists(os.path.join(STATE, "docker-fails")):
        die("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?", 1)
    if not ARGS:
        die("usage: docker COMMAND", 1)
    cmd, args = ARGS[0], ARGS[1:]
    os.makedirs(CONTAINERS, exist_ok=True)
    if cmd == "info":
        print("Server:\n Containers: %d\n Server Version: 27.0.0-overnight-test-shim" % len(os.listdir(CONTAINERS)))
    elif cmd == "run":
        docker_run(args)
    elif cmd == "rm":
        docker_rm(args)
    elif cmd == "inspect":
        docker_inspect(args)
    elif cmd == "ps":
        print("NAMES")
        for name in sorted(os.listdir(CONTAINERS)):
            if running(name):
                print(name)
    elif cmd == "logs":
        docker_logs(args)
    else:
        die(f"docker: '{cmd}' is not a docker command (this shim)", 1)


log_call()
{"vllm": vllm, "docker": docker, "sudo": sudo, "nvidia-smi": nvidia_smi}[NAME]()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


class Sshd:
    """A real sshd on 127.0.0.1 with GPU-machine shims (see the module docstring)."""

    host = "127.0.0.1"

    def __init__(self, tmp_dir: Path, *, port: int | None = None) -> None:
        self.root = Path(tmp_dir) / f"sshd-{uuid.uuid4().hex[:6]}"
        self.root.mkdir(parents=True)
        self.port = port or _free_port()
        self.user = getpass.getuser()
        self.mark = uuid.uuid4().hex
        self.shims_dir = self.root / "shims"
        #: The login user's HOME in its sessions (sshd's SetEnv), so nothing lands in the real one.
        self.home = self.root / "home"
        self.state_dir = self.root / "state"
        self.calls_log = self.root / "calls.jsonl"
        self.log_path = self.root / "sshd.log"
        self.host_key_path = self.root / "host_ed25519"
        self.client_key_path = self.root / "client_ed25519"
        self.config_path = self.root / "sshd_config"
        self.proc: subprocess.Popen[bytes] | None = None
        self.shims_dir.mkdir()
        self.home.mkdir()
        self.state_dir.mkdir()
        for path in (self.host_key_path, self.client_key_path):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "overnight-test", "-f", str(path)],
                           check=True, stdin=subprocess.DEVNULL)
        os.chmod(self.client_key_path, 0o600)
        authorized = self.root / "authorized_keys"
        shutil.copy(str(self.client_key_path) + ".pub", authorized)
        os.chmod(authorized, 0o600)
        self._write_shims()
        path = f"{self.shims_dir}:{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
        self.config_path.write_text("\n".join([
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key_path}",
            f"AuthorizedKeysFile {authorized}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AllowUsers {self.user}",
            "AllowTcpForwarding yes",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            "UseDNS no",
            "MaxSessions 100",
            "MaxStartups 100",
            # Exec sessions (login shell or not) see the shims first; every process
            # started through this sshd carries the mark (close() kills them all).
            f"SetEnv PATH={path} HOME={self.home} {MARK_ENV}={self.mark}",
            "",
        ]))

    def _write_shims(self) -> None:
        script = self.shims_dir / "_shim.py"
        script.write_text(f"#!{sys.executable}\n" + _SHIM)
        script.chmod(0o755)
        (self.shims_dir / "shim.json").write_text(json.dumps({
            "state": str(self.state_dir), "calls": str(self.calls_log), "python": sys.executable,
            "mark_env": MARK_ENV, "mark": self.mark,
        }))
        for name in SHIMS:
            (self.shims_dir / name).symlink_to(script)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 15.0) -> Sshd:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config_path)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(64).startswith(b"SSH-"):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd did not answer on {self.host}:{self.port}:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        return self

    def check_path(self) -> None:
        """A plain exec session (as the runtime opens) finds every shim in ``shims_dir``."""
        out = self.ssh("for c in " + " ".join(SHIMS) + "; do command -v $c; done")
        found = out.stdout.split()
        want = [str(self.shims_dir / n) for n in SHIMS]
        if found != want:
            raise RuntimeError(f"the shims are not first on PATH of exec sessions: {found} != {want}")

    def ssh(self, command: str, *, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run ``command`` through this sshd with the OpenSSH client (for checks in tests)."""
        return subprocess.run(
            ["ssh", "-i", str(self.client_key_path), "-p", str(self.port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
             f"{self.user}@{self.host}", command],
            check=False, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Stop the listening sshd (and so its connections); engines keep running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Kill everything started through this sshd, then sshd."""
        self.drop_connections()
        self.stop()
        for _ in range(3):
            procs = self._marked()
            if not procs:
                break
            for p in procs:
                with contextlib.suppress(psutil.Error, OSError):
                    p.send_signal(signal.SIGKILL)
            psutil.wait_procs(procs, timeout=5)

    # -- what happened ------------------------------------------------------------------------
    def host_key_line(self) -> str:
        kind, blob = (Path(str(self.host_key_path) + ".pub").read_text().split() + ["", ""])[:2]
        return f"{kind} {blob}"

    def calls(self, name: str | None = None) -> list[list[str]]:
        if not self.calls_log.exists():
            return []
        out = []
        for line in self.calls_log.read_text().splitlines():
            prog, *argv = json.loads(line)
            if name is None or prog == name:
                out.append(argv if name is not None else [prog, *argv])
        return out

    def _marked(self) -> list[psutil.Process]:
        out = []
        for proc in psutil.process_iter(["status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if _environ(proc).get(MARK_ENV) == self.mark:
                out.append(proc)
        return out

    def processes(self) -> list[int]:
        return sorted(p.pid for p in self._marked())

    def engines_running(self) -> list[int]:
        out = []
        for p in self._marked():
            with contextlib.suppress(psutil.Error):
                cmd = p.cmdline()
                if cmd[1:4] == ["-m", "overnight.cli.main", "mock-engine"]:  # not the wrappers running one
                    out.append(p.pid)
        return sorted(out)

    def engine_environ(self, pid: int) -> dict[str, str]:
        return _environ(psutil.Process(pid))

    def drop_connections(self) -> None:
        """Kill sshd's per-connection processes (the listener stays)."""
        if self.proc is None:
            return
        kids: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            for k in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if k.name() == "sshd":  # the monitor and the user's network process
                        kids.append(k)
        for k in kids:
            with contextlib.suppress(psutil.Error):
                k.send_signal(signal.SIGKILL)
        psutil.wait_procs(kids, timeout=5)

    # -- knobs --------------------------------------------------------------------------------
    def _knob(self, name: str, on: bool) -> None:
        path = self.state_dir / name
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def fail_nvidia_smi(self, on: bool = True) -> None:
        self._knob("nvidia-smi-fails", on)

    def fail_docker(self, on: bool = True) -> None:
        self._knob("docker-fails", on)
