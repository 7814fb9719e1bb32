"""The per-API-key rate limit (``EASEL_RATE_LIMIT_PER_MINUTE``), with the ``limits`` library.

A moving window (``limits.strategies.MovingWindowRateLimiter``): at most N requests in any 60
seconds, exactly, not an approximation at window edges. Where the window lives:

- ``EASEL_REDIS_URL`` set: in Redis (``limits.storage.RedisStorage``, keys under
  ``<EASEL_REDIS_PREFIX>:ratelimit``), checked and recorded by one Lua script, so every API
  process shares one window per key: N requests in total across the fleet, not N per process.
  If Redis stops answering, each process falls back to its own window (logged) until it answers
  again: a degraded limit rather than refusing every request.
- otherwise: in this process's memory (:class:`LocalWindow`, the same moving window kept on an
  injectable :class:`~easel.clock.Clock`, so tests move a ManualClock instead of waiting a
  minute); with several API processes each then counts only the requests it serves.

The shared window's time is Redis clients' real time (the ``limits`` library reads it, and every
process must agree); the clock also times the fallback after a Redis failure.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from easel.clock import SYSTEM, Clock
from easel.store.notify import redact

log = logging.getLogger("easel.api")
WINDOW_SECONDS = 60.0


class LocalWindow:
    """A moving window in this process's memory: at most ``limit`` hits per key in any
    ``window`` seconds of ``clock``'s monotonic time. Thread-safe.

    Args:
        limit: hits allowed per key in a window (>= 1).
        window: the window's length in seconds.
        clock: where the time is read (default the real clock).
    """

    MAX_KEYS = 100_000  # more keys than this: drop those with no hit in the window

    def __init__(self, limit: int, window: float = WINDOW_SECONDS, clock: Clock = SYSTEM):
        self.limit = limit
        self.window = window
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> float | None:
        """Record a hit of ``key`` if the window allows it: None; else the seconds until it does
        (> 0; a refused hit is not recorded)."""
        now = self.clock.monotonic()
        with self._lock:
            hits = self._hits.get(key)
            if hits is None:
                if len(self._hits) >= self.MAX_KEYS:
                    self._forget_idle(now)
                hits = self._hits[key] = deque()
            while hits and hits[0] < now - self.window:
                hits.popleft()
            if len(hits) < self.limit:
                hits.append(now)
                return None
            return max(0.0, hits[0] + self.window - now)

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, hits in self._hits.items() if not hits or hits[-1] <= now - self.window]:
            del self._hits[key]


class RateLimiter:
    """``per_minute`` requests per key in any 60 s; 0 = unlimited.

    Args:
        per_minute: Requests allowed per key in a moving 60-second window (0 disables the limit).
        redis_url: Redis shared by the API processes (empty: this process's memory).
        prefix: Key prefix in Redis (``EASEL_REDIS_PREFIX``), so deployments can share a server.
        clock: the time of the in-memory window and of the Redis fallback (default the real clock).
    """

    RETRY_SECONDS = 5.0

    def __init__(self, per_minute: int, redis_url: str = "", prefix: str = "easel", clock: Clock = SYSTEM):
        self.per_minute = per_minute
        self.clock = clock
        self.item = RateLimitItemPerMinute(max(1, per_minute))
        self.local = LocalWindow(max(1, per_minute), WINDOW_SECONDS, clock)
        self.redis_url = redis_url
        self.shared = None
        if per_minute > 0 and redis_url:
            storage = RedisStorage(redis_url, key_prefix=f"{prefix}:ratelimit", wrap_exceptions=True,
                                   socket_timeout=1.0, socket_connect_timeout=1.0)
            self.shared = MovingWindowRateLimiter(storage)
        self._down_until = 0.0

    def check(self, key: str) -> float | None:
        """Record one request of ``key``; None if it is allowed, else the seconds until one is
        (for ``Retry-After``). Refused requests are not counted."""
        if self.per_minute <= 0:
            return None
        if self.shared is None or self.clock.monotonic() < self._down_until:
            return self.local.hit(key)
        try:
            return self._shared_hit(key)
        except Exception as exc:  # limits.errors.StorageError: Redis is down or unreachable
            self._down_until = self.clock.monotonic() + self.RETRY_SECONDS
            log.warning("rate limit: Redis at %s failed (%s); this process counts on its own for %.0f s",
                        redact(self.redis_url), exc, self.RETRY_SECONDS)
            return self.local.hit(key)

    def _shared_hit(self, key: str) -> float | None:
        if self.shared.hit(self.item, key):
            return None
        reset, _remaining = self.shared.get_window_stats(self.item, key)
        return max(0.0, reset - time.time())  # the library's (real) time: the window is shared
