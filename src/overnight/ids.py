"""Record identifiers: a prefix plus a time-ordered random suffix.

The suffix starts with the creation time in milliseconds, so ids sort in creation
order and list pagination can use the id itself as the cursor.
"""

from __future__ import annotations

import os
import time

__all__ = ["new_id"]

_last_ms = 0
_seq = 0


def new_id(prefix: str, sep: str = "_") -> str:
    """``prefix`` + ``sep`` + 11 hex digits of ms time + 3 of sequence + 10 random hex digits."""
    global _last_ms, _seq
    now_ms = int(time.time() * 1000)
    if now_ms <= _last_ms:
        now_ms = _last_ms
        _seq += 1
    else:
        _last_ms, _seq = now_ms, 0
    return f"{prefix}{sep}{now_ms:011x}{_seq & 0xFFF:03x}{os.urandom(5).hex()}"
