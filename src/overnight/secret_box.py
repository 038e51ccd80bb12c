"""Secrets at rest: a tenant's ``runtime.api_key`` is stored encrypted.

Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under the server key
``OVERNIGHT_SECRET_KEY``. Several comma-separated keys rotate: the first encrypts,
any of them decrypts. In open mode without a key the server creates one in
``<data_dir>/secret.key`` (mode 0600) at first start; in keyed mode the operator
sets it (every replica needs the same key), and until then a batch carrying an
``api_key`` is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["SecretBox", "SecretError", "load_or_create_key_file"]

log = logging.getLogger("overnight")

KEY_FILE = "secret.key"


class SecretError(ValueError):
    """A key is malformed, or a stored secret cannot be decrypted with the keys given."""


class SecretBox:
    def __init__(self, keys: str | None) -> None:
        items = [k.strip() for k in (keys or "").split(",") if k.strip()]
        fernets = []
        for i, k in enumerate(items):
            try:
                fernets.append(Fernet(k.encode()))
            except (ValueError, TypeError):
                raise SecretError(
                    f"OVERNIGHT_SECRET_KEY key #{i + 1} is not a Fernet key (32 url-safe base64 bytes); "
                    "generate one with: python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())'"
                ) from None
        self._f = MultiFernet(fernets) if fernets else None

    @property
    def enabled(self) -> bool:
        return self._f is not None

    def seal(self, plain: str) -> str:
        if self._f is None:
            raise SecretError("the server has no OVERNIGHT_SECRET_KEY to encrypt secrets with")
        return self._f.encrypt(plain.encode()).decode()

    def open(self, sealed: str) -> str:
        if self._f is None:
            raise SecretError("a stored secret needs OVERNIGHT_SECRET_KEY to decrypt, and none is set")
        try:
            return self._f.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise SecretError(
                "a stored secret cannot be decrypted with this server's OVERNIGHT_SECRET_KEY "
                "(was the key changed without keeping the old one in the list?)"
            ) from None


def load_or_create_key_file(data_dir: Path) -> str:
    """The key in ``data_dir/secret.key``, created (0600, never overwritten) if absent."""
    path = data_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(Fernet.generate_key().decode() + "\n")
    log.warning("created %s (mode 0600) to encrypt tenants' engine API keys at rest; "
                "set OVERNIGHT_SECRET_KEY to manage the key yourself", path)
    return path.read_text().strip()
