"""Batch webhooks like OpenAI's: ``batch.completed``, ``batch.failed``,
``batch.expired`` and ``batch.cancelled`` events, signed per Standard Webhooks,
delivered at least once to the server's ``OVERNIGHT_WEBHOOK_URL`` and a batch's
own ``webhook_url``; and console jobs' ``job.*`` events (``jobs``).

- ``signing``: secrets, signatures, and ``verify`` for receivers;
- ``state``: the events and deliveries kept on the batch record (why there);
- ``config``: the settings, and the create-time check of a batch's URL;
- ``jobs``: console jobs' events, kept on the job's record, and how the loop finds them;
- ``dispatcher``: the delivery loop every replica runs.
"""

from __future__ import annotations

from overnight.webhooks.signing import WebhookVerificationError, generate_secret, verify

__all__ = ["WebhookVerificationError", "generate_secret", "verify"]
