"""Standard Webhooks signatures (https://www.standardwebhooks.com, spec 1.0).

A delivery carries three headers: ``webhook-id`` (the event's id, the same on
every retry, so a receiver can drop duplicates), ``webhook-timestamp`` (integer
Unix seconds of this attempt, fresh on every retry, so a receiver can refuse
replays) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` of
``"{id}.{timestamp}.{body}"`` under each signing key, space-separated, so a key
can rotate without a gap (the receiver accepts any one that matches).

A signing secret is ``whsec_`` followed by the base64 of 24 to 64 random bytes;
the bytes are the HMAC key. OpenAI signs its webhooks the same way, so the
``openai`` SDK's ``client.webhooks.verify_signature``/``unwrap`` and the Standard
Webhooks libraries verify what overnight sends; ``verify`` here is the same check
for receivers written in Python without either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "SECRET_PREFIX",
    "WebhookSecretError",
    "WebhookVerificationError",
    "generate_secret",
    "parse_secret",
    "parse_secrets",
    "sign",
    "signed_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
#: The spec's bounds on a symmetric key: at least 192 bits, at most 512.
MIN_KEY_BYTES, MAX_KEY_BYTES = 24, 64
#: How far a receiver lets ``webhook-timestamp`` be from its clock (the spec's and
#: OpenAI's SDK default): a captured delivery cannot be replayed later than this.
DEFAULT_TOLERANCE_S = 300


class WebhookSecretError(ValueError):
    """A signing secret is not ``whsec_<base64 of 24-64 bytes>``. The message never
    contains the secret."""


class WebhookVerificationError(ValueError):
    """A delivery's headers or signature do not check out."""


def parse_secret(value: object) -> bytes:
    """The HMAC key of a ``whsec_...`` secret."""
    if not isinstance(value, str) or not value.startswith(SECRET_PREFIX):
        raise WebhookSecretError(f"must be '{SECRET_PREFIX}' followed by base64 (a Standard Webhooks secret)")
    try:
        key = base64.b64decode(value[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSecretError(f"is not valid base64 after '{SECRET_PREFIX}'") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise WebhookSecretError(
            f"decodes to {len(key)} bytes; a signing key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes"
        )
    return key


def parse_secrets(value: str) -> tuple[bytes, ...]:
    """Comma-separated secrets (the new one first while rotating): every one signs."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    keys = []
    for i, item in enumerate(items):
        try:
            keys.append(parse_secret(item))
        except WebhookSecretError as exc:
            raise WebhookSecretError(f"secret #{i + 1} {exc}") from None
    return tuple(keys)


def generate_secret(nbytes: int = 32) -> str:
    """A new random ``whsec_`` secret."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(nbytes)).decode()


def _mac(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` per key, space-separated."""
    if "." in msg_id:  # the spec: an id with a '.' would make the signed string ambiguous
        raise ValueError("a webhook id must not contain '.'")
    sigs = [f"v1,{_mac(k, msg_id, timestamp, body)}" for k in keys]
    if not sigs:
        raise ValueError("no signing key")
    return " ".join(sigs)


def signed_headers(keys: Sequence[bytes], msg_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt at ``timestamp`` (now)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(keys, msg_id, ts, body)}


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a delivery as a receiver would; ``WebhookVerificationError`` says why
    it fails. ``headers`` are matched case-insensitively; ``body`` must be the raw
    bytes received (parsing and re-serializing JSON changes them)."""
    key = parse_secret(secret) if isinstance(secret, str) else secret
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, ts_text, sig_header = lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from None
    if not ts_text.isascii() or not ts_text.isdigit():
        raise WebhookVerificationError("webhook-timestamp is not integer seconds")
    ts = int(ts_text)
    clock = time.time() if now is None else now
    if abs(clock - ts) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s} s from now")
    expected = _mac(key, msg_id, ts, body).encode()
    for sig in sig_header.split(" "):
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return
    raise WebhookVerificationError("no signature matches")
