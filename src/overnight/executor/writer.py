"""The spool: output and error lines, written once per request index.

Every finished request is marked in the done bitmap and queued for its spool
file as ``<index>\\t<json line>\\n`` in the same synchronous step; the queue is
written with one ``write(2)`` per spool file at the end of the current event-loop
iteration, so a burst of answers costs one syscall, not one each. A SIGKILL
loses at most the lines finished in that last iteration (their requests were in
flight a moment before and are simply sent again); it never loses a line the
kernel has accepted: on restart ``recover()`` scans the local spool files and
keeps every complete line whose index is not yet done.

At each checkpoint ``seal()`` writes what is queued, rotates the spool files,
makes the closed ones durable in storage as segments (a hard link when storage
is a local directory on the same filesystem, a copy otherwise) and returns the
checkpoint naming them; another replica can resume from that alone.
``assemble()`` concatenates the segments into the final output and error files,
dropping the index prefix.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from overnight._concurrency import to_thread
from overnight.executor.checkpoint import Checkpoint, Segment
from overnight.executor.usage import Usage
from overnight.storage.base import Storage
from overnight.storage.local import LocalStorage

__all__ = ["Spool", "SealResult", "AssembleResult"]

_KINDS = ("out", "err")
#: Flush the assembled output to storage in pieces of about this size.
_ASSEMBLE_BUFFER_BYTES = 1024 * 1024


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _strip_index(block: bytes) -> bytes:
    """Spool lines (``<index>\\t<line>\\n`` ...) to output lines (``<line>\\n`` ...)."""
    return b"\n".join(line[line.find(b"\t") + 1 :] for line in block.split(b"\n"))


def _sync_and_close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_into(src: Path, dest: Path) -> None:
    """Publish ``src`` at ``dest`` without copying (atomic replace, like a commit)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.link(src, tmp)
    os.replace(tmp, dest)


@dataclass
class SealResult:
    checkpoint: bytes
    #: Local files now durable in storage; delete them once the checkpoint is stored.
    sealed_paths: list[Path] = field(default_factory=list)


@dataclass
class AssembleResult:
    out_bytes: int = 0
    out_lines: int = 0
    err_bytes: int = 0
    err_lines: int = 0


