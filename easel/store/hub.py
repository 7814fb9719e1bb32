"""The reader's half of live-event wake-ups (:mod:`easel.store.notify` has the writer's half and
the backends): one :class:`Hub` per API process, a listener fanning task ids out to any number of
asyncio waiters (:class:`Watch`), so a thousand open sockets cost one Redis or PostgreSQL
connection, or one loopback socket, not a thousand."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from .local_wakeups import Receiver, registry_for
from .notify import BACKENDS, PG_CHANNEL, Publisher, check_live, redact, redis_channel

log = logging.getLogger("easel.notify")


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
        if backend == "local" and registry_for(database_url) is None:
            raise ValueError("the local wake-up backend needs a SQLite file as database_url")
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
        self._receiver: Receiver | None = None
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
        elif self.backend == "local":
            self._receiver = Receiver(registry_for(self.database_url), self.wake)  # type: ignore[arg-type]
            try:
                await self._receiver.open()
                self._set_pushing(True)
            except OSError as exc:
                log.warning("live wake-ups: no loopback socket for this process (%s); waiters poll", exc)
                self._receiver = None
        if self._task is not None:
            from easel import metrics

            metrics.live_push(self.backend, False)  # visible as 0 until the listener subscribes

    async def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.remove_local(self._wake_threadsafe)
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
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
