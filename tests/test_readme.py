"""Every code block of README.md runs as written.

The blocks run in README order in one temporary directory (the user's working
directory), so a server started by a bash block serves the python blocks after
it. The environment the README assumes is set up here:

* a ``pip`` on ``PATH`` that installs nothing (overnight is already installed)
  but checks each install: ``.`` with extras must name extras that exist in
  pyproject.toml, any other package must be importable;
* ports 8000 and 8100 are replaced by free ports (and ``OVERNIGHT_PORT`` is set,
  and ``OVERNIGHT_SERVER`` to the URL the CLI's default ``http://127.0.0.1:8000``
  stands for), so the test runs beside anything else on the machine.

A bash block that ends runs to completion and must exit 0. A bash block that
starts ``overnight serve`` or ``overnight mock-engine`` in the foreground is up
once every such server answers ``/health``; it keeps running until the next
server block starts (or the end) and must then shut down cleanly.

A block that needs what a test machine lacks (an S3 bucket, a PostgreSQL host)
is preceded by ``<!-- not-run: reason -->`` and skipped; every other python or
bash block runs, and a block in any other language must be ``json`` (each line
is checked to parse) or ``text``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN_LANGS = {"bash", "sh", "shell", "python"}
CHECK_LANGS = {"json", "text"}
MARKER = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```([\w+-]*)\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    not_run: str | None  # the reason, when marked


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"README.md:{start + 1}: unclosed code block"
        i += 1
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = MARKER.search(before)
        blocks.append(Block(lang, "\n".join(body) + "\n", start + 1, marker.group(1) if marker else None))
    return blocks


def test_readme_blocks_parse_markers() -> None:
    text = "a\n<!-- not-run: needs X -->\n```bash\nfoo\n```\n\n```python\nbar\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.code, b.line, b.not_run) for b in blocks] == [
        ("bash", "foo\n", 3, "needs X"),
        ("python", "bar\n", 7, None),
    ]


_PIP_SHIM = textwrap.dedent(
    """\
    #!{python}
    # Stand-in for pip in the README test: overnight is installed already.
    import importlib.util, re, sys, tomllib
    extras = set(tomllib.load(open({pyproject!r}, "rb"))["project"]["optional-dependencies"])
    args = sys.argv[1:]
    if not args or args[0] != "install":
        sys.exit(f"pip shim: only 'pip install' is expected, got {{args}}")
    for arg in args[1:]:
        if arg.startswith("-"):
            continue
        m = re.fullmatch(r"(\\.|overnight)(?:\\[([\\w,-]+)\\])?", arg)
        if m:
            unknown = set(filter(None, (m.group(2) or "").split(","))) - extras
            if unknown:
                sys.exit(f"pip shim: unknown extra(s) {{sorted(unknown)}} in {{arg}}")
        elif importlib.util.find_spec(arg.replace("-", "_")) is None:
            sys.exit(f"pip shim: {{arg}} is not installed in the test environment")
    """
)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    log: Path
    block: Block


class Session:
    def __init__(self, cwd: Path, ports: dict[str, int]) -> None:
        self.cwd = cwd
        self.ports = ports
        bin_dir = cwd.parent / "bin"
        bin_dir.mkdir()
        pip = bin_dir / "pip"
        pip.write_text(_PIP_SHIM.format(python=sys.executable, pyproject=str(ROOT / "pyproject.toml")))
        pip.chmod(0o755)
        (bin_dir / "python").symlink_to(sys.executable)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OVERNIGHT_")}
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.env["OVERNIGHT_PORT"] = str(ports["8000"])
        self.env["OVERNIGHT_SERVER"] = f"http://127.0.0.1:{ports['8000']}"  # the CLI's default, moved likewise
        self.server: Server | None = None

    def as_here(self, code: str) -> str:
        for fixed, port in self.ports.items():
            code = re.sub(rf"(?<!\d){fixed}(?!\d)", str(port), code)
        return code

    def where(self, block: Block) -> str:
        return f"README.md:{block.line} ({block.lang} block)"

    def run_python(self, block: Block) -> None:
        proc = subprocess.run(
            [sys.executable, "-c", self.as_here(block.code)],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert proc.returncode == 0, f"{self.where(block)} failed:\n{proc.stdout}\n{proc.stderr}"

    def run_bash(self, block: Block) -> None:
        code = self.as_here(block.code)
        health = self._servers_started(code)
        if not health:
            proc = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", code],
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert proc.returncode == 0, f"{self.where(block)} failed:\n{proc.stdout}\n{proc.stderr}"
            return
        self.stop()
        log = self.cwd.parent / f"block-{block.line}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-e", "-c", code],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.server = Server(proc, log, block)
        deadline = time.monotonic() + 30
        pending = set(health)
        while pending:
            if proc.poll() is not None:
                raise AssertionError(f"{self.where(block)} exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.where(block)}: {sorted(pending)} did not answer:\n{log.read_text()}")
            for url in list(pending):
                try:
                    if httpx.get(url, timeout=1).status_code == 200:
                        pending.discard(url)
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)

    def _servers_started(self, code: str) -> list[str]:
        """Health URLs of the servers this block starts."""
        urls = []
        for line in code.splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words[:-1]):
                if word != "overnight" or words[i + 1] not in ("serve", "mock-engine"):
                    continue
                args = []
                for arg in words[i + 2 :]:
                    if arg in ("&", "&&", ";", "|", "||"):
                        break
                    args.append(arg)
                port = self.ports["8000"] if words[i + 1] == "serve" else 8100
                if "--port" in args:
                    port = int(args[args.index("--port") + 1])
                urls.append(f"http://127.0.0.1:{port}/health")
        return urls

    def stop(self) -> None:
        """Stop the running server block (Ctrl-C, as a user would); it must exit cleanly."""
        server, self.server = self.server, None
        if server is None:
            return
        if server.proc.poll() is not None:
            return  # already reported by run_bash
        os.killpg(server.proc.pid, signal.SIGINT)
        try:
            rc = server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            raise AssertionError(f"{self.where(server.block)} did not stop on SIGINT:\n{server.log.read_text()}")
        out = server.log.read_text()
        assert rc in (0, 130, -signal.SIGINT), f"{self.where(server.block)} stopped with {rc}:\n{out}"
        assert "Traceback" not in out, f"{self.where(server.block)}:\n{out}"


@pytest.mark.slow  # 45 s: runs in .ci/run's slow step
def test_every_readme_block_runs_as_written(tmp_path: Path) -> None:
    blocks = readme_blocks(README.read_text())
    assert sum(b.lang == "python" for b in blocks) >= 1 and sum(b.lang == "bash" for b in blocks) >= 3
    home = tmp_path / "home"
    home.mkdir()
    session = Session(home, {"8000": free_port(), "8100": free_port()})
    ran = 0
    try:
        for block in blocks:
            if block.not_run is not None:
                assert block.not_run, f"README.md:{block.line}: a not-run marker must give its reason"
                continue
            if block.lang == "python":
                session.run_python(block)
            elif block.lang in ("bash", "sh", "shell"):
                session.run_bash(block)
            elif block.lang == "json":
                for line in filter(str.strip, block.code.splitlines()):
                    json.loads(line)
                continue
            else:
                assert block.lang in CHECK_LANGS, (
                    f"README.md:{block.line}: a ```{block.lang or '(no language)'} block is neither run nor "
                    "marked <!-- not-run: reason -->; give it a language (bash, python, json, text)"
                )
                continue
            ran += 1
    finally:
        session.stop()
    assert ran >= 4


def test_readme_dependency_table_covers_pyproject() -> None:
    """Each dependency in pyproject.toml says in the README what it is for."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        names += extra
    readme = README.read_text()
    table = readme[readme.index("## Dependencies and what each is for") :]
    missing = []
    for spec in names:
        name = re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0]
        if name == "overnight":  # the aggregate extras
            continue
        if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", table, re.IGNORECASE):
            missing.append(name)
    assert not missing, f"README's dependency table does not mention {missing}"
