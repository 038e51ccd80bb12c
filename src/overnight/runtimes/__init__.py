"""Runtimes, chosen by name through one registry (``module:Class`` imported lazily)."""

from __future__ import annotations

import importlib
import types

from overnight.errors import RuntimeStartError
from overnight.runtimes.base import Endpoint, Runtime, RuntimeState

__all__ = ["Endpoint", "Runtime", "RuntimeState", "register_runtime", "registry", "runtime_class"]

_registry: dict[str, tuple[str, str]] = {
    "endpoint": ("overnight.runtimes.endpoint:EndpointRuntime", ""),
}
registry = types.MappingProxyType(_registry)


def register_runtime(name: str, target: str, *, hint: str = "", clobber: bool = False) -> None:
    if name in _registry and not clobber:
        raise ValueError(f"runtime {name!r} is already registered")
    _registry[name] = (target, hint)


def runtime_class(name: str) -> type:
    if name not in _registry:
        raise RuntimeStartError(f"unknown runtime {name!r}; known: {', '.join(sorted(_registry))}")
    target, hint = _registry[name]
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeStartError(f"the {name} runtime needs extra packages ({exc.name}): {hint}") from exc
    return getattr(module, cls_name)
