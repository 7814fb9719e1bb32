"""Per-project authentication, as Wiro's docs define it.

- Signature mode: ``x-api-key``, ``x-nonce``, ``x-signature`` where the signature is the hex
  HMAC-SHA256 keyed with the API key over ``API_SECRET + NONCE``. A nonce is accepted once per
  project (remembered for ``nonce_retention_seconds``); a nonce that looks like a Unix time
  (seconds ≥ 10⁹, or milliseconds ≥ 10¹²) must also be within ``nonce_window_seconds`` of now.
- API-key mode: ``x-api-key`` alone (signature headers, if sent, are ignored).
"""
from __future__ import annotations

import hmac
import time

from easel.config import Settings
from easel.signing import signature
from easel.store import Project, Store

from .errors import WiroError

NOT_FOUND = "Project authorization is not founded."
SIGNATURE_REQUIRED = "Project requires signature authentication. x-signature and x-nonce headers are required."
NOT_VALID = "Project authorization is not valid."


def _nonce_time(nonce: str) -> float | None:
    if not (nonce.isascii() and nonce.isdigit()) or len(nonce) > 20:
        return None
    value = int(nonce)
    if value >= 10**12:
        return value / 1000.0
    if value >= 10**9:
        return float(value)
    return None


def authenticate(headers, store: Store, settings: Settings) -> Project:
    """Return the calling project or raise :class:`WiroError` (HTTP 401, code 0)."""
    apikey = headers.get("x-api-key", "")
    project = store.project_by_key(apikey) if apikey else None
    if project is None:
        raise WiroError(0, NOT_FOUND, 401)
    if project.auth_mode == "apikey":
        return project
    nonce, sig = headers.get("x-nonce", ""), headers.get("x-signature", "")
    if not nonce or not sig:
        raise WiroError(0, SIGNATURE_REQUIRED, 401)
    if len(nonce) > 128 or not nonce.isascii():
        raise WiroError(0, f"{NOT_VALID} x-nonce must be at most 128 ASCII characters.", 401)
    expected = signature(apikey, project.apisecret, nonce)  # the key as sent: only its hash is stored
    if not hmac.compare_digest(expected, sig.strip().lower()):
        raise WiroError(0, NOT_VALID, 401)
    stamp = _nonce_time(nonce)
    if stamp is not None and abs(time.time() - stamp) > settings.nonce_window_seconds:
        raise WiroError(0, f"{NOT_VALID} The nonce timestamp is more than {settings.nonce_window_seconds} s from "
                           "the server's time.", 401)
    if len(nonce) > 128 or not store.use_nonce(project.id, nonce, settings.nonce_retention_seconds):
        raise WiroError(0, f"{NOT_VALID} This nonce was already used; send a new one with every request.", 401)
    return project
