"""What the server sends webhooks with, and the create-time check of a batch's own
``webhook_url`` / ``webhook_secret``.

A batch's ``webhook_url`` makes the server POST to an address a tenant chose, so
it passes the same kind of allowlist as a tenant's engine endpoint
(``runtimes/egress.py``), under its own setting, ``OVERNIGHT_ALLOWED_WEBHOOK_URLS``:
unset, any URL in open mode and none in keyed mode; link-local and
cloud-metadata addresses refused unless named. It is checked at create (a 400
naming the field) and again before every attempt (a DNS name may move). Redirects
are never followed, so a receiver cannot bounce the POST somewhere else.

Deliveries to a batch's URL are signed with the batch's ``webhook_secret``
(stored encrypted like ``runtime.api_key``). In keyed mode one is required: the
server's secret signs the server-wide deliveries, and a tenant holding it could
forge events for every other tenant. In open mode (one user) the server's secret
is used when the batch brings none.

A console job's own ``webhook_url`` / ``webhook_secret`` (top-level fields of
``POST /api/v1/jobs``, ``key`` "" below) follow exactly the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overnight.errors import InvalidRequestError
from overnight.runtimes.egress import EndpointPolicy, EndpointRefused, check_endpoint_url
from overnight.secret_box import SecretBox
from overnight.webhooks.signing import WebhookSecretError, parse_secret, parse_secrets
from overnight.webhooks.state import RetryRules

__all__ = ["SEALED_SECRET", "WebhookConfig", "check_batch_webhook", "check_webhook_url", "parse_batch_webhook"]

#: Where a batch's webhook secret lives in its record: encrypted, never in plain text.
SEALED_SECRET = "secret_sealed"
POLICY_SETTING = "OVERNIGHT_ALLOWED_WEBHOOK_URLS"


def check_webhook_url(url: object) -> str:
    """A usable http(s) webhook URL, or ``EndpointRefused`` saying what is wrong."""
    if isinstance(url, str) and "@" in url.split("?", 1)[0].split("#", 1)[0]:
        raise EndpointRefused("must not contain credentials (the delivery is signed instead)")
    return check_endpoint_url(url)


@dataclass(frozen=True)
class WebhookConfig:
    """The server's webhook settings, checked (``from_settings`` raises ``ValueError``
    naming the setting)."""

    #: ``OVERNIGHT_WEBHOOK_URL``: every batch's events go here (None: nowhere).
    url: str | None = None
    #: ``OVERNIGHT_WEBHOOK_SECRET``'s keys (every one signs; the first is the current one).
    keys: tuple[bytes, ...] = ()
    #: Which batch ``webhook_url``s are allowed.
    policy: EndpointPolicy = field(default_factory=lambda: EndpointPolicy(None, setting=POLICY_SETTING))
    #: Multi-tenant: a batch's own URL needs its own secret.
    keyed: bool = False
    retry: RetryRules = RetryRules()
    #: One attempt's limit (the spec recommends 15-30 s).
    timeout_s: float = 15.0
    #: How often a replica looks for due deliveries.
    poll_s: float = 1.0

    @property
    def hold_s(self) -> float:
        """How long a claim keeps other replicas off a delivery: past the longest
        attempt (connect plus answer), so only a replica that died mid-delivery
        has its delivery taken over (and sent again)."""
        return 2 * self.timeout_s + 10.0

    @classmethod
    def from_settings(cls, settings: Any, *, keyed: bool) -> WebhookConfig:
        url = settings.webhook_url or None
        if url is not None:
            try:
                url = check_webhook_url(url)
            except EndpointRefused as exc:
                raise ValueError(f"OVERNIGHT_WEBHOOK_URL {exc}") from None
        keys: tuple[bytes, ...] = ()
        if settings.webhook_secret:
            try:
                keys = parse_secrets(settings.webhook_secret)
            except WebhookSecretError as exc:
                raise ValueError(f"OVERNIGHT_WEBHOOK_SECRET: {exc}") from None
        if url is not None and not keys:
            raise ValueError(
                "OVERNIGHT_WEBHOOK_URL is set but OVERNIGHT_WEBHOOK_SECRET is not: deliveries are always signed; "
                "generate a secret with: python -c 'from overnight.webhooks import generate_secret; "
                "print(generate_secret())'"
            )
        return cls(
            url=url, keys=keys, keyed=keyed,
            policy=EndpointPolicy(settings.allowed_webhook_urls, keyed=keyed, setting=POLICY_SETTING),
            retry=RetryRules(max_attempts=settings.webhook_max_attempts, max_age_s=settings.webhook_max_age_s,
                             base_s=settings.webhook_backoff_base_s, max_s=settings.webhook_backoff_max_s),
            timeout_s=settings.webhook_timeout_s, poll_s=settings.webhook_poll_s,
        )


def _field(key: str, name: str) -> str:
    """The request field ``name`` under ``key`` (a batch's extension), or at the top
    of the body when ``key`` is empty (a console job)."""
    return f"{key}.{name}" if key else name


def parse_batch_webhook(ext: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The syntax of ``webhook_url`` / ``webhook_secret`` in the extension (in a
    console job's body when ``key`` is ""): ``{"url": ..., "secret": ... | None}``
    or None when the request names no URL."""
    url, secret = ext.get("webhook_url"), ext.get("webhook_secret")
    url_f, secret_f = _field(key, "webhook_url"), _field(key, "webhook_secret")
    if url is None:
        if secret is not None:
            raise InvalidRequestError(f"'{secret_f}' needs a {url_f}.", param=secret_f)
        return None
    try:
        url = check_webhook_url(url)
    except EndpointRefused as exc:
        raise InvalidRequestError(f"'{url_f}' {exc}.", param=url_f) from None
    if secret is not None:
        try:
            parse_secret(secret)
        except WebhookSecretError as exc:  # the value is a secret: never echo it
            raise InvalidRequestError(f"'{secret_f}' {exc}.", param=secret_f) from None
    return {"url": url, "secret": secret}


async def check_batch_webhook(
    hook: dict[str, Any], *, key: str, config: WebhookConfig | None, secrets: SecretBox | None
) -> dict[str, Any]:
    """The record's form of a parsed batch (or job: ``key`` "") webhook: the URL
    allowed by the policy and the secret sealed (``{"url", "secret_sealed"?}``); a
    400 naming the field otherwise."""
    url_f, secret_f = _field(key, "webhook_url"), _field(key, "webhook_secret")
    if config is None:
        raise InvalidRequestError("This server does not send webhooks.", param=url_f)
    try:
        url = await config.policy.check(hook["url"])
    except EndpointRefused as exc:
        raise InvalidRequestError(f"'{url_f}' {exc}.", param=url_f, code="webhook_url_not_allowed") from None
    out: dict[str, Any] = {"url": url}
    secret = hook.get("secret")
    if secret is None:
        if config.keyed:
            raise InvalidRequestError(
                f"'{url_f}' needs a {secret_f} (whsec_...) to sign its deliveries with: "
                "on a server with API keys each receiver has its own secret.", param=secret_f)
        if not config.keys:
            raise InvalidRequestError(
                f"'{url_f}' needs a {secret_f} (whsec_...): this server has no "
                "OVERNIGHT_WEBHOOK_SECRET to sign its deliveries with.", param=secret_f)
        return out
    if secrets is None or not secrets.enabled:
        raise InvalidRequestError(
            f"'{secret_f}' cannot be stored: this server has no OVERNIGHT_SECRET_KEY to encrypt it "
            "with. Ask the operator to set one.", param=secret_f)
    out[SEALED_SECRET] = secrets.seal(secret)
    return out
