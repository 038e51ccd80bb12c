"""Where templates and profiles come from, and how one is looked up.

``TemplateSource`` holds the lookup rules; a concrete source only supplies a
``Catalog`` (a snapshot of what it read). ``DirectorySource`` reads a directory of
YAML files and re-reads the files that changed; ``configmap.ConfigMapSource``
watches labelled Kubernetes ConfigMaps; ``CombinedSource`` puts sources together.

Documents. A YAML file holds any number of documents (``---``). Each is

* ``kind: ModelDeploymentTemplate`` or ``kind: Profile`` (the ``kind`` key is
  dropped before validation), or
* without ``kind``: a template if it has a ``spec``, a profile otherwise, or
* ``{templates: [...], profiles: [...]}``: several at once, as in AIBrix's
  ConfigMaps (``templates.yaml`` / ``profiles.yaml``).

Broken input does not take the rest down: each file, and each document in it, is
read on its own. A template or profile whose document (or file) is broken fails
its lookups with that error, naming the file, the document and the field; all
problems are listed by ``errors()``.

Versions: ``get_template(name)`` (or version ``""``) picks the highest *active*
version. Versions are compared as PEP 440 versions when they parse
(``v1.2.0`` < ``1.10``), as strings otherwise; a version that parses ranks above
one that does not. ``deprecated`` and ``draft`` versions are found only by name.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from packaging.version import InvalidVersion, Version

from overnight.errors import InvalidRequestError, NotFoundError, OvernightError
from overnight.templates.schema import (
    ModelDeploymentTemplate,
    Profile,
    TemplateSchemaError,
    parse_profile,
    parse_template,
)

__all__ = [
    "Broken",
    "Catalog",
    "CombinedSource",
    "DirectorySource",
    "Loaded",
    "ProfileNotFound",
    "StaticSource",
    "TemplateInvalidError",
    "TemplateNotFound",
    "TemplateSource",
    "TemplateSourceError",
    "effective",
    "load_file",
    "load_text",
    "names_after",
    "version_key",
]

TEMPLATE_KIND = "ModelDeploymentTemplate"
PROFILE_KIND = "Profile"
#: A file modified this recently may change again within the same mtime tick, so
#: its stamp alone is not trusted (git's "racily clean" problem): its bytes are compared.
_RACY_NS = 2_000_000_000


class TemplateNotFound(NotFoundError):
    code = "template_not_found"


class ProfileNotFound(NotFoundError):
    code = "profile_not_found"


class TemplateInvalidError(InvalidRequestError):
    """The template or profile asked for exists but its document is broken."""

    code = "invalid_template"

    def __init__(self, message: str, issues: Iterable[str]) -> None:
        super().__init__(message)
        self.issues = list(issues)


class TemplateSourceError(OvernightError):
    """The source itself cannot be read (e.g. the directory does not exist)."""


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key: PEP 440 order when the version parses, string order otherwise."""
    try:
        return (1, Version(version), version)
    except InvalidVersion:
        return (0, version)


@dataclass(frozen=True)
class Broken:
    """A document that failed validation, as far as it can be identified."""

    kind: Literal["template", "profile"]
    name: str
    version: str | None
    issues: tuple[str, ...]