class Spool:
    def __init__(
        self, *, spool_dir: Path, storage: Storage, batch_id: str, token: int, checkpoint: Checkpoint
    ) -> None:
        self.dir = spool_dir / batch_id
        self.storage = storage
        self.batch_id = batch_id
        self.token = token
        self.cp = checkpoint
        self.usage = Usage.from_dict(checkpoint.usage)
        self._fds: dict[str, int] = {}
        self._paths: dict[str, Path] = {}
        self._bytes = dict.fromkeys(_KINDS, 0)
        self._lines = dict.fromkeys(_KINDS, 0)
        self._pending: dict[str, list[bytes]] = {kind: [] for kind in _KINDS}
        self._flush_scheduled = False
        self._storing: asyncio.Task[None] | None = None
        self._broken: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._open_current()

    def _open_current(self) -> None:
        seq = self.cp.next_seq
        self.cp.next_seq += 1
        for kind in _KINDS:
            path = self.dir / f"{self.token}-{seq:06d}.{kind}"
            self._paths[kind] = path
            self._fds[kind] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._bytes[kind] = self._lines[kind] = 0

    def close(self) -> None:
        if self._fds:
            self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- hot path ------------------------------------------------------------
    def write(self, index: int, line: bytes, *, error: bool, usage: object = None) -> bool:
        """Record request ``index``'s line; False (and nothing written) if it is done already."""
        if not self.cp.done.add(index):
            return False
        kind = "err" if error else "out"
        data = b"%d\t%b\n" % (index, line)
        self._pending[kind].append(data)
        self._bytes[kind] += len(data)
        self._lines[kind] += 1
        if error:
            self.cp.failed += 1
        else:
            self.cp.completed += 1
            if usage is not None:
                self.usage.add(usage)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop (tools, tests): write at once
                self.flush()
        return True

    def flush(self) -> None:
        """Write the queued lines (one ``write(2)`` per spool file)."""
        self._flush_scheduled = False
        for kind, pending in self._pending.items():
            if pending:
                _write_all(self._fds[kind], pending[0] if len(pending) == 1 else b"".join(pending))
                pending.clear()

    # -- recovery ------------------------------------------------------------
    async def recover(self) -> int:
        """Fold complete lines left in local spool files (by this or an earlier owner
        on this host) into the current files; returns how many were recovered."""
        current = set(self._paths.values())
        old = sorted(p for p in self.dir.glob("*-*.*") if p not in current and p.suffix[1:] in _KINDS)
        recovered = 0
        for path in old:
            data = await to_thread(path.read_bytes)
            end = data.rfind(b"\n") + 1  # a torn last line was never marked done
            for raw in data[:end].splitlines():
                tab = raw.find(b"\t")
                if tab <= 0:
                    continue
                index = int(raw[:tab])
                if index >= self.cp.total or index in self.cp.done:
                    continue
                line = raw[tab + 1 :]
                error = path.suffix == ".err"
                usage = None
                if not error:
                    body = (orjson.loads(line).get("response") or {}).get("body")
                    usage = body.get("usage") if isinstance(body, dict) else None
                self.write(index, line, error=error, usage=usage)
                recovered += 1
        self.flush()
        for path in old:
            path.unlink(missing_ok=True)
        return recovered

    # -- checkpoints ---------------------------------------------------------
    def snapshot(self) -> bytes:
        self.cp.usage = self.usage.to_dict()
        return self.cp.encode()

    async def seal(self) -> SealResult:
        """Rotate the spool files; store the closed ones; return the checkpoint.

        Storing runs as its own task: if the caller is cancelled half-way (a
        shutdown), the segments are still stored, and the next ``seal()`` waits
        for that before it returns a checkpoint naming them. If storing failed,
        every later ``seal()`` raises: the checkpoint would name a missing segment.
        """
        if self._storing is not None:
            await self._storing
            self._storing = None
        if self._broken is not None:
            raise self._broken
        self.flush()
        if not any(self._lines.values()):
            return SealResult(self.snapshot())
        closed = [(k, self._paths[k], self._bytes[k], self._lines[k]) for k in _KINDS]
        old_fds = list(self._fds.values())
        self._fds = {}
        self._open_current()
        stored = [(Segment(kind, f"spool/{self.batch_id}/{path.name}", nbytes, lines), path)
                  for kind, path, nbytes, lines in closed if lines]
        # Snapshot before any await: exactly the lines in the closed files are done.
        self.cp.segments.extend(seg for seg, _ in stored)
        encoded = self.snapshot()
        self._storing = asyncio.get_running_loop().create_task(self._store_closed(old_fds, stored))
        await asyncio.shield(self._storing)
        self._storing = None
        return SealResult(encoded, [c[1] for c in closed])

    async def _store_closed(self, fds: list[int], stored: list[tuple[Segment, Path]]) -> None:
        try:
            await to_thread(_sync_and_close, fds)
            for seg, path in stored:
                await self._store_segment(seg.key, path)
        except BaseException as exc:
            self._broken = exc if isinstance(exc, Exception) else RuntimeError("storing a segment was interrupted")
            raise

    async def _store_segment(self, key: str, path: Path) -> None:
        if isinstance(self.storage, LocalStorage):
            try:
                await to_thread(_link_into, path, self.storage.path(key))
                return
            except OSError:
                pass  # another filesystem: copy instead
        async with self.storage.writer(key) as w:
            await w.write(await to_thread(path.read_bytes))

    @staticmethod
    def discard(paths: list[Path]) -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    # -- final files ----------------------------------------------------------
    async def assemble(self, *, out_key: str, err_key: str) -> AssembleResult:
        """Write the final output/error objects from the sealed segments."""
        result = AssembleResult()
        for kind, key in (("out", out_key), ("err", err_key)):
            segs = [s for s in self.cp.segments if s.kind == kind]
            if not segs:
                continue
            total = lines = 0
            async with self.storage.writer(key) as w:
                buf: list[bytes] = []
                size = 0
                for seg in segs:
                    # A line's pieces wait in a list and are joined once, when its
                    # end arrives: re-copying the growing line for every chunk made
                    # time grow with the square of the line's length.
                    carry: list[bytes] = []
                    async for chunk in self.storage.read(seg.key):
                        cut = chunk.rfind(b"\n") + 1
                        if not cut:
                            carry.append(chunk)
                            continue
                        if carry:
                            carry.append(chunk[:cut])
                            block = b"".join(carry)
                        else:
                            block = chunk[:cut]
                        carry = [chunk[cut:]] if cut < len(chunk) else []
                        piece = _strip_index(block)
                        buf.append(piece)
                        size += len(piece)
                        lines += block.count(b"\n")
                        if size >= _ASSEMBLE_BUFFER_BYTES:
                            await w.write(b"".join(buf))
                            total += size
                            buf, size = [], 0
                    if carry:  # a last line without its newline
                        piece = _strip_index(b"".join(carry) + b"\n")
                        buf.append(piece)
                        size += len(piece)
                        lines += 1
                if buf:
                    await w.write(b"".join(buf))
                    total += size
            if kind == "out":
                result.out_bytes, result.out_lines = total, lines
            else:
                result.err_bytes, result.err_lines = total, lines
        return result

    async def cleanup(self) -> None:
        """Drop segments and the local spool directory once the final files exist."""
        self.close()
        for seg in self.cp.segments:
            await self.storage.delete(seg.key)
        await to_thread(shutil.rmtree, self.dir, True)
