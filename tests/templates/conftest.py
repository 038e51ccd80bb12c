"""Fixtures for the template tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tdir(tmp_path):  # type: ignore[no-untyped-def]
    d = tmp_path / "templates"
    d.mkdir()
    return d
