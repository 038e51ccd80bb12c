"""What ships: pyproject.toml, the wheel built from it, and the container image.

There is no Docker engine on the test machine, so the Dockerfile is checked by
parsing it (pinned base, numeric non-root user, health check, the wheel is what
gets installed, nothing fetched or secret) and against deploy/kubernetes/, and what
the image does is done here instead: build the wheel, install it with its extras
into a fresh virtual environment, and run the image's ENTRYPOINT + CMD and its
HEALTHCHECK from there.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: One extra per store / storage backend and the Kubernetes runtimes; `all` is them.
BACKEND_EXTRAS = {"postgres", "redis", "mongo", "s3", "kubernetes", "ssh"}
#: A web console's assets: no file matches them until one exists (the wheel built
#: with some in test_wheel_ships_web_assets_anywhere_in_the_package proves them).
WEB_ASSET_PATTERNS = {"**/*.html", "**/*.js", "**/*.css"}


# -- pyproject.toml ---------------------------------------------------------------------
def test_every_package_data_pattern_matches_a_file() -> None:
    config = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert WEB_ASSET_PATTERNS <= set(config["overnight"])
    for package, patterns in config.items():
        base = ROOT / "src" / package.replace(".", "/")
        for pattern in patterns:
            if package == "overnight" and pattern in WEB_ASSET_PATTERNS:
                continue
            assert any(p.is_file() for p in base.glob(pattern)), f"package-data {package}: {pattern!r} matches nothing"


def _self_extras(requirements: list[str]) -> set[str]:
    """The extras named by ``overnight[a,b]`` entries (an aggregate extra)."""
    named: set[str] = set()
    for req in requirements:
        m = re.fullmatch(r"overnight\[([\w,\s-]+)\]", req.strip())
        if m:
            named |= {e.strip() for e in m.group(1).split(",")}
    return named


def test_one_extra_per_backend_and_all_is_exactly_them() -> None:
    extras = PROJECT["optional-dependencies"]
    assert BACKEND_EXTRAS <= set(extras), f"missing extras: {sorted(BACKEND_EXTRAS - set(extras))}"
    for name in BACKEND_EXTRAS:
        assert extras[name], f"extra {name!r} installs nothing"
    # What `pip install overnight[all]` and the container image get: every backend,
    # none of the benchmark or test tools.
    assert _self_extras(extras["all"]) == BACKEND_EXTRAS
    assert "all" in _self_extras(extras["test"])


# -- the wheel ------------------------------------------------------------------------
def _source_copy(dest: Path) -> Path:
    """What the wheel is built from (the Docker build context), without build
    leftovers: an in-tree build/ directory would leak stale modules into the wheel."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return dest


