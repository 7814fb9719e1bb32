"""Per-project authentication, as Wiro's docs define it.

- Signature mode: ``x-api-key``, ``x-nonce``, ``x-signature`` where the signature is the hex
  HMAC-SHA256 keyed with the API key over ``API_SECRET + NONCE`` (also accepted after the label
  ``openssl dgst`` prints, ``SHA2-256(stdin)= <hex>``: the seeds' curl recipe sends that line whole). What is asked of the nonce is
  the project's **nonce policy**:

  - ``lenient`` (the default): a valid signature is accepted whatever the nonce ("unix time or
    any random integer value", Wiro's docs) and however often the same nonce is reused. Wiro's
    own clients need this: the n8n nodes sign once and reuse the headers for the Run and every
    Task/Detail poll for up to ten minutes. No replay protection beyond TLS.
  - ``strict``: each nonce is accepted once per project (remembered for
    ``nonce_retention_seconds``), and a nonce that is plausibly a current Unix time — seconds
    from 10⁹, or milliseconds from 10¹², up to ``nonce_window_seconds`` in the future — must be
    within ``nonce_window_seconds`` of now. Larger or smaller integers (``4242424242``, a
    nanosecond clock, a counter) are random nonces: once each, no window.
- API-key mode: ``x-api-key`` alone (signature headers, if sent, are ignored).

Projects are looked up by the hash of the key and kept for :data:`PROJECT_TTL` seconds in each API
process (:class:`ProjectCache`), so a request of a known project costs no database read (a
lenient or API-key project's check then needs no I/O at all, and the API runs it on its event
loop); a project changed by another process (``easel projects nonce-policy``) is re-read within
that time. Unknown keys are never cached: a project created a moment ago works at once.
"""
from __future__ import annotations

import hmac
import re
import threading

from easel.clock import SYSTEM, Clock
from easel.config import Settings
from easel.signing import signature
from easel.store import Project, Store

from .errors import WiroError

NOT_FOUND = "Project authorization is not founded."
SIGNATURE_REQUIRED = "Project requires signature authentication. x-signature and x-nonce headers are required."
NOT_VALID = "Project authorization is not valid."
NONCE_POLICIES = ("lenient", "strict")
MAX_NONCE_LENGTH = 128
PROJECT_TTL = 1.0  # seconds a project read from the store is reused by one API process
# what ``openssl dgst -sha256 -hmac KEY`` prints (the seeds' curl recipe sends all of it):
# ``SHA2-256(stdin)= <hex>`` (OpenSSL 3), ``HMAC-SHA256(stdin)= <hex>`` or ``(stdin)= <hex>`` (1.1)
_OPENSSL_LABEL = re.compile(r"(?:[A-Za-z0-9-]{1,24})?\((?:stdin|-)\)= ?([0-9A-Fa-f]{64})", re.ASCII)


def signature_hex(sent: str) -> str:
    """The hex digest in an ``x-signature`` value, lower-cased: the value itself, or the hex after
    an ``openssl dgst`` label (``SHA2-256(stdin)= ``, ``(stdin)= ``), which the seeds' bash recipe
    sends because it keeps openssl's whole output line. Anything else is returned as sent (and
    then fails the comparison): only that label is tolerated, the HMAC is still checked in full."""
    sent = sent.strip()
    m = _OPENSSL_LABEL.fullmatch(sent)
    return (m.group(1) if m else sent).lower()


class ProjectCache:
    """Projects by API key (the store's read-only rows), each reused for ``ttl`` seconds of
    ``clock``'s monotonic time (default the real clock; tests move a ManualClock)."""

    def __init__(self, store: Store, ttl: float = PROJECT_TTL, clock: Clock = SYSTEM):
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self._items: dict[str, tuple[float, Project]] = {}
        self._lock = threading.Lock()

    def peek(self, apikey: str) -> Project | None:
        """The cached project of ``apikey`` if it is fresh, else None (no I/O)."""
        item = self._items.get(apikey)
        return item[1] if item is not None and item[0] > self.clock.monotonic() else None

    def get(self, apikey: str) -> Project | None:
        """The project of ``apikey``: cached, or read from the store (and cached if it exists)."""
        project = self.peek(apikey)
        if project is None:
            project = self.store.project_by_key(apikey)
            if project is not None:
                with self._lock:
                    if len(self._items) > 10_000:  # many projects: start over rather than grow
                        self._items.clear()
                    self._items[apikey] = (self.clock.monotonic() + self.ttl, project)
        return project

    def invalidate(self, apikey: str | None = None) -> None:
        """Forget ``apikey``'s project (every project with None)."""
        with self._lock:
            if apikey is None:
                self._items.clear()
            else:
                self._items.pop(apikey, None)


