"""Wake-ups for live-event waiters: after an event commits, the API processes' waiters on that task
(WebSockets, ``Prefer: wait``) read the ``events`` table at once instead of at their next poll.

The ``events`` table stays the log and the only source of what is sent; a wake-up carries nothing
but a task id, so a lost one only delays a waiter until its slow fallback poll
(``Settings.live.live_fallback_poll_interval``).

Two halves, one per side of the store:

- :class:`Publisher` (every process that writes events: workers, API processes). The
  :class:`~easel.store.Store` calls it in every transaction that inserts an event and again after
  the commit, so no write path can forget it.
- :class:`~easel.store.hub.Hub` (API processes, :mod:`easel.store.hub`): one listener per process
  fanning wake-ups out to any number of asyncio waiters.

Backends (:func:`choose_backend`, ``EASEL_LIVE_PUSH``):

- ``redis``: ``PUBLISH <prefix>:events <task id>`` after the commit (redis-py), one ``SUBSCRIBE``
  per API process (``redis.asyncio``). Needs ``EASEL_REDIS_URL``.
- ``postgres``: ``SELECT pg_notify('easel_events', '<task id>')`` inside the transaction that
  inserts the event, so PostgreSQL delivers it on commit and never for a rolled-back write; one
  ``LISTEN`` connection per API process (psycopg's async connection). Channels are per database.
- ``local`` (a SQLite file: the processes of one machine): UDP datagrams on ``127.0.0.1`` to each
  API process registered next to the database (:mod:`easel.store.local_wakeups`).
- ``poll`` (push turned off, or an in-memory SQLite): waiters poll the store as before.

Whatever the backend, a write made in the API process itself (Cancel, lease expiry) wakes that
process's waiters in memory.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .local_wakeups import Sender, registry_for
from .urls import is_postgres

log = logging.getLogger("easel.notify")

PG_CHANNEL = "easel_events"
BACKENDS = ("redis", "postgres", "local", "poll")
MODES = ("auto", "redis", "postgres", "local", "off")


def redis_channel(prefix: str) -> str:
    """The pub/sub channel of event wake-ups under a Redis key prefix (``EASEL_REDIS_PREFIX``)."""
    return f"{prefix}:events"


def choose_backend(mode: str, redis_url: str, database_url: str) -> str:
    """The wake-up backend of a deployment: ``"redis"``, ``"postgres"``, ``"local"`` or ``"poll"``.

    Args:
        mode: ``EASEL_LIVE_PUSH``: ``auto`` (Redis when ``redis_url`` is set, else ``LISTEN/NOTIFY``
            on a PostgreSQL store, else loopback datagrams on a SQLite file, else polling),
            ``redis``, ``postgres``, ``local`` or ``off`` (polling).
        redis_url: ``EASEL_REDIS_URL`` (empty: none).
        database_url: The store's SQLAlchemy URL.

    Raises:
        ValueError: an unknown ``mode``, ``redis`` without a Redis URL, ``postgres`` on another
            database, or ``local`` on anything but a SQLite file; the message names the setting.
    """
    if mode not in MODES:
        raise ValueError(f"EASEL_LIVE_PUSH must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "redis" and not redis_url:
        raise ValueError("EASEL_LIVE_PUSH=redis needs EASEL_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    if mode == "postgres" and not is_postgres(database_url):
        raise ValueError("EASEL_LIVE_PUSH=postgres needs a PostgreSQL EASEL_DATABASE_URL")
    if mode == "local" and registry_for(database_url) is None:
        raise ValueError("EASEL_LIVE_PUSH=local needs a SQLite file as EASEL_DATABASE_URL (sqlite:///path)")
    if mode == "off":
        return "poll"
    if mode == "auto":
        if redis_url:
            return "redis"
        return "postgres" if is_postgres(database_url) else "local" if registry_for(database_url) else "poll"
    return mode


def check_live(live, database_url: str) -> str:
    """The wake-up backend (``"redis"``, ``"postgres"``, ``"local"`` or ``"poll"``) the live settings choose,
    after checking them: what ``easel serve`` checks at start and every publisher or hub made
    from settings checks again.

    Args:
        live: The deployment's :class:`easel.config.LiveSettings` (``live_push``, ``redis_url``).
        database_url: The store's SQLAlchemy URL (``postgres`` needs PostgreSQL).

    Raises:
        ValueError: as :func:`choose_backend`, or a ``redis_url`` that is not a ``redis://``,
            ``rediss://`` or ``unix://`` URL (the message names ``EASEL_REDIS_URL``, password redacted).
    """
    backend = choose_backend(live.live_push, live.redis_url, database_url)
    if live.redis_url and not live.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"EASEL_REDIS_URL must be a redis://, rediss:// or unix:// URL, not {redact(live.redis_url)[:60]!r}")
    return backend


def redact(url: str) -> str:
    """A URL for logs: any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