def _build_wheel(source: Path, out: Path) -> Path:
    """``python -m build --wheel`` without network: the build backend comes from
    this environment (setuptools, and wheel for setuptools < 70.1)."""
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("overnight-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    return _build_wheel(_source_copy(base / "src-copy"), base / "dist")


def _package_files(src: Path) -> set[str]:
    return {
        p.relative_to(src).as_posix()
        for p in (src / "overnight").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_wheel_ships_every_package_file_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("overnight/")}
    expected = _package_files(ROOT / "src")
    assert expected - shipped == set(), f"missing from the wheel: {sorted(expected - shipped)}"
    assert shipped - expected == set(), f"in the wheel but not in src/: {sorted(shipped - expected)}"
    # What the image and `overnight db upgrade` need by name.
    for name in ("overnight/py.typed", "overnight/store/migrations/env.py", "overnight/store/migrations/script.py.mako"):
        assert name in shipped
    assert any(re.fullmatch(r"overnight/store/migrations/versions/\d{4}_\w+\.py", n) for n in shipped)


def test_wheel_metadata_declares_the_extras_and_the_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        dist_info = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert meta["Name"] == "overnight" and meta["Version"] == PROJECT["version"]
    assert BACKEND_EXTRAS | {"all"} <= set(meta.get_all("Provides-Extra"))
    declared = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    for extra in BACKEND_EXTRAS:
        for spec in PROJECT["optional-dependencies"][extra]:
            want = Requirement(spec)
            assert any(
                canonicalize_name(r.name) == canonicalize_name(want.name)
                and r.specifier == want.specifier
                and r.marker is not None
                and r.marker.evaluate({"extra": extra})
                and not r.marker.evaluate({"extra": ""})
                for r in declared
            ), (extra, spec)
    assert re.search(r"^overnight = overnight\.cli\.main:main$", entry_points, re.MULTILINE), entry_points


def test_wheel_ships_web_assets_anywhere_in_the_package(tmp_path: Path) -> None:
    """A web console added later (src/overnight/console_static/) ships in the wheel
    with no packaging change: its files are built into one here."""
    source = _source_copy(tmp_path / "src-copy")
    assets = {
        "overnight/console_static/index.html": "<!doctype html><title>overnight</title>",
        "overnight/console_static/assets/app.js": "console.log('overnight');",
        "overnight/console_static/assets/app.css": "body { margin: 0 }",
    }
    for rel, text in assets.items():
        (source / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / "src" / rel).write_text(text)
    built = _build_wheel(source, tmp_path / "dist")
    with zipfile.ZipFile(built) as zf:
        names = set(zf.namelist())
        assert set(assets) <= names, f"missing: {sorted(set(assets) - names)}"
        assert zf.read("overnight/console_static/assets/app.js").decode() == assets["overnight/console_static/assets/app.js"]


# -- the Dockerfile -------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined
    line: int

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; comment lines (also inside a continuation) dropped."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        continues = line.endswith("\\")
        parts.append(line[:-1].strip() if continues else line)
        if not continues:
            keyword, _, args = " ".join(parts).partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    assert not parts, "the Dockerfile ends inside a continued line"
    return out


def _stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[list[Instruction]]]:
    """Global ARG defaults (before the first FROM) and the stages, each from its FROM."""
    global_args: dict[str, str] = {}
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([ins])
        elif stages:
            stages[-1].append(ins)
        else:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may precede FROM"
            name, _, default = ins.args.partition("=")
            global_args[name] = default
    return global_args, stages


DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text())
GLOBAL_ARGS, STAGES = _stages(DOCKERFILE)
FINAL = STAGES[-1]


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the stage, found {len(found)}"
    return found[0]


def _env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(ins.args))
    return env


def _deploy_container() -> tuple[dict[str, Any], dict[str, Any]]:
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/base/deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "overnight")