def nonce_time(nonce: str, window: float, now: float | None = None) -> float | None:
    """The Unix time (seconds) a strict-policy nonce claims, or None for a random nonce.

    A decimal integer is a timestamp when it is plausibly current: seconds in
    ``[10⁹, now + window]`` or milliseconds in ``[10¹², (now + window) × 1000]``. Anything else
    (a future-dated number such as 4242424242, nanoseconds, a small counter, non-digits) is random.
    ``now``: Unix time in seconds (default: the real clock's).
    """
    if not (nonce.isascii() and nonce.isdigit()) or len(nonce) > 20:
        return None
    now = SYSTEM.now() if now is None else now
    value = int(nonce)
    if 10**9 <= value <= now + window:
        return float(value)
    if 10**12 <= value <= (now + window) * 1000:
        return value / 1000.0
    return None


def authenticate(headers, store: Store, settings: Settings, projects: ProjectCache | None = None,
                 clock: Clock = SYSTEM) -> Project:
    """Return the calling project or raise :class:`WiroError` (HTTP 401, code 0; the reason for a
    refused nonce is in the error's ``detail``). ``projects``: where to look the key up (default:
    the store, uncached); ``clock``: the time a strict project's timestamp nonce is compared with."""
    apikey = headers.get("x-api-key", "")
    project = (projects.get(apikey) if projects is not None else store.project_by_key(apikey)) if apikey else None
    return _check(headers, apikey, project, store, settings, clock)


def authenticate_without_io(headers, settings: Settings, projects: ProjectCache) -> Project | None:
    """:func:`authenticate` when it needs neither the store nor a nonce write: the key's project is
    cached and in API-key mode or the lenient nonce policy. Returns None when it needs I/O (then
    call :func:`authenticate` in a thread); raises :class:`WiroError` as it does."""
    apikey = headers.get("x-api-key", "")
    project = projects.peek(apikey) if apikey else None
    if project is None or (project.auth_mode != "apikey" and (project.nonce_policy or "lenient") != "lenient"):
        return None
    return _check(headers, apikey, project, None, settings, SYSTEM)  # lenient: no time is read


def _check(headers, apikey: str, project: Project | None, store: Store | None, settings: Settings,
           clock: Clock) -> Project:
    if project is None:
        raise WiroError(0, NOT_FOUND, 401)
    if project.auth_mode == "apikey":
        return project
    nonce, sig = headers.get("x-nonce", ""), headers.get("x-signature", "")
    if not nonce or not sig:
        raise WiroError(0, SIGNATURE_REQUIRED, 401)
    if len(nonce) > MAX_NONCE_LENGTH or not nonce.isascii():
        raise WiroError(0, NOT_VALID, 401, detail=f"x-nonce must be at most {MAX_NONCE_LENGTH} ASCII characters.")
    expected = signature(apikey, project.apisecret, nonce)  # the key as sent: only its hash is stored
    if not hmac.compare_digest(expected, signature_hex(sig)):
        raise WiroError(0, NOT_VALID, 401)
    if (project.nonce_policy or "lenient") == "lenient":
        return project
    window = settings.api.nonce_window_seconds
    now = clock.now()
    stamp = nonce_time(nonce, window, now)
    if stamp is not None and abs(now - stamp) > window:
        raise WiroError(0, NOT_VALID, 401, detail=f"This project's nonce policy is strict: a timestamp nonce must be "
                                                  f"within {window} s of the server's time.")
    if not store.use_nonce(project.id, nonce, settings.api.nonce_retention_seconds):
        raise WiroError(0, NOT_VALID, 401, detail="This project's nonce policy is strict: this nonce was already "
                                                  "used; send a new one with every request.")
    return project