@dataclass(frozen=True)
class Loaded:
    """What one file (or text) yielded."""

    templates: tuple[tuple[str, ModelDeploymentTemplate], ...] = ()  # (where, template)
    profiles: tuple[tuple[str, Profile], ...] = ()
    broken: tuple[Broken, ...] = ()
    issues: tuple[str, ...] = ()
    #: The whole file failed (unreadable, not YAML): nothing in it is known.
    failed: bool = False

    def names(self) -> list[tuple[Literal["template", "profile"], str]]:
        out: list[tuple[Literal["template", "profile"], str]] = [("template", t.name) for _, t in self.templates]
        out += [("profile", p.name) for _, p in self.profiles]
        return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML where a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                dup = key in seen
            except TypeError:
                dup = False
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_issue(label: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context else problem
    where = f"{label}: line {mark.line + 1}" if mark is not None else label
    return f"{where}: not valid YAML: {text}"


def _name_of(raw: Mapping[str, Any]) -> str | None:
    name = raw.get("name")
    return name if isinstance(name, str) and name else None


def _version_of(raw: Mapping[str, Any]) -> str | None:
    version = raw.get("version")
    if isinstance(version, str) and version:
        return version
    if isinstance(version, int) and not isinstance(version, bool):
        return str(version)
    return None


class _Collector:
    def __init__(self) -> None:
        self.templates: list[tuple[str, ModelDeploymentTemplate]] = []
        self.profiles: list[tuple[str, Profile]] = []
        self.broken: list[Broken] = []
        self.issues: list[str] = []

    def add(self, kind: Literal["template", "profile"], raw: Any, where: str) -> None:
        if not isinstance(raw, Mapping):
            self.issues.append(f"{where}: expected a mapping, got {type(raw).__name__}")
            return
        name = _name_of(raw)
        label = f"{where} ({name})" if name else where
        try:
            if kind == "template":
                self.templates.append((label, parse_template(raw, where=label)))
            else:
                self.profiles.append((label, parse_profile(raw, where=label)))
        except TemplateSchemaError as exc:
            self.issues += exc.issues
            if name:
                version = _version_of(raw) if kind == "template" else None
                self.broken.append(Broken(kind, name, version, tuple(exc.issues)))

    def document(self, doc: Any, where: str) -> None:
        if not isinstance(doc, Mapping):
            self.issues.append(f"{where}: expected a mapping (a template or a profile), got {type(doc).__name__}")
            return
        if "kind" in doc:
            kind = doc["kind"]
            body = {k: v for k, v in doc.items() if k != "kind"}
            if kind == TEMPLATE_KIND:
                self.add("template", body, where)
            elif kind == PROFILE_KIND:
                self.add("profile", body, where)
            else:
                self.issues.append(f"{where}: kind: {kind!r} is not {TEMPLATE_KIND} or {PROFILE_KIND}")
        elif doc and set(doc) <= {"templates", "profiles"}:
            for key, kind in (("templates", "template"), ("profiles", "profile")):
                items = doc.get(key) or []
                if not isinstance(items, list):
                    self.issues.append(f"{where}: {key}: expected a list")
                    continue
                for i, item in enumerate(items):
                    self.add(kind, item, f"{where}, {key}[{i}]")  # type: ignore[arg-type]
        elif "spec" in doc:
            self.add("template", doc, where)
        else:
            self.add("profile", doc, where)

    def result(self) -> Loaded:
        return Loaded(tuple(self.templates), tuple(self.profiles), tuple(self.broken), tuple(self.issues))


def load_text(text: str, label: str) -> Loaded:
    """Read every document of one YAML text; ``label`` (a file name) starts each issue."""
    collector = _Collector()
    try:
        docs = list(yaml.load_all(text, Loader=_UniqueKeyLoader))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        return Loaded(issues=(_yaml_issue(label, exc),), failed=True)
    for n, doc in enumerate(docs, start=1):
        if doc is None:  # an empty document (a trailing ---)
            continue
        collector.document(doc, f"{label}: document {n}")
    return collector.result()


def load_file(path: Path, label: str | None = None) -> Loaded:
    label = label or str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return Loaded(issues=(f"{label}: cannot be read: {exc}",), failed=True)
    return load_text(text, label)


Names = list[tuple[Literal["template", "profile"], str]]


def names_after(loaded: Loaded, before: Names) -> Names:
    """The names a text defines, remembered for its next read: what this read found
    (good or broken), or, when the whole text failed, what the last read that parsed found."""
    if loaded.failed:
        return list(before)
    return loaded.names() + [(b.kind, b.name) for b in loaded.broken]


def effective(loaded: Loaded, known: Names) -> Loaded:
    """What a text contributes to a catalog. A text that stopped parsing makes what it
    defined before fail with its error (rather than vanish, or fall back to another copy)."""
    if loaded.failed and known:
        broken = tuple(Broken(kind, name, None, loaded.issues) for kind, name in known)
        return Loaded(broken=broken, issues=loaded.issues, failed=True)
    return loaded


@dataclass
class Catalog:
    """An immutable snapshot: every good template and profile, and what is broken."""

    templates: dict[str, dict[str, tuple[str, ModelDeploymentTemplate]]] = field(default_factory=dict)
    profiles: dict[str, tuple[str, Profile]] = field(default_factory=dict)
    broken_templates: dict[str, list[Broken]] = field(default_factory=dict)
    broken_profiles: dict[str, list[Broken]] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, loads: Iterable[Loaded], extra_issues: Iterable[str] = ()) -> Catalog:
        cat = cls(issues=list(extra_issues))
        template_where: dict[tuple[str, str], list[str]] = {}
        profile_where: dict[str, list[str]] = {}
        for loaded in loads:
            cat.issues += loaded.issues
            for b in loaded.broken:
                target = cat.broken_templates if b.kind == "template" else cat.broken_profiles
                target.setdefault(b.name, []).append(b)
            for where, t in loaded.templates:
                template_where.setdefault((t.name, t.version), []).append(where)
                cat.templates.setdefault(t.name, {}).setdefault(t.version, (where, t))
            for where, p in loaded.profiles:
                profile_where.setdefault(p.name, []).append(where)
                cat.profiles.setdefault(p.name, (where, p))
        # The same name (and version) twice is ambiguous: neither copy is used.
        for (name, version), wheres in template_where.items():
            if len(wheres) > 1:
                msg = f"{wheres[-1]}: template {name!r} version {version!r} is also defined in {'; '.join(wheres[:-1])}"
                cat.issues.append(msg)
                cat.broken_templates.setdefault(name, []).append(Broken("template", name, version, (msg,)))
                del cat.templates[name][version]
                if not cat.templates[name]:
                    del cat.templates[name]
        for name, wheres in profile_where.items():
            if len(wheres) > 1:
                msg = f"{wheres[-1]}: profile {name!r} is also defined in {'; '.join(wheres[:-1])}"
                cat.issues.append(msg)
                cat.broken_profiles.setdefault(name, []).append(Broken("profile", name, None, (msg,)))
                del cat.profiles[name]
        return cat


