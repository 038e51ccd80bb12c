"""The CLI a new user meets: --version, --help on every option, and what
``serve`` prints when it starts and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from overnight import __version__
from overnight.cli.main import _redact, app
from tests.conftest import free_port, wait_http


# Duck-typed: typer ships its own copy of click, so click's classes do not match.
def _commands(command, path: str = "overnight"):  # type: ignore[no-untyped-def]
    yield path, command
    for name, sub in (getattr(command, "commands", None) or {}).items():
        yield from _commands(sub, f"{path} {name}")


def test_every_option_of_every_command_has_help_and_shows_its_default() -> None:
    root = typer.main.get_command(app)
    checked = 0
    for path, command in _commands(root):
        assert command.help, f"{path} has no description"
        for param in command.params:
            if param.param_type_name != "option" or param.name in ("help", "version"):
                continue
            checked += 1
            assert param.help and param.help.strip(), f"{path} {param.opts[0]} has no help text"
            # A default is shown: a real one, or a string saying what None means.
            shows = isinstance(param.show_default, str) or (
                param.default is not None and param.show_default is not False
            )
            assert shows, f"{path} {param.opts[0]} does not show its default"
    assert checked >= 20


def test_help_shows_defaults_and_env_vars_unmangled() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "default: 8000" in result.output
    assert "default: 127.0.0.1" in result.output
    assert "OVERNIGHT_DATA_DIR" in result.output and "OVERNIGHT_STORE_URL" in result.output


def test_version_flag() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"overnight {__version__}"


def test_redact_hides_passwords_and_secret_parameters_only() -> None:
    assert _redact("sqlite:////var/lib/o.db") == "sqlite:////var/lib/o.db"
    assert _redact("postgresql://me:s3cret@db:5432/o") == "postgresql://me:***@db:5432/o"
    assert (
        _redact("s3://b/p?region=x&secret_access_key=abc&access_key_id=AK") == "s3://b/p?region=x&secret_access_key=***&access_key_id=***"
    )


def _serve_output(tmp_path: Path, extra_env: dict[str, str]) -> tuple[str, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERNIGHT_")}
    env.update({"OVERNIGHT_MOCK_LATENCY_MS": "0", **extra_env})
    proc = subprocess.Popen(
        [sys.executable, "-m", "overnight.cli.main", "serve", "--port", str(port), "--data-dir", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    return out, port


def test_serve_says_once_where_it_listens_and_with_what(tmp_path: Path) -> None:
    out, port = _serve_output(tmp_path, {})
    assert out.count("is serving") == 1, out
    assert f"base_url  http://127.0.0.1:{port}/v1" in out
    assert f"data dir  {tmp_path.resolve()}" in out
    assert f"store     sqlite:///{tmp_path.resolve()}/overnight.db" in out
    assert f"storage   file://{tmp_path.resolve()}/files" in out
    assert "engine    built-in mock engine, in-process at http://127.0.0.1:" in out
    assert "open mode" in out and "share one tenant" in out
    # uvicorn's own lines once each, not again for the in-process mock engine.
    for line in ("Started server process", "Shutting down", "Finished server process"):
        assert out.count(line) == 1, (line, out)


@pytest.mark.slow
def test_serve_reports_keyed_mode(tmp_path: Path) -> None:
    out, _ = _serve_output(tmp_path, {"OVERNIGHT_API_KEYS": "k1:team-a,k2:team-b"})
    assert "keyed mode: 2 API keys" in out, out
    assert "k1" not in out.split("auth")[-1]
