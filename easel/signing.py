"""Wiro's request signature, shared by the server (verify) and the client (sign)."""
from __future__ import annotations

import hashlib
import hmac


def signature(apikey: str, apisecret: str, nonce: str) -> str:
    """Hex HMAC-SHA256 keyed with ``apikey`` over ``apisecret + nonce`` (Wiro's ``x-signature``)."""
    return hmac.new(apikey.encode(), (apisecret + nonce).encode(), hashlib.sha256).hexdigest()
