"""bench/dispatch.py's report: the ratios it prints (no benchmark is run here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def dispatch():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_dispatch", BENCH / "dispatch.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_physical_bound_is_littles_law(dispatch) -> None:  # type: ignore[no-untyped-def]
    assert dispatch.physical_bound(50, 256) == pytest.approx(5120)
    assert dispatch.physical_bound(0, 256) is None


def test_a_slow_aiohttp_client_does_not_make_the_headline_ratio_exceed_one(dispatch) -> None:  # type: ignore[no-untyped-def]
    # A loaded machine: aiohttp manages 3,000 req/s, overnight's client 4,700, the batch 4,500.
    lines = "\n".join(
        dispatch.summary(batch=4500, latency_ms=50, engine_concurrency=256, own=4700, own_concurrency=256, aiohttp=3000)
    )
    assert "ratio to the physical bound       0.879" in lines
    assert "ratio to the best direct          0.957" in lines
    assert "ratio to overnight's client       0.957" in lines
    assert "ratio to aiohttp                  1.500" in lines


def test_zero_latency_has_no_physical_bound_and_aiohttp_is_optional(dispatch) -> None:  # type: ignore[no-untyped-def]
    lines = "\n".join(
        dispatch.summary(batch=20000, latency_ms=0, engine_concurrency=256, own=20000, own_concurrency=256, aiohttp=None)
    )
    assert "physical bound                      none" in lines
    assert "ratio to the physical bound" not in lines and "aiohttp" not in lines
    assert "ratio to the best direct          1.000" in lines
