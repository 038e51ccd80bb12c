"""examples/templates validate, and docs/templates.md shows them as they are."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from overnight.templates import DirectorySource, engine_command
from overnight.templates.source import load_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "templates"
DOC = (ROOT / "docs" / "templates.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)


def test_the_examples_validate() -> None:
    source = DirectorySource(EXAMPLES)
    assert source.errors() == []
    assert {t.spec.engine.type for t in source.list_templates()} == {"vllm", "sglang", "mock"}
    assert source.get_template("mock-tiny").spec.accelerator.count == 0
    assert [p.name for p in source.list_profiles()] == ["k8s-gpu-pool", "workstation"]


def test_the_docs_show_every_example_verbatim_and_every_yaml_block_validates() -> None:
    shown = set()
    for block in _blocks("yaml"):
        first = block.splitlines()[0]
        if first.startswith("# examples/templates/"):
            name = first.removeprefix("# ")
            assert block == (ROOT / name).read_text(), f"docs/templates.md shows an outdated {name}"
            shown.add(Path(name).name)
        loaded = load_text(block, "docs/templates.md")
        assert loaded.issues == () and (loaded.templates or loaded.profiles)
    assert shown == {p.name for p in EXAMPLES.glob("*.yaml")}


def test_the_command_the_docs_quote_is_the_one_derived() -> None:
    quoted = re.search(r"The first starts\n`(vllm serve [^`]+)`", DOC)
    assert quoted
    template = DirectorySource(EXAMPLES).get_template("llama-3.1-8b-instruct")
    assert shlex.split(quoted.group(1)) == engine_command(template)


def test_the_python_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = _blocks("python")
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(os.environ, "HF_TOKEN", "x")
    exec(compile(block, "docs/templates.md", "exec"), {})  # noqa: S102 - our own documentation
