"""Wake-ups for live-event waiters: after an event commits, the API processes' waiters on that task
(WebSockets, ``Prefer: wait``) read the ``events`` table at once instead of at their next poll.

The ``events`` table stays the log and the only source of what is sent; a wake-up carries nothing
but a task id, so a lost one only delays a waiter until its slow fallback poll
(``Settings.live.live_fallback_poll_interval``).

Two halves, one per side of the store:

- :class:`Publisher` (every process that writes events: workers, API processes). The
  :class:`~easel.store.Store` calls it in every transaction that inserts an event and again after
  the commit, so no write path can forget it.
- :class:`Hub` (API processes): one listener per process (an asyncio task) fanning wake-ups out to
  any number of asyncio waiters, so a thousand open sockets cost one Redis or PostgreSQL
  connection, not a thousand.

Backends (:func:`choose_backend`, ``EASEL_LIVE_PUSH``):

- ``redis``: ``PUBLISH <prefix>:events <task id>`` after the commit (redis-py), one ``SUBSCRIBE``
  per API process (``redis.asyncio``). Needs ``EASEL_REDIS_URL``.
- ``postgres``: ``SELECT pg_notify('easel_events', '<task id>')`` inside the transaction that
  inserts the event, so PostgreSQL delivers it on commit and never for a rolled-back write; one
  ``LISTEN`` connection per API process (psycopg's async connection). Channels are per database.
- ``poll`` (SQLite, or push turned off): waiters poll the store as before; a write made in the
  API process itself (Cancel, lease expiry) still wakes that process's waiters in memory.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("easel.notify")

PG_CHANNEL = "easel_events"
BACKENDS = ("redis", "postgres", "poll")
MODES = ("auto", "redis", "postgres", "off")


def is_postgres(database_url: str) -> bool:
    """Whether a SQLAlchemy URL names PostgreSQL (any driver)."""
    return database_url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def redis_channel(prefix: str) -> str:
    """The pub/sub channel of event wake-ups under a Redis key prefix (``EASEL_REDIS_PREFIX``)."""
    return f"{prefix}:events"


def choose_backend(mode: str, redis_url: str, database_url: str) -> str:
    """The wake-up backend of a deployment: ``"redis"``, ``"postgres"`` or ``"poll"``.

    Args:
        mode: ``EASEL_LIVE_PUSH``: ``auto`` (Redis when ``redis_url`` is set, else ``LISTEN/NOTIFY``
            on a PostgreSQL store, else polling), ``redis``, ``postgres`` or ``off`` (polling).
        redis_url: ``EASEL_REDIS_URL`` (empty: none).
        database_url: The store's SQLAlchemy URL.

    Raises:
        ValueError: an unknown ``mode``, ``redis`` without a Redis URL, or ``postgres`` on another
            database; the message names the setting.
    """
    if mode not in MODES:
        raise ValueError(f"EASEL_LIVE_PUSH must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "redis" and not redis_url:
        raise ValueError("EASEL_LIVE_PUSH=redis needs EASEL_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    if mode == "postgres" and not is_postgres(database_url):
        raise ValueError("EASEL_LIVE_PUSH=postgres needs a PostgreSQL EASEL_DATABASE_URL")
    if mode == "off":
        return "poll"
    if mode == "auto":
        return "redis" if redis_url else "postgres" if is_postgres(database_url) else "poll"
    return mode


def check_live(live, database_url: str) -> str:
    """The wake-up backend (``"redis"``, ``"postgres"`` or ``"poll"``) the live settings choose,
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
    publishes after the commit. A Redis that does not answer costs at most one short timeout
    (``socket_timeout``) every ``RETRY_SECONDS``: the write never fails because of a wake-up,
    and waiters fall back to polling. Local callbacks (:meth:`add_local`) run after every commit
    whatever the backend: in-process waiters (SQLite) wake without a round trip.
    """

    RETRY_SECONDS = 5.0

    def __init__(self, backend: str = "poll", redis_url: str = "", channel: str = "", socket_timeout: float = 0.5):
        if backend not in BACKENDS:
            raise ValueError(f"wake-up backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if backend == "redis" and not redis_url:
            raise ValueError("the redis wake-up backend needs a Redis URL (EASEL_REDIS_URL)")
        self.backend = backend
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
        return cls(backend, live.redis_url, channel)

    @classmethod
    def default_for(cls, database_url: str) -> "Publisher":
        """Without settings: ``LISTEN/NOTIFY`` on PostgreSQL (free of configuration), else none."""
        return cls("postgres" if is_postgres(database_url) else "poll")

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
        if self._redis is not None:
            try:
                self._redis.close()
            except Exception:
                pass
            self._redis = None


class Watch:
    """One waiter's wake-up flag for one task (see :meth:`Hub.watch`)."""

    def __init__(self, hub: "Hub", task_id: int):
        self.hub = hub
        self.task_id = task_id
        self._event = asyncio.Event()

    def __enter__(self) -> "Watch":
        self.hub._waiters.setdefault(self.task_id, set()).add(self)
        return self

    def __exit__(self, *exc) -> None:
        waiters = self.hub._waiters.get(self.task_id)
        if waiters is not None:
            waiters.discard(self)
            if not waiters:
                self.hub._waiters.pop(self.task_id, None)

    def clear(self) -> None:
        """Forget earlier wake-ups; call it just before reading the store (a wake-up that comes
        after the clear, even during the read, makes the next :meth:`wait` return at once)."""
        self._event.clear()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Sleep until woken or ``timeout`` seconds pass; True when woken."""
        if self._event.is_set():
            return True
        try:
            await asyncio.wait_for(self._event.wait(), max(0.0, timeout))
            return True
        except asyncio.TimeoutError:
            return False


class Hub:
    """The reader's half, one per API process: a listener task fans wake-ups out to :class:`Watch` es.

    :attr:`pushing` is True while the listener is subscribed; waiters then sleep up to the
    fallback interval between reads, and otherwise poll as without push. A listener that loses
    its connection wakes every waiter (they may have missed a message), reconnects with backoff
    (0.5 s doubling to 10 s) and wakes them all again once subscribed.
    """

    def __init__(self, backend: str = "poll", *, redis_url: str = "", channel: str = "", database_url: str = "",
                 publisher: Publisher | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"wake-up backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.backend = backend
        self.channel = channel or (PG_CHANNEL if backend == "postgres" else redis_channel("easel"))
        self.redis_url = redis_url
        self.database_url = database_url
        self.publisher = publisher
        self.pushing = False
        self.connected = asyncio.Event()  # set while subscribed (tests and benchmarks wait on it)
        self._waiters: dict[int, set[Watch]] = {}
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_settings(cls, live, database_url: str, publisher: Publisher | None = None) -> "Hub":
        """The hub of an API process: ``live`` the deployment's :class:`easel.config.LiveSettings`,
        ``database_url`` its store; raises ValueError as :func:`check_live`."""
        backend = check_live(live, database_url)
        channel = redis_channel(live.redis_prefix) if backend == "redis" else PG_CHANNEL
        return cls(backend, redis_url=live.redis_url, channel=channel, database_url=database_url,
                   publisher=publisher)

    def watch(self, task_id: int) -> Watch:
        """A :class:`Watch` on ``task_id``, registered while used as a context manager."""
        return Watch(self, task_id)

    def wake(self, task_id: int) -> None:
        """Wake the waiters of ``task_id`` (call in the event loop's thread)."""
        for w in list(self._waiters.get(task_id, ())):
            w.set()

    def wake_all(self) -> None:
        for waiters in list(self._waiters.values()):
            for w in list(waiters):
                w.set()

    def _wake_threadsafe(self, task_id: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.wake, task_id)

    async def start(self) -> None:
        """Start the listener in the running loop (returns at once; it connects in the background)."""
        self._loop = asyncio.get_running_loop()
        if self.publisher is not None:
            self.publisher.add_local(self._wake_threadsafe)
        if self.backend == "redis":
            self._task = asyncio.create_task(self._run(self._listen_redis), name="easel-wakeups")
        elif self.backend == "postgres":
            self._task = asyncio.create_task(self._run(self._listen_postgres), name="easel-wakeups")
        if self._task is not None:
            from easel import metrics

            metrics.live_push(self.backend, False)  # visible as 0 until the listener subscribes

    async def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.remove_local(self._wake_threadsafe)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._set_pushing(False)

    def _set_pushing(self, on: bool) -> None:
        if on != self.pushing:
            self.pushing = on
            if self.backend != "poll":
                from easel import metrics

                metrics.live_push(self.backend, on)
            (self.connected.set if on else self.connected.clear)()
            self.wake_all()  # on: missed messages are read now; off: sleepers go back to fast polling

    async def _run(self, listen: Callable) -> None:
        backoff = 0.5
        where = redact(self.redis_url) if self.backend == "redis" else "the PostgreSQL store"
        while True:
            try:
                await listen()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused or lost: poll meanwhile, reconnect
                log.warning("live wake-ups: listening to %s failed (%s); polling until it reconnects", where, exc)
            self._set_pushing(False)
            await asyncio.sleep(backoff)
            backoff = min(10.0, backoff * 2)

    def _dispatch(self, payload: Any) -> None:
        try:
            task_id = int(payload)
        except (TypeError, ValueError):
            return
        self.wake(task_id)

    async def _listen_redis(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=3, health_check_interval=15)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self._set_pushing(True)
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                if msg is None:
                    await pubsub.ping()  # an idle connection that died raises here, not never
                elif msg.get("type") == "message":
                    self._dispatch(msg.get("data"))
        finally:
            self._set_pushing(False)
            try:
                await pubsub.aclose()
                await client.aclose()
            except Exception:
                pass

    async def _listen_postgres(self) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        conninfo = make_url(self.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=5)
        try:
            await conn.execute(f"LISTEN {self.channel}")
            self._set_pushing(True)
            while True:
                async for note in conn.notifies(timeout=5.0):
                    self._dispatch(note.payload)
                await conn.execute("SELECT 1")  # idle: a connection that died raises here
        finally:
            self._set_pushing(False)
            try:
                await conn.close()
            except Exception:
                pass
