"""The mock engine's settings."""

from __future__ import annotations

from dataclasses import dataclass

from overnight.mock_engine.batching import BatchingParams

__all__ = ["METRIC_FLAVOURS", "MockEngineConfig"]

METRIC_FLAVOURS = ("vllm", "sglang", "off")


@dataclass(frozen=True, kw_only=True)
class MockEngineConfig:
    """How the mock engine behaves. All times are in milliseconds."""

    latency_ms: float = 50.0
    """Base service time per request."""
    jitter_ms: float = 0.0
    """Uniform +/- jitter added to the latency."""
    fail_rate: float = 0.0
    """Probability that a request fails; failures are 500 or 429, half each."""
    max_concurrency: int | None = None
    """Requests served at once; beyond it requests wait in a bounded queue."""
    max_queue: int | None = None
    """Waiting requests allowed beyond ``max_concurrency`` (None: equal to it).
    Beyond that, requests get 429 with ``Retry-After``."""
    ms_per_output_token: float = 0.0
    """Extra service time per generated token."""
    load_slowdown: float = 0.0
    """Latency multiplier ``1 + load_slowdown * running / max_concurrency``
    (only when ``max_concurrency`` is set)."""
    output_tokens: int = 16
    """Completion tokens per choice unless the request asks for fewer."""
    seed: int | None = None
    """Seed for jitter and random failures."""
    model: str = "mock-model"
    """Model name listed by ``/v1/models`` and used in the metric labels."""
    batching: BatchingParams | None = None
    """Model a continuous-batching engine (see :mod:`overnight.mock_engine.batching`):
    latency, jitter, ``max_concurrency``/``max_queue``, ``ms_per_output_token``,
    ``load_slowdown`` and ``output_tokens`` are then unused."""
    metrics: str = "vllm"
    """``/metrics`` flavour: ``"vllm"``, ``"sglang"`` or ``"off"`` (404)."""

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.jitter_ms < 0 or self.ms_per_output_token < 0:
            raise ValueError("latency_ms, jitter_ms and ms_per_output_token must be >= 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 (or None for unlimited)")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError("max_queue must be >= 0 (or None)")
        if self.load_slowdown < 0:
            raise ValueError("load_slowdown must be >= 0")
        if self.output_tokens < 0:
            raise ValueError("output_tokens must be >= 0")
        if not self.model:
            raise ValueError("model must be a non-empty string")
        if self.metrics not in METRIC_FLAVOURS:
            raise ValueError(f"metrics must be one of {', '.join(METRIC_FLAVOURS)}, not {self.metrics!r}")
        if self.batching is not None and not isinstance(self.batching, BatchingParams):
            raise ValueError("batching must be a BatchingParams (or None)")
