"""Issue 12, pushed live events and shared limits, with real services on loopback: Redis pub/sub
and PostgreSQL LISTEN/NOTIFY wake-ups (a rolled-back event wakes no one), two API processes on one
PostgreSQL store whose WebSocket and ``Prefer: wait`` are woken far sooner than their fallback
poll could, and the rate and concurrency limits holding across API processes.

Redis (127.0.0.1:6379, or ``EASEL_TEST_REDIS_URL``) and PostgreSQL (127.0.0.1:5432) tests skip,
saying why, when the service is absent. Every test uses its own Redis key prefix and its own
database, so parallel runs do not collide."""
from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from conftest import SMALL, TIME_SCALE, TOOL, Server
from easel.api.ratelimit import RateLimiter
from easel.config import Settings
from easel.store import LimitReached, Store
from easel.store.hub import Hub
from easel.store.notify import Publisher, check_live, choose_backend, redact, redis_channel
from easel.tasks import lifecycle as lc
import services
from pg import create_database

REDIS_URL = os.environ.get("EASEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FALLBACK = 30.0  # the fallback poll of the two-server tests: a pure poll at it would be many seconds late
BOUND = 2.0  # latency bound those tests assert (push on loopback is tens of milliseconds)


def redis_or_skip() -> str:
    redis = services.import_or_missing("redis", "Redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        services.missing("Redis", f"not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture
def redis_prefix():
    """A Redis key prefix of this test alone; its keys are deleted afterwards."""
    import redis

    url = redis_or_skip()
    prefix = f"easel-test-{os.getpid()}-{secrets.token_hex(4)}"
    yield prefix
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def pg_url():
    url, drop = create_database()
    yield url
    drop()


def _sqlite(tmp_path) -> Store:
    store = Store(Settings(data_dir=tmp_path).core.database_url)
    store.migrate()
    return store


def _queued(store: Store) -> int:
    p = store.create_project("p")
    task, _ = lc.submit(store, project_id=p.id, tool=TOOL, parameters={}, inputs={}, callbackurl="",
                        cost_per_second=0.0)
    return task.id


# -- the mechanism --------------------------------------------------------------------------------


def test_one_parser_names_a_sqlite_databases_file(tmp_path):
    """The store's write lock and secret key, and the wake-up registry, find the same file."""
    from easel.store.db import Database
    from easel.store.local_wakeups import registry_for
    from easel.store.urls import sqlite_file

    assert sqlite_file("sqlite:////abs/easel.db") == Path("/abs/easel.db")
    assert sqlite_file("sqlite+pysqlite:////abs/easel.db?timeout=3") == Path("/abs/easel.db")
    assert sqlite_file("sqlite:///rel/easel.db") == Path("rel/easel.db")
    for none in ("sqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?cache=shared",
                 "postgresql+psycopg://u@h/easel.db"):
        assert sqlite_file(none) is None and registry_for(none) is None, none
    url = f"sqlite:///{tmp_path}/d/easel.db?timeout=3"
    assert registry_for(url) == tmp_path / "d" / "easel.db.wakeups"
    db = Database(url)
    try:
        db.migrate()
    finally:
        db.engine.dispose()
    with sqlite3.connect(tmp_path / "d" / "easel.db") as conn:  # the schema is in that file
        assert ("tasks",) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    with pytest.raises(ValueError, match="in-memory SQLite"):
        Database("sqlite://")


def test_backend_choice_and_refusals(tmp_path):
    pg, lite = "postgresql+psycopg://u@h/db", "sqlite:///x.db"
    assert choose_backend("auto", "", lite) == "local"  # a SQLite file: loopback datagrams
    assert choose_backend("auto", "", "sqlite://") == "poll" and choose_backend("auto", "", "sqlite:///:memory:") == "poll"
    assert choose_backend("auto", "", pg) == "postgres"
    assert choose_backend("auto", REDIS_URL, pg) == "redis"
    assert choose_backend("off", REDIS_URL, pg) == "poll"
    def check(**values):  # the settings take any value; the check lives with the backends
        s = Settings(data_dir=tmp_path, **values)
        return check_live(s.live, s.core.database_url)

    with pytest.raises(ValueError, match="EASEL_LIVE_PUSH=redis needs EASEL_REDIS_URL"):
        check(live_push="redis")
    with pytest.raises(ValueError, match="EASEL_LIVE_PUSH=postgres needs a PostgreSQL"):
        check(live_push="postgres")
    with pytest.raises(ValueError, match="EASEL_LIVE_PUSH=local needs a SQLite file"):
        check(live_push="local", database_url=pg)
    with pytest.raises(ValueError, match="EASEL_LIVE_PUSH must be one of auto, redis, postgres, local, off"):
        check(live_push="kafka")
    with pytest.raises(ValueError, match="EASEL_LIVE_PUSH must be one of auto, redis, postgres, local, off"):
        Publisher.for_settings(Settings(data_dir=tmp_path, live_push="kafka").live, "sqlite:///x.db")
    with pytest.raises(ValueError, match="EASEL_REDIS_URL must be") as err:
        check(redis_url="http://user:hunter2@host/")
    assert "hunter2" not in str(err.value)
    assert check(redis_url=REDIS_URL) == "redis" and check() == "local" and check(live_push="off") == "poll"
    assert redact("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"


async def _started(hub: Hub) -> Hub:
    await hub.start()
    await asyncio.wait_for(hub.connected.wait(), 15)
    return hub


def test_postgres_notify_is_sent_in_the_event_transaction_and_only_on_commit(pg_url):
    store = Store(pg_url)  # without settings: LISTEN/NOTIFY, PostgreSQL's own, needs no configuration
    store.migrate()
    assert store.wakeups.backend == "postgres"
    tid, other = _queued(store), _queued(store)

    async def main():
        hub = await _started(Hub("postgres", database_url=pg_url))
        try:
            with hub.watch(tid) as w, hub.watch(other) as w_other:
                try:
                    with store.engine.begin() as conn:
                        store.wakeups.in_transaction(conn, tid)
                        raise RuntimeError("roll back")
                except RuntimeError:
                    pass
                assert not await w.wait(0.5), "a rolled-back transaction woke a waiter"
                t0 = time.monotonic()
                assert await asyncio.to_thread(lc.claim, store, "w1") == tid  # commits task_accept
                assert await w.wait(5), "the committed event woke no one"
                assert time.monotonic() - t0 < 2
                assert not await w_other.wait(0.1), "another task's waiter was woken"
        finally:
            await hub.stop()

    asyncio.run(main())
    store.engine.dispose()


def test_redis_wakes_only_the_waiters_of_the_task(tmp_path, redis_prefix):
    channel = redis_channel(redis_prefix)
    store = Store(Settings(data_dir=tmp_path).core.database_url, wakeups=Publisher("redis", REDIS_URL, channel))
    store.migrate()
    tid, other = _queued(store), _queued(store)

    async def main():
        hub = await _started(Hub("redis", redis_url=REDIS_URL, channel=channel))
        try:
            with hub.watch(tid) as w, hub.watch(tid) as w2, hub.watch(other) as w_other:
                assert await asyncio.to_thread(lc.claim, store, "w1") == tid
                assert await w.wait(5) and await w2.wait(5)  # every waiter of the task
                assert not await w_other.wait(0.3)
                w.clear()
                await asyncio.to_thread(lc.cancel, store, other)
                assert await w_other.wait(5) and not await w.wait(0.3)
        finally:
            await hub.stop()
        assert not hub.pushing

    asyncio.run(main())


def test_an_unreachable_redis_never_fails_or_slows_a_write(tmp_path, caplog):
    store = Store(Settings(data_dir=tmp_path).core.database_url,
                  wakeups=Publisher("redis", "redis://127.0.0.1:1/0", "nowhere:events"))
    store.migrate()
    tid = _queued(store)
    t0 = time.monotonic()
    assert lc.claim(store, "w1") == tid
    for i in range(20):
        assert lc.log_event(store, tid, lc.ERROR, f"line {i}", owner="w1")
    assert time.monotonic() - t0 < 5  # one failed publish, then none for RETRY_SECONDS
    assert len(store.events(tid)) == 22
    assert sum("publishing to Redis" in r.message for r in caplog.records) == 1

    def listen_failures() -> int:
        return sum("live wake-ups: listening to" in r.message for r in caplog.records)

    async def main():  # a hub that cannot subscribe keeps waiters polling (pushing stays False)
        hub = Hub("redis", redis_url="redis://127.0.0.1:1/0", channel="nowhere:events")
        await hub.start()
        deadline = time.monotonic() + 30 * TIME_SCALE
        while not listen_failures():  # its first attempt to subscribe has failed
            assert time.monotonic() < deadline, "the hub never tried to subscribe"
            await asyncio.sleep(0.05)
        assert not hub.pushing and not hub.connected.is_set()
        await hub.stop()

    asyncio.run(main())


def test_in_process_writes_wake_local_waiters_without_a_broker(tmp_path):
    """Polling (push off): a write in the API process itself (Cancel, lease expiry) still wakes its waiters."""
    assert _sqlite(tmp_path).wakeups.backend == "local"  # the default on a SQLite file
    store = Store(Settings(data_dir=tmp_path).core.database_url, wakeups=Publisher("poll"))
    tid = _queued(store)

    async def main():
        hub = Hub("poll", publisher=store.wakeups)
        await hub.start()
        try:
            with hub.watch(tid) as w:
                await asyncio.to_thread(lc.cancel, store, tid)
                assert await w.wait(5)
            assert not hub.pushing  # waiters keep polling: workers are other processes
        finally:
            await hub.stop()

    asyncio.run(main())


WRITE_IN_ANOTHER_PROCESS = """
import sys
from easel.store import Store
from easel.tasks import lifecycle as lc
store = Store(sys.argv[1])  # no settings: a SQLite file publishes on loopback (Publisher.default_for)
assert store.wakeups.backend == "local", store.wakeups.backend
lc.cancel(store, int(sys.argv[2]))
"""


def test_a_sqlite_write_in_another_process_wakes_the_api_on_loopback_and_only_with_its_token(tmp_path):
    """SQLite file: a worker or CLI process's event commit wakes the API process's waiters at once
    (a datagram to the port it registered next to the database), not at the fallback read; a
    datagram without the registration's token (another user of the machine) wakes no one; the
    registration of a process that died is cleared by the next API process, and its own at stop."""
    import socket
    import subprocess
    import sys

    store = _sqlite(tmp_path)
    url = store.url
    tid, other = _queued(store), _queued(store)
    registry = tmp_path / "easel.db.wakeups"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    registry.mkdir(mode=0o700)
    (registry / str(dead.pid)).write_text("9 0123\n")  # an API process that was killed

    async def main():
        hub = Hub("local", database_url=url, publisher=store.wakeups)
        await hub.start()
        try:
            assert hub.pushing  # waiters sleep up to the fallback interval between reads
            assert [p.name for p in registry.iterdir()] == [str(os.getpid())]  # the dead one is gone
            assert (registry / str(os.getpid())).stat().st_mode & 0o077 == 0  # the token is the owner's
            port, token = (registry / str(os.getpid())).read_text().split()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, hub.watch(tid) as w:
                sock.sendto(f"{'0' * 32} {tid}".encode(), ("127.0.0.1", int(port)))  # a forged token
                sock.sendto(f"{token} {other}".encode(), ("127.0.0.1", int(port)))  # another task's
                assert not await w.wait(1.0)
                started = time.monotonic()
                proc = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITE_IN_ANOTHER_PROCESS, url,
                                                            str(tid), env={**os.environ, "PYTHONPATH": os.getcwd()})
                assert await proc.wait() == 0
                assert await w.wait(10.0), "the other process's commit sent no wake-up"
                assert time.monotonic() - started < 30
        finally:
            await hub.stop()
        assert not hub.pushing and list(registry.iterdir()) == []

    asyncio.run(main())
    assert store.get_task(tid).status == lc.CANCEL


# -- limits in the store and in Redis ---------------------------------------------------------------


def _race_submits(stores: list[Store], project_id: int, n: int, limit: int) -> list[bool]:
    barrier = threading.Barrier(n)

    def one(i: int) -> bool:
        barrier.wait()
        try:
            lc.submit(stores[i % len(stores)], project_id=project_id, tool=TOOL, parameters={}, inputs={},
                      callbackurl="", cost_per_second=0.0, max_unfinished=limit)
            return True
        except LimitReached:
            return False

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_limited_runs_of_several_projects_from_two_processes_neither_overshoot_nor_deadlock(db, tmp_path):
    """Groups of Runs (group commit) from two engines, each group holding several projects'
    locks: every project ends at exactly its limit and no Run fails (the locks are taken in one
    order, so two groups never wait for each other in a circle)."""
    if db == "postgres":
        url, drop = create_database()
    else:
        url, drop = Settings(data_dir=tmp_path).core.database_url, (lambda: None)
    try:
        stores = [Store(url), Store(url)]
        stores[0].migrate()
        projects = [stores[0].create_project(f"p{i}").id for i in range(3)]
        n, limit = 36, 4
        barrier = threading.Barrier(n)

        def one(i: int):
            barrier.wait()
            try:
                return lc.submit(stores[i % 2], project_id=projects[(i // 2) % 3 if i % 4 < 2 else 2 - (i // 2) % 3],
                                 tool=TOOL, parameters={}, inputs={}, callbackurl="", cost_per_second=0.0,
                                 max_unfinished=limit)[0].project_id
            except LimitReached:
                return None

        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(one, range(n)))  # any other exception (a deadlock) fails the test here
        assert sorted(p for p in got if p is not None) == sorted(projects * limit)
        for p in projects:
            assert stores[1].count_in((lc.QUEUE, *lc.RUNNING), project_id=p) == limit
        for s in stores:
            s.engine.dispose()
    finally:
        drop()


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_the_concurrency_limit_is_one_atomic_step_in_the_store(db, tmp_path):
    if db == "postgres":
        url, drop = create_database()
    else:
        url, drop = Settings(data_dir=tmp_path).core.database_url, (lambda: None)
    try:
        stores = [Store(url), Store(url)]  # two engines, as two API processes have
        stores[0].migrate()
        p = stores[0].create_project("p")
        results = _race_submits(stores, p.id, 12, 3)
        assert results.count(True) == 3, results
        assert stores[1].count_in((lc.QUEUE, *lc.RUNNING), project_id=p.id) == 3
        lc.cancel(stores[0], stores[0].tasks_of(p.id)[0].id)  # a finished task frees one slot
        assert _race_submits(stores, p.id, 4, 3).count(True) == 1
        # at the limit, a retry with its Idempotency-Key is answered with its task, another key is refused
        q = stores[0].create_project("q")
        kw = dict(project_id=q.id, tool=TOOL, parameters={}, inputs={}, callbackurl="", cost_per_second=0.0,
                  max_unfinished=1)
        first, created = lc.submit(stores[0], **kw, idempotency_key="job-1")
        again, created_again = lc.submit(stores[1], **kw, idempotency_key="job-1")
        assert created and not created_again and again.id == first.id
        with pytest.raises(LimitReached):
            lc.submit(stores[1], **kw, idempotency_key="job-2")
        for s in stores:
            s.engine.dispose()
    finally:
        drop()


def test_rate_limit_window_in_memory_and_shared_in_redis(redis_prefix):
    local = RateLimiter(3)
    assert [local.check("k") for _ in range(3)] == [None] * 3
    wait = local.check("k")
    assert wait is not None and 0 < wait <= 60
    assert local.check("other") is None  # per key
    # two limiters on one Redis prefix are two API processes: 3 in total, not 6
    a, b = RateLimiter(3, REDIS_URL, redis_prefix), RateLimiter(3, REDIS_URL, redis_prefix)
    answers = [(a if i % 2 else b).check("k") for i in range(6)]
    assert answers[:3] == [None] * 3 and all(w is not None and 0 < w <= 60 for w in answers[3:]), answers
    assert RateLimiter(3, REDIS_URL, redis_prefix + "-x").check("k") is None  # another deployment's prefix


def test_rate_limit_falls_back_to_this_process_when_redis_is_down(caplog):
    limiter = RateLimiter(2, "redis://127.0.0.1:1/0", "down")
    assert [limiter.check("k") is None for _ in range(3)] == [True, True, False]
    assert any("counts on its own" in r.message for r in caplog.records)


# -- two API processes on one PostgreSQL store ----------------------------------------------------


@contextmanager
def api_pair(tmp_path, env: dict, first_args: tuple[str, ...] = ("--workers", "0")):
    """Two ``easel serve`` on one data directory and database: the first with ``first_args``, the
    second API only; both stopped (and their engines disposed) on the way out, failures included."""
    pair = [Server(tmp_path, extra_args=first_args, env=env), Server(tmp_path, extra_args=("--workers", "0"), env=env)]
    try:
        for server in pair:
            server.start()
        yield pair
    finally:
        for server in reversed(pair):
            server.stop()
            server.store.engine.dispose()


def _push_connected(server: Server, backend: str, timeout: float = 30) -> None:
    """Wait until the server's wake-up listener is subscribed (its /metrics gauge says 1)."""
    deadline = time.time() + timeout
    pattern = re.compile(rf'^easel_live_push_connected\{{backend="{backend}"\}} 1\.0$', re.M)
    while time.time() < deadline:
        if pattern.search(httpx.get(f"{server.base}/metrics", timeout=10).text):
            return
        time.sleep(0.2)
    raise AssertionError(f"{server.base}: the {backend} wake-up listener did not connect")


def _frames_with_arrival(server: Server, token: str) -> tuple[float, list[tuple[dict, float]]]:
    """Follow a task's socket; returns (registration time, [(frame, arrival time)])."""
    url = server.base.replace("http", "ws") + "/v1"
    out = []
    with connect(url, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
        registered = time.time()
        while True:
            frame = json.loads(ws.recv(timeout=120 * TIME_SCALE))
            out.append((frame, time.time()))
            if frame["type"] in lc.TERMINAL or frame.get("result") is False:
                return registered, out


def _latencies(store: Store, task_id: int, registered: float, frames: list[tuple[dict, float]]) -> list[float]:
    """Arrival minus commit time of each event written after the socket registered."""
    events = [e for e in store.events(task_id) if not (e.type == lc.ERROR_FULL and not e.message)]
    assert [e.type for e in events] == [f["type"] for f, _ in frames]
    return [arrived - e.created_at for e, (_, arrived) in zip(events, frames) if e.created_at > registered]


@pytest.mark.parametrize("push", ["redis", "postgres", "local"])
def test_events_of_api1s_worker_are_pushed_to_api2(push, tmp_path, request):
    """``local``: the single-box default, both API processes and the worker on one SQLite file."""
    env = {"EASEL_LIVE_PUSH": push, "EASEL_LIVE_FALLBACK_POLL_INTERVAL": str(FALLBACK)}
    if push != "local":
        env["EASEL_DATABASE_URL"] = request.getfixturevalue("pg_url")
    if push == "redis":
        env |= {"EASEL_REDIS_URL": REDIS_URL, "EASEL_REDIS_PREFIX": request.getfixturevalue("redis_prefix")}
    with api_pair(tmp_path, env, first_args=()) as (api1, api2):  # API 1 runs a worker; API 2 is API only
        _push_connected(api2, push)
        p = api2.project()
        # the cold worker's first task (it loads the pipeline) goes first, so the socket registers
        # before the followed task's events happen
        blocker = api2.run(p, {**SMALL, "steps": 10})
        answer = api2.run(p, {**SMALL, "steps": 12})
        registered, frames = _frames_with_arrival(api2, answer["socketaccesstoken"])
        assert frames[-1][0]["type"] == lc.POSTPROCESS_END, frames[-1]
        lat = _latencies(api2.store, int(answer["taskid"]), registered, frames)
        assert len(lat) >= 10, f"only {len(lat)} events came after the socket registered"
        # a socket that only polled every FALLBACK s would be seconds late for most of these
        assert max(lat) < BOUND and statistics.median(lat) < BOUND / 4, lat
        assert api2.detail(p, blocker["taskid"])["status"] == lc.POSTPROCESS_END

        # Prefer: wait on API 2 answers when API 1's worker ends the task, not at a fallback read
        r = api2.post(p, f"/v1/Run/{TOOL}", json={**SMALL, "steps": 6}, headers={"Prefer": "wait=60"})
        answered = time.time()
        task = r.json()["tasklist"][0]
        assert task["status"] == lc.POSTPROCESS_END and task["pexit"] == "0", task
        ended = api2.store.get_task(int(task["id"])).postprocessendtime
        assert 0 <= answered - ended < BOUND, answered - ended


def test_rate_limit_holds_across_two_api_processes(tmp_path, redis_prefix):
    env = {"EASEL_REDIS_URL": REDIS_URL, "EASEL_REDIS_PREFIX": redis_prefix, "EASEL_RATE_LIMIT_PER_MINUTE": "6"}
    with api_pair(tmp_path, env) as (a, b):
        p = a.project()
        codes = [(a if i % 2 else b).post(p, "/v1/Tool/List", json={}) for i in range(9)]
        assert [r.status_code for r in codes] == [200] * 6 + [429] * 3, [r.status_code for r in codes]
        assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in codes[6:])
        assert b.post(a.project(), "/v1/Tool/List", json={}).status_code == 200  # another key has its own window


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_concurrency_limit_holds_under_concurrent_runs_on_two_api_processes(db, tmp_path):
    env = {"EASEL_MAX_CONCURRENT_TASKS": "3"}
    drop = lambda: None  # noqa: E731
    if db == "postgres":
        url, drop = create_database()
        env["EASEL_DATABASE_URL"] = url
    try:
        with api_pair(tmp_path, env) as (a, b):  # no workers: tasks stay queued
            p = a.project()
            barrier = threading.Barrier(12)

            def run(i: int) -> dict:
                server = a if i % 2 else b
                headers = server.headers(p)
                barrier.wait()
                return httpx.post(f"{server.base}/v1/Run/{TOOL}", json=SMALL, headers=headers, timeout=60).json()

            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(run, range(12)))
            assert sum(r["result"] for r in answers) == 3, answers
            assert all(r["errors"][0]["code"] == 96 for r in answers if not r["result"])
            assert a.store.count_in((lc.QUEUE, *lc.RUNNING), project_id=p.id) == 3
    finally:
        drop()
