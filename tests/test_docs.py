"""The docs point at things that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `a/b.py`, `docs/x.md`, `pyproject.toml`, `executor/run.py: execute()` ...
PATH_RE = re.compile(r"`([\w./-]+\.(?:py|md|toml|mako))\b")
BASES = [ROOT, ROOT / "src", ROOT / "src" / "overnight"]


def test_every_file_the_docs_name_exists() -> None:
    missing = []
    for doc in DOCS:
        for name in PATH_RE.findall(doc.read_text()):
            if not any((base / name).exists() for base in BASES):
                missing.append(f"{doc.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_benchmarks_doc_lists_every_benchmark_and_counts_them() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
    for name in scripts:
        assert f"python bench/{name}" in text, f"docs/benchmarks.md has no command for bench/{name}"
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    count = re.search(r"^(\w+) benchmarks under `bench/`", text, re.MULTILINE)
    assert count, "docs/benchmarks.md should open with how many benchmarks there are"
    assert count.group(1).lower() == words[len(scripts)], (count.group(1), scripts)
