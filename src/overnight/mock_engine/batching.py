"""A model of a continuous-batching engine (vLLM, SGLang, TGI, transformers serve).

The engine runs *steps*. In each step every running request either has its
prompt prefilled (the step it is admitted) or decodes one output token. A step
takes::

    t_step = step_base_ms + step_per_seq_ms * running + step_per_prefill_token_ms * prefill_tokens

so one request's latency grows with the number running beside it while the
engine's throughput (running / latency) rises until ``max_num_seqs`` requests
run at once. Beyond that, requests wait in a FIFO queue (``num_requests_waiting``):
latency keeps growing, throughput does not. That knee is what a client has to
find.

Optional limits a real engine has:

* ``max_num_batched_tokens``: prefill tokens admitted per step (later arrivals
  wait for the next step), as vLLM's scheduler budget;
* ``kv_cache_tokens``: every running request holds ``prompt + generated``
  tokens of KV cache. Requests are only admitted while the cache has room for
  their prompt; when decoding grows the cache past its size, the newest running
  request is preempted: it goes back to the front of the queue and loses its
  progress (vLLM's recompute preemption), wasted work that overshooting costs;
* ``max_waiting``: a bounded queue (not counting arrivals that free running
  slots take at the next step); beyond it ``add`` refuses (the HTTP layer
  answers 429).

``BatchingEngine`` is plain code with no clock and no asyncio: ``begin_step``
admits and returns the step's duration, ``end_step`` applies it and returns the
requests that finished. The HTTP mock drives it with ``asyncio.sleep`` between
the two; unit tests drive it in simulated time.

How it differs from a real engine (said plainly because benchmarks rest on it):
step time is linear in the batch, with no GPU kernel quantisation, no CUDA
graphs buckets, no speculative decoding and no prefix cache; output lengths come
from a distribution rather than from a model's stop tokens; the HTTP front end
costs nothing. The knee it shows is sharp (``max_num_seqs``) where a real GPU's
is softer (memory bandwidth then compute), which makes the plateau easier to see
than on real hardware, and the KV cache preempts exactly at capacity.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["BatchingEngine", "BatchingParams", "OutputLength", "PRESETS", "SimRequest"]


@dataclass(frozen=True)
class OutputLength:
    """How many tokens a request generates before it stops on its own (then capped
    by its ``max_tokens``). Spec strings: ``fixed:N``, ``uniform:LO:HI``,
    ``exp:MEAN`` (geometric, at least 1), ``lognormal:MEDIAN:SIGMA``."""

    kind: str = "fixed"
    a: float = 16.0
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> OutputLength:
        parts = spec.strip().split(":")
        kind, args = parts[0].lower(), parts[1:]
        try:
            nums = [float(x) for x in args]
        except ValueError:
            raise ValueError(f"output length {spec!r}: arguments must be numbers") from None
        want = {"fixed": 1, "uniform": 2, "exp": 1, "lognormal": 2}
        if kind not in want:
            raise ValueError(f"output length {spec!r}: kind must be one of {', '.join(want)}")
        if len(nums) != want[kind]:
            raise ValueError(f"output length {spec!r}: {kind} takes {want[kind]} number(s)")
        if not all(math.isfinite(x) for x in nums):
            raise ValueError(f"output length {spec!r}: numbers must be finite")
        if any(x < 0 for x in nums):
            raise ValueError(f"output length {spec!r}: numbers must be >= 0")
        if kind == "uniform" and nums[0] > nums[1]:
            raise ValueError(f"output length {spec!r}: LO must be <= HI")
        return cls(kind, nums[0], nums[1] if len(nums) > 1 else 0.0)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            n = self.a
        elif self.kind == "uniform":
            n = rng.uniform(self.a, self.b + 1)
        elif self.kind == "exp":
            n = rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        else:
            n = self.a * math.exp(rng.gauss(0.0, self.b))
        return max(1, int(n))

    def mean(self) -> float:
        """Expected tokens (before ``max_tokens``), for describing a shape."""
        if self.kind == "fixed":
            return max(1.0, self.a)
        if self.kind == "uniform":
            return max(1.0, (self.a + self.b) / 2)
        if self.kind == "exp":
            return max(1.0, self.a)
        return max(1.0, self.a * math.exp(self.b * self.b / 2))

    def __str__(self) -> str:
        if self.kind in ("fixed", "exp"):
            return f"{self.kind}:{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass(frozen=True, kw_only=True)
class BatchingParams:
    """The engine's shape. Times in milliseconds."""

    step_base_ms: float = 10.0
    step_per_seq_ms: float = 0.05
    step_per_prefill_token_ms: float = 0.002
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    kv_cache_tokens: int | None = None
    max_waiting: int | None = None
    output_len: OutputLength = field(default_factory=OutputLength)

    def __post_init__(self) -> None:
        for name in ("step_base_ms", "step_per_seq_ms", "step_per_prefill_token_ms"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, not {v!r}")
        if self.step_base_ms + self.step_per_seq_ms <= 0:
            raise ValueError("a step must take some time (step_base_ms or step_per_seq_ms > 0)")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        for name in ("max_num_batched_tokens", "kv_cache_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or unset)")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0 (or unset)")

    def rate_at(self, running: int, output_tokens: float, prompt_tokens: float = 0.0) -> float:
        """Steady-state requests/s with ``running`` requests always running (all of
        ``output_tokens``), for calibration and for the docs."""
        n = min(running, self.max_num_seqs)
        if n <= 0:
            return 0.0
        # Per request: one prefill step (shared by arrivals) and output_tokens - 1
        # decode steps; prefill tokens arrive at rate n / output_tokens per step.
        per_step = (
            self.step_base_ms + self.step_per_seq_ms * n
            + self.step_per_prefill_token_ms * prompt_tokens * n / max(1.0, output_tokens)
        )
        return n / (max(1.0, output_tokens) * per_step / 1000.0)

    def describe(self) -> str:
        """One line for humans: the step formula, the limits and the rates it gives."""
        def lim(v: int | None) -> str:
            return "unlimited" if v is None else str(v)

        def rate(n: int) -> str:
            r = self.rate_at(n, out)
            return f"{r:.1f}" if r < 10 else f"{r:.0f}"

        out = self.output_len.mean()
        knee = self.max_num_seqs
        return (
            f"t_step = {self.step_base_ms:g} + {self.step_per_seq_ms:g} x running"
            f" + {self.step_per_prefill_token_ms:g} x prefill_tokens ms;"
            f" max_num_seqs {knee}, max_num_batched_tokens {lim(self.max_num_batched_tokens)},"
            f" kv_cache_tokens {lim(self.kv_cache_tokens)}, max_waiting {lim(self.max_waiting)};"
            f" output {self.output_len} (mean {out:.0f});"
            f" about {rate(1)} req/s at 1 in flight, {rate(knee)} at {knee}"
        )


#: Named shapes. ``h200-llama-1b`` is calibrated to what Hugging Face
#: ``transformers serve --continuous-batching`` did with a 1B Llama in bf16 on one
#: H200 (about 1.8 req/s at 1 in flight and 87 at 64, with short outputs);
#: ``knee-N`` put the knee at N running requests.
PRESETS: dict[str, BatchingParams] = {
    "h200-llama-1b": BatchingParams(
        step_base_ms=13.8, step_per_seq_ms=0.075, step_per_prefill_token_ms=0.001,
        max_num_seqs=128, output_len=OutputLength("uniform", 24, 56),
    ),
    "knee-16": BatchingParams(
        step_base_ms=8.0, step_per_seq_ms=0.1, step_per_prefill_token_ms=0.001,
        max_num_seqs=16, output_len=OutputLength("uniform", 8, 24),
    ),
    "knee-64": BatchingParams(
        step_base_ms=8.0, step_per_seq_ms=0.05, step_per_prefill_token_ms=0.001,
        max_num_seqs=64, output_len=OutputLength("uniform", 8, 24),
    ),
    "knee-256": BatchingParams(
        step_base_ms=10.0, step_per_seq_ms=0.02, step_per_prefill_token_ms=0.0005,
        max_num_seqs=256, output_len=OutputLength("uniform", 8, 24),
    ),
}


class SimRequest:
    """One request inside the engine."""

    __slots__ = ("prompt_tokens", "output_tokens", "state", "token", "start_step",
                 "finish_step", "handle", "preemptions")

    def __init__(self, prompt_tokens: int, output_tokens: int, handle: Any = None) -> None:
        self.prompt_tokens = max(0, int(prompt_tokens))
        self.output_tokens = max(1, int(output_tokens))
        #: "waiting" | "running" | "done" | "aborted"
        self.state = "new"
        #: Bumped on every (re)admission, so stale heap entries are skipped.
        self.token = 0
        self.start_step = 0
        self.finish_step = 0
        self.preemptions = 0
        #: Whatever the driver wants back (a future, a simulated client id).
        self.handle = handle


class BatchingEngine:
    """The step loop's state (see the module docstring)."""

    def __init__(self, params: BatchingParams) -> None:
        self.params = params
        self.waiting: deque[SimRequest] = deque()
        self.running: dict[SimRequest, None] = {}  # admission order (preemption takes the newest)
        self.step_no = 0
        # (finish_step, seq, token, request) for running requests
        self._finish: list[tuple[int, int, int, SimRequest]] = []
        self._seq = 0
        self._admitted_step: list[SimRequest] = []
        self._step_open = False
        # KV accounting: sum(prompt) + sum(generated) over running, kept as
        # sum(prompt - start_step) + running * step_no, so a step costs O(1).
        self._kv_base = 0
        # counters
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.preemptions_total = 0

    # -- reading --------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_tokens(self) -> int:
        return self._kv_base + len(self.running) * self.step_no

    def kv_usage(self) -> float:
        """Fraction of the KV cache in use (0 without a KV limit: share of seqs)."""
        cap = self.params.kv_cache_tokens
        if cap:
            return min(1.0, self.kv_tokens() / cap)
        return len(self.running) / self.params.max_num_seqs

    def idle(self) -> bool:
        return not self.running and not self.waiting

    # -- requests -------------------------------------------------------------
    def add(self, req: SimRequest) -> bool:
        """Queue a request; False when the waiting queue is full. Requests that
        free running slots will take at the next step do not count against
        ``max_waiting`` (an idle engine takes ``max_num_seqs`` arrivals at once)."""
        mw = self.params.max_waiting
        if mw is not None:
            free = self.params.max_num_seqs - len(self.running)
            if len(self.waiting) >= mw + max(0, free):
                return False
        req.state = "waiting"
        self.waiting.append(req)
        return True

    def abort(self, req: SimRequest) -> None:
        """The client went away: free whatever the request holds."""
        if req.state == "waiting":
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        elif req.state == "running":
            self._drop_running(req)
        req.state = "aborted"

    # -- the step -------------------------------------------------------------
    def begin_step(self) -> float:
        """Admit what fits and return this step's duration in ms (0: nothing to do)."""
        assert not self._step_open, "end_step() first"
        p = self.params
        self._preempt_if_full()
        budget = p.max_num_batched_tokens
        kv_cap = p.kv_cache_tokens
        prefill = 0
        admitted = self._admitted_step
        admitted.clear()
        waiting, running = self.waiting, self.running
        while waiting and len(running) < p.max_num_seqs:
            req = waiting[0]
            cost = req.prompt_tokens
            if budget is not None and prefill and prefill + cost > budget:
                break
            # Room for the prompt, its first token and every running request's
            # next token; otherwise the next step would preempt it straight away.
            if kv_cap is not None and running and self.kv_tokens() + len(running) + cost + 1 > kv_cap:
                break
            waiting.popleft()
            prefill += cost
            self._admit(req)
            admitted.append(req)
        if not running:
            return 0.0
        self._step_open = True
        ms = p.step_base_ms + p.step_per_seq_ms * len(running) + p.step_per_prefill_token_ms * prefill
        self.prompt_tokens_total += prefill
        return ms

    def end_step(self) -> list[SimRequest]:
        """Apply the step begun by ``begin_step``: every running request has one
        more token; return those that are done."""
        if not self._step_open:
            return []
        self._step_open = False
        self.step_no += 1
        self.generation_tokens_total += len(self.running)
        done: list[SimRequest] = []
        heap = self._finish
        while heap and heap[0][0] <= self.step_no:
            _, _, token, req = heapq.heappop(heap)
            if req.state != "running" or req.token != token:
                continue  # preempted or aborted since
            self._drop_running(req)
            req.state = "done"
            done.append(req)
        return done

    # -- internals ------------------------------------------------------------
    def _admit(self, req: SimRequest) -> None:
        req.state = "running"
        req.token += 1
        req.start_step = self.step_no
        # The admission step prefills and yields the first token.
        req.finish_step = self.step_no + req.output_tokens
        self.running[req] = None
        self._kv_base += req.prompt_tokens - self.step_no
        self._seq += 1
        heapq.heappush(self._finish, (req.finish_step, self._seq, req.token, req))

    def _drop_running(self, req: SimRequest) -> None:
        del self.running[req]
        self._kv_base -= req.prompt_tokens - req.start_step

    def _preempt_if_full(self) -> None:
        cap = self.params.kv_cache_tokens
        if cap is None:
            return
        # Decoding one more token needs one more slot per running request.
        while len(self.running) > 1 and self.kv_tokens() + len(self.running) > cap:
            newest = next(reversed(self.running))
            self._drop_running(newest)
            newest.state = "waiting"
            newest.preemptions += 1
            self.preemptions_total += 1
            self.waiting.appendleft(newest)


def preset(name: str, **overrides: Any) -> BatchingParams:
    """A named shape with some fields replaced (``None`` values are ignored);
    ``custom`` starts from :class:`BatchingParams`' defaults."""
    if name == "custom":
        base = BatchingParams()
    else:
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown batching preset {name!r}; known: {', '.join(PRESETS)}, custom") from None
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
