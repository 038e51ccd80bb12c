"""The mock engine's counters and their exposition: ``GET /stats`` JSON and
``GET /metrics`` Prometheus text in vLLM's or SGLang's names."""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["GenRate", "MockEngineStats", "metrics_text", "model_label"]


class MockEngineStats:
    """Counters kept by the app; ``running`` and ``waiting`` are live gauges."""

    __slots__ = (
        "received_total",
        "completed_total",
        "rejected_total",
        "aborted_total",
        "by_status",
        "by_route",
        "prompt_tokens_total",
        "generation_tokens_total",
        "success_by_reason",
        "running",
        "waiting",
        "max_running_seen",
        "max_waiting_seen",
        "preemptions_total",
        "kv_usage",
    )

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.reset()

    def reset(self) -> None:
        """Zero the counters; the live gauges keep their values."""
        self.received_total = 0
        self.completed_total = 0
        self.rejected_total = 0
        self.aborted_total = 0
        self.by_status: dict[int, int] = {}
        self.by_route: dict[str, int] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_by_reason: dict[str, int] = {"stop": 0, "length": 0}
        self.preemptions_total = 0
        self.max_running_seen = self.running
        self.max_waiting_seen = self.waiting

    def count(self, status: int) -> None:
        """Count one finished request under its HTTP status."""
        by_status = self.by_status
        by_status[status] = by_status.get(status, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The JSON document served by ``GET /stats``."""
        finished = sum(self.by_status.values())
        return {
            "received_total": self.received_total,
            "completed_total": self.completed_total,
            "failed_total": finished - self.completed_total,
            "rejected_total": self.rejected_total,
            "aborted_total": self.aborted_total,
            "requests_total": finished,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_route": dict(self.by_route),
            "running": self.running,
            "waiting": self.waiting,
            "max_running_seen": self.max_running_seen,
            "max_waiting_seen": self.max_waiting_seen,
            "preemptions_total": self.preemptions_total,
            "kv_usage": self.kv_usage,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "success_by_finish_reason": dict(self.success_by_reason),
        }


class GenRate:
    """Generated tokens per second over the last few seconds, from the token
    counter as seen at each scrape (``sglang:gen_throughput``)."""

    __slots__ = ("_marks",)

    def __init__(self) -> None:
        self._marks: deque[tuple[float, int]] = deque()

    def update(self, now: float, total: int) -> float:
        marks = self._marks
        if marks and total < marks[-1][1]:
            marks.clear()  # the counters were reset
        if not marks or now - marks[-1][0] >= 0.25:
            marks.append((now, total))
        # Measure from the newest mark at least a second old (or the oldest one).
        while len(marks) > 2 and now - marks[1][0] >= 1.0:
            marks.popleft()
        t0, n0 = marks[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0


def model_label(model: str) -> str:
    """The ``model_name="..."`` label, escaped for the text exposition format."""
    label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'model_name="{label}"'


#: (name, type, help, value key) of each series, in the order served.
_SGLANG = (
    ("sglang:num_running_reqs", "gauge", "The number of running requests.", "running"),
    ("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.", "waiting"),
    ("sglang:token_usage", "gauge", "The token usage.", "usage"),
    ("sglang:gen_throughput", "gauge", "The generation throughput (token/s).", "rate"),
    ("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.", "prompt"),
    ("sglang:generation_tokens_total", "counter", "Number of generation tokens processed.", "generation"),
)
_VLLM = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", "running"),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", "waiting"),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", "usage"),
    (
        "vllm:gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage (older name). 1 means 100 percent usage.",
        "usage",
    ),
    ("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions from the engine.", "preemptions"),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", "prompt"),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", "generation"),
)


def metrics_text(flavour: str, st: MockEngineStats, label: str, usage: float, rate: float) -> bytes:
    """The ``/metrics`` body in ``flavour`` ("vllm" or "sglang"); ``usage`` is the
    KV-cache fraction in use, ``rate`` the generation throughput (SGLang only)."""
    values = {
        "running": st.running,
        "waiting": st.waiting,
        "usage": usage,
        "rate": rate,
        "preemptions": st.preemptions_total,
        "prompt": st.prompt_tokens_total,
        "generation": st.generation_tokens_total,
    }
    lines: list[str] = []
    for name, kind, help_, key in _SGLANG if flavour == "sglang" else _VLLM:
        lines += (f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {float(values[key])}")
    if flavour != "sglang":
        name = "vllm:request_success_total"
        lines += (f"# HELP {name} Count of successfully processed requests.", f"# TYPE {name} counter")
        for reason, count in st.success_by_reason.items():
            lines.append(f'{name}{{finished_reason="{reason}",{label}}} {float(count)}')
    return ("\n".join(lines) + "\n").encode()
