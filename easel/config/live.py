"""``Settings.live``: how WebSocket and ``Prefer: wait`` waiters learn of new events, and the Redis they share."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LiveSettings:
    """The live events' settings (``easel.store.notify``, ``easel.api.live``, the rate limit's Redis).

    The backend choice and the Redis URL are checked by ``easel.store.notify.check_live`` (it
    needs the database URL too), called where the publisher or the hub is made and at
    ``easel serve``'s start.

    Attributes:
        redis_url: Redis shared by the fleet's processes (``redis://[:password@]host:port/db``,
            ``rediss://`` for TLS): pushed live-event wake-ups (pub/sub) and the rate limit's
            shared window; empty (default) = none.
        redis_prefix: Prefix of Easel's Redis keys and channels (``<prefix>:events``,
            ``<prefix>:ratelimit/...``), so several deployments can share one Redis.
        live_push: How WebSocket and ``Prefer: wait`` waiters learn of new events: ``auto``
            (Redis pub/sub with ``redis_url``, else PostgreSQL ``LISTEN/NOTIFY`` on a PostgreSQL
            store, else loopback datagrams on a SQLite file, else polling), ``redis``, ``postgres``,
            ``local`` or ``off`` (polling).
        live_poll_interval: Seconds between the store reads of an open WebSocket or a ``Prefer:
            wait`` request (each is one indexed query), i.e. the most latency they add.
        live_fallback_poll_interval: Seconds between the store reads of a waiter while wake-ups
            are pushed and none comes (a lost wake-up delays an event at most this long).
    """

    redis_url: str = ""
    redis_prefix: str = "easel"
    live_push: str = "auto"
    live_poll_interval: float = 0.02
    live_fallback_poll_interval: float = 1.0

    def __post_init__(self) -> None:
        if not self.live_fallback_poll_interval > 0:
            raise ValueError("EASEL_LIVE_FALLBACK_POLL_INTERVAL must be a positive number of seconds")
