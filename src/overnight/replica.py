"""A replica's name, stable across restarts of the same data directory.

The first live process on a data directory holds an exclusive lock on it and
reuses the name stored there, so after a crash it resumes its own batches at once
instead of waiting for their leases to expire. Any further process on the same
directory gets a fresh name.
"""

from __future__ import annotations

import fcntl
import os
import socket
import uuid
from pathlib import Path

__all__ = ["ReplicaIdentity"]


class ReplicaIdentity:
    def __init__(self, data_dir: Path, explicit: str | None = None) -> None:
        self._fd: int | None = None
        if explicit:
            self.id = explicit
            return
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "replica.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self.id = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
            return
        self._fd = fd
        id_file = data_dir / "replica-id"
        if id_file.exists():
            self.id = id_file.read_text().strip()
        else:
            self.id = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
            id_file.write_text(self.id)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
