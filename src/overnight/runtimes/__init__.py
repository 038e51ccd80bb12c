"""Runtimes, chosen by ``type`` through one registry (``module:Class`` imported lazily)."""

from __future__ import annotations

from overnight._registry import LazyRegistry
from overnight.errors import RuntimeStartError
from overnight.runtimes.base import Endpoint, Runtime, RuntimeHandle, RuntimeSpec

__all__ = ["Endpoint", "Runtime", "RuntimeHandle", "RuntimeSpec", "register_runtime", "registry", "runtime_class"]

_runtimes = LazyRegistry(
    "runtime",
    RuntimeStartError,
    {
        "endpoint": ("overnight.runtimes.endpoint:EndpointRuntime", ""),
        "local": ("overnight.runtimes.local:LocalRuntime", ""),
        "ssh": ("overnight.runtimes.ssh:SshRuntime", "pip install 'overnight[ssh]'"),
    },
)
registry = _runtimes.entries
register_runtime = _runtimes.register
runtime_class = _runtimes.load