class Publisher:
    """The writer's half: called by the store for every event it inserts.

    ``backend`` ``"postgres"`` adds ``pg_notify`` to the event's transaction; ``"redis"``
    publishes after the commit; ``"local"`` sends a datagram to each API process registered in
    ``registry`` (:mod:`easel.store.local_wakeups`) after the commit. A Redis that does not answer costs at most one short timeout
    (``socket_timeout``) every ``RETRY_SECONDS``: the write never fails because of a wake-up,
    and waiters fall back to polling. Local callbacks (:meth:`add_local`) run after every commit
    whatever the backend: in-process waiters (SQLite) wake without a round trip.
    """

    RETRY_SECONDS = 5.0

    def __init__(self, backend: str = "poll", redis_url: str = "", channel: str = "", socket_timeout: float = 0.5,
                 registry: Path | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"wake-up backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if backend == "redis" and not redis_url:
            raise ValueError("the redis wake-up backend needs a Redis URL (EASEL_REDIS_URL)")
        if backend == "local" and registry is None:
            raise ValueError("the local wake-up backend needs the registry folder of a SQLite database")
        self.backend = backend
        self._sender = Sender(registry) if backend == "local" and registry is not None else None
        self.channel = channel or (PG_CHANNEL if backend == "postgres" else redis_channel("easel"))
        self._redis_url = redis_url
        self._socket_timeout = socket_timeout
        self._redis: Any = None
        self._down_until = 0.0
        self._local: list[Callable[[int], None]] = []
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, live, database_url: str) -> "Publisher":
        """The publisher a process of a deployment uses: ``live`` its
        :class:`easel.config.LiveSettings`, ``database_url`` its store; raises ValueError as
        :func:`check_live`."""
        backend = check_live(live, database_url)
        channel = redis_channel(live.redis_prefix) if backend == "redis" else PG_CHANNEL
        return cls(backend, live.redis_url, channel, registry=registry_for(database_url))

    @classmethod
    def default_for(cls, database_url: str) -> "Publisher":
        """Without settings: ``LISTEN/NOTIFY`` on PostgreSQL, datagrams on a SQLite file (both free
        of configuration), else none."""
        return cls(choose_backend("auto", "", database_url), registry=registry_for(database_url))

    @property
    def pg_notify(self) -> bool:
        return self.backend == "postgres"

    def add_local(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(task_id)`` (from the writing thread) after each event commit in this process."""
        with self._lock:
            self._local.append(callback)

    def remove_local(self, callback: Callable[[int], None]) -> None:
        with self._lock:
            if callback in self._local:
                self._local.remove(callback)

    def in_transaction(self, conn, task_id: int) -> None:
        """Inside the transaction that inserts an event of ``task_id`` (a SQLAlchemy connection or
        session): ``pg_notify`` for the ``postgres`` backend (delivered when it commits), else nothing."""
        if self.backend == "postgres":
            from sqlalchemy import func, select

            conn.execute(select(func.pg_notify(self.channel, str(task_id))))

    def committed(self, task_id: int) -> None:
        """After an event of ``task_id`` committed: publish to Redis (``redis`` backend) and run the
        local callbacks. Never raises."""
        if self.backend == "redis":
            self._publish(task_id)
        elif self._sender is not None:
            self._sender.send(task_id)
        for callback in list(self._local):
            try:
                callback(task_id)
            except Exception:  # a waiter's loop that closed must not fail a write
                log.debug("local wake-up callback failed", exc_info=True)

    def _publish(self, task_id: int) -> None:
        now = time.monotonic()
        if now < self._down_until:
            return
        try:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self._redis_url, socket_timeout=self._socket_timeout,
                                                   socket_connect_timeout=self._socket_timeout)
            self._redis.publish(self.channel, str(task_id))
        except Exception as exc:  # redis.RedisError, OSError: waiters poll meanwhile
            self._down_until = now + self.RETRY_SECONDS
            log.warning("live wake-ups: publishing to Redis at %s failed (%s); waiters fall back to polling, "
                        "retrying in %.0f s", redact(self._redis_url), exc, self.RETRY_SECONDS)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
        if self._redis is not None:
            try:
                self._redis.close()
            except Exception:
                pass
            self._redis = None
