"""The per-API-key rate limit (``EASEL_RATE_LIMIT_PER_MINUTE``), with the ``limits`` library.

A moving window (``limits.strategies.MovingWindowRateLimiter``): at most N requests in any 60
seconds, exactly, not an approximation at window edges. Where the window lives:

- ``EASEL_REDIS_URL`` set: in Redis (``limits.storage.RedisStorage``, keys under
  ``<EASEL_REDIS_PREFIX>:ratelimit``), checked and recorded by one Lua script, so every API
  process shares one window per key: N requests in total across the fleet, not N per process.
  If Redis stops answering, each process falls back to its own window (logged) until it answers
  again: a degraded limit rather than refusing every request.
- otherwise: in this process's memory (``limits.storage.MemoryStorage``); with several API
  processes each then counts only the requests it serves.
"""
from __future__ import annotations

import logging
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import MovingWindowRateLimiter

from easel.store.notify import redact

log = logging.getLogger("easel.api")


class RateLimiter:
    """``per_minute`` requests per key in any 60 s; 0 = unlimited.

    Args:
        per_minute: Requests allowed per key in a moving 60-second window (0 disables the limit).
        redis_url: Redis shared by the API processes (empty: this process's memory).
        prefix: Key prefix in Redis (``EASEL_REDIS_PREFIX``), so deployments can share a server.
    """

    RETRY_SECONDS = 5.0

    def __init__(self, per_minute: int, redis_url: str = "", prefix: str = "easel"):
        self.per_minute = per_minute
        self.item = RateLimitItemPerMinute(max(1, per_minute))
        self.local = MovingWindowRateLimiter(MemoryStorage())
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
        limiter = self.local
        if self.shared is not None and time.monotonic() >= self._down_until:
            limiter = self.shared
        try:
            return self._hit(limiter, key)
        except Exception as exc:  # limits.errors.StorageError: Redis is down or unreachable
            if limiter is self.local:
                raise
            self._down_until = time.monotonic() + self.RETRY_SECONDS
            log.warning("rate limit: Redis at %s failed (%s); this process counts on its own for %.0f s",
                        redact(self.redis_url), exc, self.RETRY_SECONDS)
            return self._hit(self.local, key)

    def _hit(self, limiter: MovingWindowRateLimiter, key: str) -> float | None:
        if limiter.hit(self.item, key):
            return None
        reset, _remaining = limiter.get_window_stats(self.item, key)
        return max(0.0, reset - time.time())