def test_dockerfile_bases_are_pinned_by_version_and_digest() -> None:
    images = []
    for stage in STAGES:
        words = stage[0].args.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: GLOBAL_ARGS[m.group(1)], words[0])
        images.append(image)
        m = re.fullmatch(r"python:(3)\.(\d+)\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image)
        assert m, f"line {stage[0].line}: {image!r} is not python:3.X.Y-slim-bookworm@sha256:<digest>"
        floor = re.fullmatch(r">=\s*3\.(\d+)", PROJECT["requires-python"])
        assert floor and int(m.group(2)) >= int(floor.group(1))
    # The runtime stage runs the build stage's virtual environment: same interpreter.
    assert len(STAGES) >= 2 and len(set(images)) == 1, images


def test_dockerfile_runs_as_the_numeric_user_deploy_expects() -> None:
    user = _one(FINAL, "USER").args
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user!r}: numeric, so runAsNonRoot can verify it"
    uid, _, gid = user.partition(":")
    assert int(uid) != 0 and (not gid or int(gid) != 0)
    pod, container = _deploy_container()
    assert int(uid) == pod["securityContext"]["runAsUser"]
    assert int(gid or uid) == pod["securityContext"]["runAsGroup"]
    # USER is the last word on who runs: nothing after it may switch back.
    assert FINAL[-1].keyword != "USER" and [i.keyword for i in FINAL].count("USER") == 1
    # The one writable path (the root file system is read-only in deploy/) is made
    # for that user, and it is where the service keeps its data.
    data_dir = _env(FINAL)["OVERNIGHT_DATA_DIR"]
    deploy_env = {e["name"]: e.get("value") for e in container["env"]}
    assert data_dir == deploy_env["OVERNIGHT_DATA_DIR"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(i.keyword == "RUN" and f"-o {uid}" in i.args and data_dir in i.args for i in FINAL)
    assert _env(FINAL)["HOME"] == data_dir


def test_dockerfile_serves_by_default_and_runs_the_job_worker() -> None:
    from overnight.runtimes.kubernetes.manifests import WORKER_COMMAND

    entrypoint = _one(FINAL, "ENTRYPOINT").exec_form()
    assert entrypoint == ["overnight"]
    assert _one(FINAL, "CMD").exec_form() == ["serve", "--host", "0.0.0.0"]
    # Job pods and deploy/ override the command with the same program.
    _, container = _deploy_container()
    assert WORKER_COMMAND[0] == entrypoint[0] == container["command"][0]
    assert WORKER_COMMAND[1] == "worker" and container["command"][1] == "serve"
    assert _env(FINAL)["PATH"].startswith("/opt/overnight/bin:")
    # The port: EXPOSE, the service's default, deploy's containerPort.
    exposed = _one(FINAL, "EXPOSE").args.split()
    port = container["ports"][0]["containerPort"]
    from overnight.config import Settings

    assert exposed == [str(port)] == [str(Settings.model_fields["port"].default)]


def test_dockerfile_health_check_asks_health_on_the_service_port() -> None:
    check = _one(FINAL, "HEALTHCHECK").args
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "/health" in argv[2] and "OVERNIGHT_PORT" in argv[2] and "'8000'" in argv[2]


def test_dockerfile_installs_the_built_wheel_with_the_backend_extras() -> None:
    build_stage = STAGES[0]
    runs = " && ".join(i.args for i in build_stage if i.keyword == "RUN")
    m = re.search(r"pip wheel\b[^&]*--wheel-dir (\S+) \.", runs)
    assert m, "the build stage builds a wheel of the project"
    wheel_dir = m.group(1)
    # The install target: the wheel file with extras, named directly or through a
    # shell variable set from the wheel directory's glob.
    targets = re.findall(r"\binstall\b[^&]*?\s\"?(\S+?)\[([\w,-]+)\]\"?", runs)
    assert len(targets) == 1, targets
    target, extras = targets[0]
    var = re.fullmatch(r"\$\{?(\w+)\}?", target)
    if var:
        assigned = re.search(rf"\b{var.group(1)}=\"?\$\(echo ({re.escape(wheel_dir)}/overnight-\*\.whl)\)", runs)
        assert assigned, f"{target} is not set from the built wheel"
        target = assigned.group(1)
    assert target.startswith(f"{wheel_dir}/") and target.endswith(".whl"), target
    named = set(extras.split(","))
    if "all" in named:
        named |= _self_extras(PROJECT["optional-dependencies"]["all"])
    assert {"postgres", "redis", "s3", "kubernetes"} <= named, named
    # Never the source tree or an editable install.
    assert not re.search(r"\binstall\b[^&]*\s(-e|--editable|\.)(\s|$)", runs)
    # The runtime stage takes the installed environment only: no source, no pip run.
    for ins in FINAL:
        if ins.keyword in ("COPY", "ADD"):
            assert ins.args.startswith("--from="), f"line {ins.line}: the runtime stage copies from the context"
        if ins.keyword == "RUN":
            assert "pip" not in ins.args, f"line {ins.line}: pip in the runtime stage"


def test_dockerfile_fetches_nothing_and_holds_no_secrets() -> None:
    secret_word = re.compile(r"(KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL)", re.IGNORECASE)
    for ins in DOCKERFILE:
        assert ins.keyword != "ADD", f"line {ins.line}: ADD (use COPY; fetch nothing over http)"
        assert not re.search(r"\b(curl|wget)\b", ins.args), f"line {ins.line}: downloads at build time"
        if ins.keyword in ("ENV", "ARG"):
            for kv in shlex.split(ins.args):
                name = kv.split("=", 1)[0]
                assert not secret_word.search(name), f"line {ins.line}: {name} looks like a secret baked in"
        assert not re.search(r"--mount=type=secret|AKIA[0-9A-Z]{16}", ins.args), f"line {ins.line}"


# -- .dockerignore ----------------------------------------------------------------------
def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regex over a
    slash-separated path relative to the context."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern
    that matches the path or one of its parent directories decides; ``!`` keeps."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        keep = raw.startswith("!")
        rx = _ignore_regex(raw.removeprefix("!").strip().strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not keep
    return excluded


DOCKERIGNORE = [
    line.strip()
    for line in (ROOT / ".dockerignore").read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def test_dockerignore_matcher_follows_docker_rules() -> None:
    assert dockerignored(["*"], "a/b") and not dockerignored(["*", "!a"], "a/b")
    assert dockerignored(["*", "!a", "**/c"], "a/b/c/d") and dockerignored(["**/c"], "c")
    assert not dockerignored(["*.pyc"], "a/x.pyc")  # * does not cross directories


def test_dockerignore_keeps_the_context_to_the_wheel_sources() -> None:
    for path in ("pyproject.toml", "README.md", "src/overnight/__init__.py", "src/overnight/store/migrations/env.py"):
        assert not dockerignored(DOCKERIGNORE, path), path
    for path in (
        ".git/config",
        ".env",
        "overnight-data/secret.key",
        "tests/test_packaging.py",
        ".venv/bin/python",
        "dist/overnight-0.1.0-py3-none-any.whl",
        "build/lib/overnight/__init__.py",
        "src/overnight/__pycache__/config.cpython-311.pyc",
        "src/overnight.egg-info/PKG-INFO",
    ):
        assert dockerignored(DOCKERIGNORE, path), path
    # Every package file reaches the build, and so does everything COPY names.
    for rel in _package_files(ROOT / "src"):
        assert not dockerignored(DOCKERIGNORE, f"src/{rel}"), rel
    for ins in DOCKERFILE:
        if ins.keyword == "COPY" and not ins.args.startswith("--from="):
            for source in shlex.split(ins.args)[:-1]:
                assert (ROOT / source).exists() and not dockerignored(DOCKERIGNORE, source), source


# -- the wheel in a fresh virtual environment: what the image runs ---------------------
def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("OVERNIGHT_", "PYTHON", "PIP_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_venv_runs_like_the_image(wheel: Path, tmp_path: Path) -> None:
    """``pip install <wheel>[all]`` into a new venv, then the image's ENTRYPOINT + CMD
    and HEALTHCHECK from it. The venv sees this environment's site-packages
    (``--system-site-packages``): the dependencies cannot be downloaded offline, and
    ``--no-index`` makes pip resolve every one of them, the extras' included, from what
    is installed. overnight itself must come from the wheel, not the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    env = _clean_env()
    pip = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--no-index", "--find-links", str(wheel.parent),
         "--disable-pip-version-check", f"{wheel}[all]"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, f"{pip.stdout}\n{pip.stderr}"

    probe = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "import overnight, sys; from overnight.store import postgres as p; "
         "print(overnight.__file__); print(p._MIGRATIONS_DIR); print(p.head_revision())"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    module, migrations, head = probe.stdout.split()
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert Path(module).is_relative_to(site) and Path(migrations).is_relative_to(site), probe.stdout
    from overnight.store.postgres import head_revision

    assert head == head_revision()  # the wheel's migration scripts, complete

    exe = str(bin_dir / _one(FINAL, "ENTRYPOINT").exec_form()[0])
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"overnight {PROJECT['version']}"
    from overnight.runtimes.kubernetes.manifests import WORKER_COMMAND

    worker = subprocess.run([exe, *WORKER_COMMAND[1:], "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert worker.returncode == 0 and "--podinfo-dir" in worker.stdout, worker.stdout + worker.stderr

    # ENTRYPOINT + CMD with the image's ENV, the data directory and port moved here.
    port = free_port()
    image_env = _env(FINAL)
    run_env = _clean_env(
        OVERNIGHT_DATA_DIR=str(tmp_path / "data"),
        OVERNIGHT_PORT=str(port),
        PYTHONDONTWRITEBYTECODE=image_env["PYTHONDONTWRITEBYTECODE"],
        PYTHONUNBUFFERED=image_env["PYTHONUNBUFFERED"],
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    (tmp_path / "data").mkdir()
    log = tmp_path / "serve.log"
    health_cmd = json.loads(_one(FINAL, "HEALTHCHECK").args.partition("CMD ")[2])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, *_one(FINAL, "CMD").exec_form()], cwd=tmp_path / "data", env=run_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=30, proc=proc)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "ok"
        check = subprocess.run(health_cmd, env=run_env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    output = log.read_text()
    # What `docker stop` sends; uvicorn re-raises SIGTERM after a clean shutdown.
    assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output
    assert "Traceback" not in output, output
    assert (tmp_path / "data" / "overnight.db").is_file()  # OVERNIGHT_DATA_DIR was used
    # With nothing listening the health check fails, as Docker must see it.
    down = subprocess.run(health_cmd, env=run_env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0