def _versions_text(versions: Mapping[str, tuple[str, ModelDeploymentTemplate]]) -> str:
    ordered = sorted(versions, key=version_key, reverse=True)
    return ", ".join(f"{v} ({versions[v][1].status})" for v in ordered) or "none"


def _broken_error(what: str, broken: list[Broken]) -> TemplateInvalidError:
    issues = [line for b in broken for line in b.issues]
    return TemplateInvalidError(f"{what} is invalid:\n" + "\n".join(issues), issues)


class TemplateSource(ABC):
    """Lookups over a ``Catalog``; subclasses say where the catalog comes from."""

    @abstractmethod
    def catalog(self) -> Catalog:
        """The current snapshot (a source that reloads does it here)."""

    def _hint(self, cat: Catalog) -> str:
        return f" ({len(cat.issues)} problem(s) in the templates; see `overnight templates validate`)" if cat.issues else ""

    def get_template(self, name: str, version: str | None = None) -> ModelDeploymentTemplate:
        """The template ``name`` at ``version``; None or "" means the latest active one.

        Raises ``TemplateNotFound`` (unknown name or version, or no active version)
        or ``TemplateInvalidError`` (its document is broken)."""
        return self.locate_template(name, version)[1]

    def locate_template(self, name: str, version: str | None = None) -> tuple[str, ModelDeploymentTemplate]:
        """``(where it was read, template)``; the same rules as ``get_template``."""
        cat = self.catalog()
        versions = cat.templates.get(name, {})
        broken = cat.broken_templates.get(name, [])
        if version:
            hit = [b for b in broken if b.version in (None, version)]
            if hit:
                raise _broken_error(f"model template {name!r} version {version!r}", hit)
            if version in versions:
                return versions[version]
            if versions:
                raise TemplateNotFound(
                    f"model template {name!r} has no version {version!r} (versions: {_versions_text(versions)})"
                )
            raise TemplateNotFound(f"model template {name!r} not found{self._hint(cat)}")
        if broken:  # a broken version might be the latest one
            raise _broken_error(f"model template {name!r}", broken)
        if not versions:
            raise TemplateNotFound(f"model template {name!r} not found{self._hint(cat)}")
        active = [v for v, (_, t) in versions.items() if t.status == "active"]
        if not active:
            raise TemplateNotFound(
                f"model template {name!r} has no active version (versions: {_versions_text(versions)}); name one"
            )
        return versions[max(active, key=version_key)]

    def list_templates(self) -> list[ModelDeploymentTemplate]:
        """Every good template, by name then version (newest first)."""
        cat = self.catalog()
        out = []
        for name in sorted(cat.templates):
            versions = cat.templates[name]
            out += [versions[v][1] for v in sorted(versions, key=version_key, reverse=True)]
        return out

    def get_profile(self, name: str) -> Profile:
        return self.locate_profile(name)[1]

    def locate_profile(self, name: str) -> tuple[str, Profile]:
        cat = self.catalog()
        if name in cat.broken_profiles:
            raise _broken_error(f"profile {name!r}", cat.broken_profiles[name])
        if name not in cat.profiles:
            raise ProfileNotFound(f"profile {name!r} not found{self._hint(cat)}")
        return cat.profiles[name]

    def list_profiles(self) -> list[Profile]:
        cat = self.catalog()
        return [cat.profiles[n][1] for n in sorted(cat.profiles)]

    def errors(self) -> list[str]:
        """Every problem found, one located line each (empty when all is well)."""
        return list(self.catalog().issues)


