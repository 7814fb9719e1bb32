"""Signatures shared by the server and the client.

- Wiro's request signature (``x-signature``), which the server verifies and the client computes.
- Webhook signatures in the `Standard Webhooks <https://www.standardwebhooks.com/>`_ scheme (the
  one Replicate uses): headers ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
  ``webhook-signature`` = ``v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">``. Easel keys
  the HMAC with the project's API secret as UTF-8 bytes (Standard Webhooks' ``whsec_`` secrets
  are base64; the API secret is used as is, so receivers need nothing new).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Mapping


class WebhookVerificationError(ValueError):
    """A webhook whose headers are missing, whose timestamp is stale, or whose signature is wrong."""


def signature(apikey: str, apisecret: str, nonce: str) -> str:
    """Hex HMAC-SHA256 keyed with ``apikey`` over ``apisecret + nonce`` (Wiro's ``x-signature``)."""
    return hmac.new(apikey.encode(), (apisecret + nonce).encode(), hashlib.sha256).hexdigest()


def webhook_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of ``f"{msg_id}.{timestamp}.{body}"``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes, tolerance_seconds: int = 300,
                   now: float | None = None) -> str:
    """Check a received webhook; return its ``webhook-id`` (use it to drop duplicates).

    Args:
        secret: The project's API secret.
        headers: The request headers (any mapping; names are matched case-insensitively).
        body: The raw request body, exactly as received (before any JSON parsing).
        tolerance_seconds: Largest accepted distance between ``webhook-timestamp`` and now.

    Raises:
        WebhookVerificationError: a missing header, a timestamp outside the tolerance (replays),
            or no matching ``v1`` signature (the header may carry several, space-separated).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, stamp, sigs = lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
        timestamp = int(stamp)
    except (KeyError, ValueError):
        raise WebhookVerificationError("missing or malformed webhook-id / webhook-timestamp / webhook-signature") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance_seconds:
        raise WebhookVerificationError("webhook-timestamp is too far from now (replayed or clock skew)")
    expected = webhook_signature(secret, msg_id, timestamp, body)
    if not any(hmac.compare_digest(expected, s) for s in sigs.split()):
        raise WebhookVerificationError("no valid v1 signature")
    return msg_id
