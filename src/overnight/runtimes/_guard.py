"""The guard between overnight and a local engine, so that nothing outlives either.

    python -I _guard.py --parent PID --grace SECONDS -- ENGINE ARGV...

The local runtime starts this script as the leader of a new session and process
group; the engine and everything it spawns stay in that group. The guard

- asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), even if
  the parent was SIGKILLed, and exits at once if the parent is already gone;
  ``--parent 0`` leaves this out: a detached engine (the console's ``local``
  provider) outlives the service, like a cloud GPU, until it is stopped;
- becomes a child subreaper so orphaned engine processes are reaped here, not
  left as zombies (a container whose PID 1 is the service would never reap them);
- on SIGTERM/SIGINT/SIGHUP (or parent death), and also when the engine exits by
  itself, stops the whole group: SIGTERM, then SIGKILL after the grace period,
  until no other member is left;
- exits with the engine's exit code (128 + N if a signal N ended it).

Standard library only, and run by path with ``-I``: it starts in milliseconds and
imports nothing of overnight's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Stop(Exception):
    pass


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"[overnight guard {os.getpid()}] {message}\n")
        sys.stderr.flush()
    except OSError:
        pass


_stopping = False


def _on_signal(signum: int, _frame: object) -> None:
    # Only the first signal interrupts; later ones arrive while the group stops.
    global _stopping
    if not _stopping:
        _stopping = True
        raise _Stop(signum)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of group ``pgid`` other than this one."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            out.append(int(name))
    return out


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM every other member, wait up to ``grace_s``, then SIGKILL until none is left."""
    members = _group_members(pgid)
    for pid in members:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while members and time.monotonic() < deadline:
        time.sleep(0.05)
        _reap()
        members = _group_members(pgid)
    if members:
        _say(f"SIGKILL to {len(members)} process(es) still running after {grace_s:g} s")
    while members:
        for pid in members:
            _kill(pid, signal.SIGKILL)
        time.sleep(0.02)
        _reap()
        members = _group_members(pgid)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    global _stopping
    parent = grace_s = None
    try:
        split = argv.index("--")
        opts, command = argv[:split], argv[split + 1 :]
        for i in range(0, len(opts), 2):
            if opts[i] == "--parent":
                parent = int(opts[i + 1])
            elif opts[i] == "--grace":
                grace_s = float(opts[i + 1])
            else:
                raise ValueError(opts[i])
    except (ValueError, IndexError):
        _say("usage: _guard.py --parent PID --grace SECONDS -- COMMAND...")
        return 2
    if not command or parent is None or grace_s is None:
        _say("usage: _guard.py --parent PID --grace SECONDS -- COMMAND...")
        return 2

    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    pgid = os.getpgrp()
    engine_pid: int | None = None
    code = 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if parent != 0 and libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            _say(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}")
            return 1
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        # The parent may have died before the request above took effect.
        if parent != 0 and os.getppid() != parent:
            _say(f"parent {parent} is gone; not starting the engine")
            return 1
        try:
            engine_pid = subprocess.Popen(command, stdin=subprocess.DEVNULL).pid
        except OSError as exc:
            _say(f"cannot start {command[0]!r}: {exc}")
            return 127
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == engine_pid:
                _stopping = True
                code = _exit_code(status)
                _say(f"engine exited with code {code}" if code < 128 else f"engine ended by signal {code - 128}")
                break
    except _Stop as stop:
        signum = stop.args[0]
        code = 128 + signum
        _say(f"stopping the engine ({signal.Signals(signum).name})")
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _stop_group(pgid, grace_s)
    _reap()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
