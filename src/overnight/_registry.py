"""Name -> lazily imported class, with install hints: the one registry shape that
stores, storages and runtimes (and later provisioners) share.

Backends are imported on first use, so a default ``overnight serve`` never imports
asyncpg, redis, pymongo or obstore.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Mapping

from overnight.errors import OvernightError

__all__ = ["LazyRegistry"]


class LazyRegistry:
    """``register(name, "module:Class", hint=...)`` then ``load(name)``.

    Entries are never silently replaced (``clobber=True`` to do it on purpose).
    """

    def __init__(self, kind: str, error: type[OvernightError], entries: Mapping[str, tuple[str, str]]) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, tuple[str, str]] = dict(entries)
        #: Read-only view of ``name -> (target, install hint)``.
        self.entries = types.MappingProxyType(self._entries)

    def register(self, name: str, target: str, *, hint: str = "", clobber: bool = False) -> None:
        if name in self._entries and not clobber:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = (target, hint)

    def load(self, name: str) -> type:
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}")
        target, hint = self._entries[name]
        module_name, _, cls_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise self.error(f"the {name} {self.kind} needs extra packages ({exc.name}): {hint}") from exc
        return getattr(module, cls_name)