def _without_kind(doc: Any) -> Any:
    return {k: v for k, v in doc.items() if k != "kind"} if isinstance(doc, Mapping) else doc


class StaticSource(TemplateSource):
    """Templates and profiles given in memory (tests, ``overnight run``, other sources)."""

    def __init__(self, templates: Iterable[Any] = (), profiles: Iterable[Any] = (), *, label: str = "<memory>") -> None:
        collector = _Collector()
        for i, t in enumerate(templates):
            if isinstance(t, ModelDeploymentTemplate):
                collector.templates.append((f"{label}: template {i + 1}", t))
            else:
                collector.add("template", _without_kind(t), f"{label}: template {i + 1}")
        for i, p in enumerate(profiles):
            if isinstance(p, Profile):
                collector.profiles.append((f"{label}: profile {i + 1}", p))
            else:
                collector.add("profile", _without_kind(p), f"{label}: profile {i + 1}")
        self._catalog = Catalog.build([collector.result()])

    def catalog(self) -> Catalog:
        return self._catalog


@dataclass
class _FileState:
    stamp: tuple[int, int, int]  # mtime_ns, size, inode
    digest: str
    read_ns: int
    loaded: Loaded
    #: Names from the last read that parsed, so a file that stops parsing fails their lookups.
    known: Names


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class DirectorySource(TemplateSource):
    """Every ``*.yaml`` / ``*.yml`` file directly in ``directory`` (hidden files are
    skipped; symlinks are followed, so a mounted ConfigMap works).

    Lookups re-read the files that changed when the last check is ``reload_s`` old
    or more (None: only when ``refresh()`` is called)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        reload_s: float | None = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            what = "is not a directory" if self.directory.exists() else "does not exist"
            raise TemplateSourceError(f"templates directory {self.directory} {what}")
        self.reload_s = reload_s
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[str, _FileState] = {}
        self._catalog = Catalog()
        self._extra: list[str] = []
        self._checked = -math.inf
        self.refresh()

    def catalog(self) -> Catalog:
        if self.reload_s is not None and self._clock() - self._checked >= self.reload_s:
            self.refresh()
        return self._catalog

    def _names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.directory))
        except OSError:
            return []
        return [
            n for n in entries
            if not n.startswith(".") and n.endswith((".yaml", ".yml")) and (self.directory / n).is_file()
        ]

    def refresh(self) -> bool:
        """Re-read the files that changed (new, edited, removed); True if any did."""
        with self._lock:
            self._checked = self._clock()
            changed = False
            present = self._names()
            for gone in set(self._files) - set(present):
                del self._files[gone]
                changed = True
            for name in present:
                changed |= self._check_file(name)
            extra = [] if self.directory.is_dir() else [f"templates directory {self.directory} is gone"]
            if changed or extra != self._extra:
                self._extra = extra
                self._catalog = self._build(extra)
            return changed

    def _check_file(self, name: str) -> bool:
        path = self.directory / name
        old = self._files.get(name)
        try:
            stamp = _stamp(path.stat())
        except OSError:
            stamp = (0, 0, 0)
        if old is not None and stamp == old.stamp and stamp[0] < old.read_ns - _RACY_NS:
            return False
        now = time.time_ns()
        try:
            data = path.read_bytes()
        except OSError as exc:
            data = None
            err = f"{path}: cannot be read: {exc}"
        digest = hashlib.sha256(data).hexdigest() if data is not None else "unreadable"
        if old is not None and digest == old.digest:
            old.stamp, old.read_ns = stamp, now
            return False
        if data is None:
            loaded = Loaded(issues=(err,), failed=True)
        else:
            try:
                loaded = load_text(data.decode("utf-8"), str(path))
            except UnicodeDecodeError as exc:
                loaded = Loaded(issues=(f"{path}: cannot be read: {exc}",), failed=True)
        known = names_after(loaded, old.known if old is not None else [])
        self._files[name] = _FileState(stamp, digest, now, loaded, known)
        return True

    def _build(self, extra: list[str]) -> Catalog:
        loads = [effective(state.loaded, state.known) for state in (self._files[n] for n in sorted(self._files))]
        return Catalog.build(loads, extra)


def _as_loaded(cat: Catalog) -> Loaded:
    """A catalog back as one read's worth, so ``Catalog.build`` can merge catalogs."""
    templates = tuple(entry for versions in cat.templates.values() for entry in versions.values())
    broken = tuple(b for bs in cat.broken_templates.values() for b in bs)
    broken += tuple(b for bs in cat.broken_profiles.values() for b in bs)
    return Loaded(templates, tuple(cat.profiles.values()), broken, tuple(cat.issues))


class CombinedSource(TemplateSource):
    """Several sources as one (a templates directory and ConfigMaps).

    A template name and version, or a profile, defined by two sources is
    ambiguous exactly as two files of one directory are: neither copy is used,
    ``errors()`` reports it and its lookup fails naming both places. Each part
    keeps its own refresh (and life cycle: start and close a ConfigMap source
    yourself); the merge is redone only when a part's catalog changed."""

    def __init__(self, *sources: TemplateSource) -> None:
        if not sources:
            raise ValueError("CombinedSource needs at least one source")
        self.sources = sources
        self._lock = threading.Lock()
        self._parts: tuple[Catalog, ...] = ()
        self._catalog = Catalog()

    def catalog(self) -> Catalog:
        parts = tuple(source.catalog() for source in self.sources)
        with self._lock:
            if len(parts) != len(self._parts) or any(a is not b for a, b in zip(parts, self._parts, strict=True)):
                self._catalog = Catalog.build([_as_loaded(part) for part in parts])
                self._parts = parts  # held, so an identity match is never a reused id
            return self._catalog
