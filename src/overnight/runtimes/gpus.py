"""Which GPUs of this host are free, and who holds the others.

GPUs are found once, lazily, with ``nvidia-smi --query-gpu=index,name,memory.total``
(on ``PATH``; absent or failing means a host without GPUs). ``allowed`` (from
``OVERNIGHT_GPUS=0,1,2,3``) restricts which of them overnight may hand out.
Indices are nvidia-smi's, which follow the PCI bus order; engines get them with
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA counts the same way.

The pool lives in one event loop and never awaits while it changes, so it needs no
lock; reservations are keyed by a string (the local runtime uses its handle id).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from overnight.errors import GpusBusy, RuntimeStartError

__all__ = ["Gpu", "GpuPool", "discover_gpus", "parse_gpu_list"]

log = logging.getLogger("overnight.runtimes.gpus")

_QUERY = ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    memory_mib: int | None


def discover_gpus(timeout_s: float = 15.0) -> list[Gpu]:
    """The GPUs nvidia-smi reports; none if it is missing or fails."""
    try:
        out = subprocess.run(_QUERY, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("no GPUs: nvidia-smi could not run (%s)", exc)
        return []
    if out.returncode != 0:
        log.warning("no GPUs: nvidia-smi exited with %d: %s", out.returncode, out.stderr.strip()[-300:])
        return []
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if not parts or not parts[0]:
            continue
        try:
            index = int(parts[0])
        except ValueError:
            log.warning("nvidia-smi: ignoring a line without a GPU index: %r", line)
            continue
        name = ", ".join(parts[1:-1]) if len(parts) > 2 else (parts[1] if len(parts) > 1 else "")
        try:
            memory = int(float(parts[-1])) if len(parts) > 2 else None
        except ValueError:
            memory = None
        gpus.append(Gpu(index, name, memory))
    return gpus


def parse_gpu_list(text: str | None, *, source: str = "OVERNIGHT_GPUS") -> list[int] | None:
    """``"0,1,3"`` -> ``[0, 1, 3]``; empty or unset -> None (no restriction)."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"{source}: {item!r} is not a GPU index (expected e.g. 0,1,2,3)")
        if int(item) not in out:
            out.append(int(item))
    return out


class GpuPool:
    """The GPUs overnight may hand out on this host, and their holders."""

    def __init__(self, *, allowed: Sequence[int] | None = None, gpus: Sequence[Gpu] | None = None) -> None:
        self._allowed = None if allowed is None else list(allowed)
        self._gpus: list[Gpu] | None = None if gpus is None else list(gpus)
        self._usable: list[int] | None = None
        #: holder -> indices it holds
        self._held: dict[str, list[int]] = {}

    @classmethod
    def from_env(cls) -> GpuPool:
        return cls(allowed=parse_gpu_list(os.environ.get("OVERNIGHT_GPUS")))

    def _discover(self) -> list[int]:
        if self._usable is None:
            if self._gpus is None:
                self._gpus = discover_gpus()
            present = [g.index for g in self._gpus]
            if self._allowed is None:
                usable = present
            else:
                missing = [i for i in self._allowed if i not in present]
                if missing:
                    raise RuntimeStartError(
                        f"OVERNIGHT_GPUS names GPU {', '.join(map(str, missing))}, which this host does not have "
                        f"(nvidia-smi reports {present or 'none'})"
                    )
                usable = list(self._allowed)
            self._usable = usable
        return self._usable

    @property
    def gpus(self) -> list[Gpu]:
        """Every GPU nvidia-smi reports (usable or not)."""
        self._discover()
        assert self._gpus is not None
        return list(self._gpus)

    @property
    def usable(self) -> list[int]:
        return list(self._discover())

    @property
    def total(self) -> int:
        return len(self._discover())

    @property
    def free_indices(self) -> list[int]:
        taken = {i for held in self._held.values() for i in held}
        return [i for i in self._discover() if i not in taken]

    @property
    def free(self) -> int:
        return len(self.free_indices)

    def held(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self._held.items()}

    def _describe(self) -> str:
        return f"OVERNIGHT_GPUS={','.join(map(str, self._allowed))}" if self._allowed is not None else "nvidia-smi"

    def check_fits(self, count: int) -> None:
        """Raise ``RuntimeStartError`` if this host can never give ``count`` GPUs."""
        if count < 0:
            raise RuntimeStartError(f"a GPU count must be 0 or more, got {count}")
        total = self.total
        if count > total:
            raise RuntimeStartError(
                f"the engine needs {count} GPU{'s' if count != 1 else ''} but this host has {total} "
                f"usable (per {self._describe()})"
            )

    def reserve(self, holder: str, count: int) -> list[int]:
        """Take ``count`` free GPUs for ``holder`` (lowest indices first).

        Raises ``RuntimeStartError`` if the host has fewer than ``count`` GPUs in
        all, ``GpusBusy`` if it has enough but not enough are free now."""
        self.check_fits(count)
        if holder in self._held:
            raise ValueError(f"{holder!r} already holds GPUs {self._held[holder]}")
        if count == 0:
            return []
        free = self.free_indices
        if len(free) < count:
            raise GpusBusy(
                f"the engine needs {count} GPU{'s' if count != 1 else ''}; {len(free)} of {self.total} are free now",
                needed=count,
                free=len(free),
                total=self.total,
            )
        taken = free[:count]
        self._held[holder] = taken
        return list(taken)

    def adopt(self, holder: str, indices: Sequence[int]) -> None:
        """Mark ``indices`` as held by ``holder`` again (an engine found running
        after a restart). What runs is the truth, so an overlap is only logged."""
        indices = list(indices)
        if not indices:
            return
        others = {i: h for h, held in self._held.items() if h != holder for i in held}
        clash = [i for i in indices if i in others]
        if clash:
            log.warning("GPUs %s adopted by %s are also held by %s", clash, holder, sorted({others[i] for i in clash}))
        self._held[holder] = indices

    def release(self, holder: str) -> list[int]:
        """Free what ``holder`` holds (nothing if it holds nothing)."""
        return self._held.pop(holder, [])
