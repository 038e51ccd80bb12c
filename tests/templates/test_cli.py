"""``overnight templates list | show | validate``: output and exit codes."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from overnight.cli.main import app
from tests.templates._yaml import PROFILE, template_yaml


def _run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["templates", *args], env=env or {"OVERNIGHT_TEMPLATES_DIR": ""},
                              terminal_width=200)


def test_list_shows_templates_newest_first_and_profiles(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "t.yaml").write_text(template_yaml("m", "1.0") + "---\n" + template_yaml("m", "1.1", status="deprecated")
                                 + "---\n" + PROFILE)
    result = _run("list", "--templates-dir", str(tdir))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "VERSION", "STATUS", "ENGINE", "ACCELERATOR", "ENDPOINTS"]
    assert lines[1].split() == ["template", "m", "1.1", "deprecated", "vllm", "1x", "H100", "/v1/chat/completions"]
    assert lines[2].split()[:4] == ["template", "m", "1.0", "active"]
    assert lines[3].split() == ["profile", "gpu-box"]


def test_the_directory_comes_from_the_environment(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "t.yaml").write_text(template_yaml("from-env"))
    result = _run("list", env={"OVERNIGHT_TEMPLATES_DIR": str(tdir)})
    assert result.exit_code == 0 and "from-env" in result.stdout
    result = _run("list")
    assert result.exit_code == 2
    assert "give --templates-dir or set OVERNIGHT_TEMPLATES_DIR" in result.stderr
    result = _run("list", "--templates-dir", str(tdir / "nope"))
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_show_prints_the_document_and_its_command(tdir) -> None:  # type: ignore[no-untyped-def]
    import yaml

    (tdir / "t.yaml").write_text(template_yaml("m", "1.0") + "---\n" + template_yaml("m", "2.0", status="deprecated")
                                 + "---\n" + PROFILE)
    result = _run("show", "m", "--templates-dir", str(tdir))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"# {tdir}/t.yaml: document 1 (m)\n")
    doc = yaml.safe_load(result.stdout)
    assert doc["kind"] == "ModelDeploymentTemplate" and doc["version"] == "1.0"
    assert result.stdout.splitlines()[-1] == (
        "# command: vllm serve meta-llama/Llama-3.1-8B-Instruct --host '{host}' --port '{port}' "
        "--served-model-name m"
    )
    assert yaml.safe_load(_run("show", "m", "--version", "2.0", "--templates-dir", str(tdir)).stdout)["status"] == (
        "deprecated")
    profile = _run("show", "gpu-box", "--profile", "--templates-dir", str(tdir))
    assert profile.exit_code == 0 and yaml.safe_load(profile.stdout)["secrets"] == {"HF_TOKEN": {"env": "HF_TOKEN"}}
    missing = _run("show", "m", "--version", "9", "--templates-dir", str(tdir))
    assert missing.exit_code == 1
    assert missing.stderr.strip() == "model template 'm' has no version '9' (versions: 2.0 (deprecated), 1.0 (active))"


def test_validate_prints_each_problem_with_file_and_field(tdir) -> None:  # type: ignore[no-untyped-def]
    (tdir / "good.yaml").write_text(template_yaml("good") + "---\n" + PROFILE)
    ok = _run("validate", str(tdir))
    assert ok.exit_code == 0 and ok.stdout.strip() == "ok: 1 template(s), 1 profile(s)"
    (tdir / "bad.yaml").write_text(template_yaml("bad", count=2, tp=4) + "---\nkind: Profile\nname: p\nenv: {A: [1]}\n")
    bad = _run("validate", "--templates-dir", str(tdir))
    assert bad.exit_code == 1
    assert bad.stderr.splitlines() == [
        f"{tdir}/bad.yaml: document 1 (bad): spec.parallelism: tp*pp*dp*ep = 4*1*1*1 = 4 but accelerator.count = 2",
        f"{tdir}/bad.yaml: document 2 (p): env.A: Input should be a valid string",
        "2 problem(s)",
    ]
    # One file on its own.
    one = _run("validate", str(tdir / "good.yaml"))
    assert one.exit_code == 0 and "1 template(s), 1 profile(s)" in one.stdout
    assert _run("validate", str(tdir / "bad.yaml")).exit_code == 1


def test_validate_the_examples_as_a_user_would() -> None:
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples" / "templates"
    proc = subprocess.run([sys.executable, "-m", "overnight.cli.main", "templates", "validate", str(examples)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok: 4 template(s), 2 profile(s)"
