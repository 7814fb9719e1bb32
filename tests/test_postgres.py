"""The engine on PostgreSQL: SKIP LOCKED claims, an event cursor that cannot skip, and two
servers sharing one database with workers on both, one killed with SIGKILL: nothing lost,
nothing run twice, nothing resurrected. Skipped when no PostgreSQL listens on 127.0.0.1:5432."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from sqlalchemy import text

from conftest import SMALL, TIME_SCALE, Server
from easel.store import Store
from easel.tasks import lifecycle as lc
from pg import create_database


@pytest.fixture
def pg():
    url, drop = create_database()
    store = Store(url)
    store.migrate()
    yield store
    store.engine.dispose()
    drop()


def _queued(store, n):
    p = store.create_project("p")
    return [lc.submit(store, project_id=p.id, tool="wiro/x", parameters={}, inputs={}, callbackurl="",
                      cost_per_second=0)[0].id for _ in range(n)]


def test_a_claim_skips_a_locked_row_instead_of_waiting_or_giving_up(pg):
    first, second = _queued(pg, 2)
    with pg.engine.connect() as other:
        other.execute(text("BEGIN"))
        other.execute(text("SELECT id FROM tasks WHERE id = :i FOR UPDATE"), {"i": first})  # another claimer
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("id", lc.claim(pg, "w2")), daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive() and got["id"] == second
        other.execute(text("ROLLBACK"))
    assert lc.claim(pg, "w1") == first


def test_the_event_cursor_cannot_skip_an_event_committed_late(pg):
    """Writer A has taken its place in the task's sequence but not committed; writer B must wait
    for it, so a reader that has seen B's event can never miss A's (with the old ``id > last``
    cursor, B committed id N+1 first and N was skipped for good)."""
    (tid,) = _queued(pg, 1)
    assert lc.claim(pg, "w1") == tid
    last = pg.events(tid)[-1].seq
    with pg.engine.connect() as a:
        a.execute(text("BEGIN"))
        seq = a.execute(text("UPDATE tasks SET event_seq = event_seq + 1 WHERE id = :i RETURNING event_seq"),
                        {"i": tid}).scalar_one()
        a.execute(text("INSERT INTO events (task_id, type, message, created_at, seq) VALUES (:i, 'a', '', 0, :s)"),
                  {"i": tid, "s": seq})
        b = threading.Thread(target=lc.log_event, args=(pg, tid, lc.ERROR, "b"), daemon=True)
        b.start()
        b.join(0.5)
        assert b.is_alive()  # waits for A's row lock
        assert pg.events(tid, after_seq=last) == []
        a.execute(text("COMMIT"))
    b.join(5)
    seen = pg.events(tid, after_seq=last)
    assert [(e.type, e.seq) for e in seen] == [("a", last + 1), (lc.ERROR, last + 2)]


def test_two_servers_share_one_database_and_survive_a_kill(tmp_path):
    url, drop = create_database()
    env = {"EASEL_LEASE_SECONDS": "2"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Server(tmp_path / "a", database_url=url, env=env)
    b = Server(tmp_path / "b", database_url=url, env=env)
    try:
        a.start()
        p = a.project()
        ids = [a.run(p, {**SMALL, "steps": 20, "seed": str(i)})["taskid"] for i in range(3)]
        a.wait(p, ids[0], until=("task_output",))
        b.start()  # its start-up recovery must not touch A's running task (it used to fail it)
        b.wait_ready()  # B's worker claims tasks from now on
        ids += [(a if i % 2 else b).run(p, {**SMALL, "steps": 6, "seed": str(i)})["taskid"] for i in range(3, 9)]
        deadline = time.time() + 60 * TIME_SCALE
        owners: set[str] = set()
        while len(owners) < 2:  # both servers' workers have claimed tasks (B's worker ids name B's pid)
            assert time.time() < deadline, f"only {owners} ran tasks"
            owners = {t.worker_id.split("-")[1] for t in a.store.tasks_in(lc.RUNNING + lc.TERMINAL) if t.worker_id}
            time.sleep(0.1)
        assert str(b.proc.pid) in owners
        b.proc.kill()  # SIGKILL: no shutdown at all
        b.proc.wait(20)
        ends = {tid: a.wait(p, tid, timeout=180) for tid in ids}  # nothing lost: A runs the rest
        for tid, task in ends.items():
            events = [e.type for e in a.store.events(int(tid))]
            assert events.count(lc.ACCEPT) == 1, (tid, events)  # nothing ran twice
            assert sum(events.count(s) for s in lc.TERMINAL) == 1 and events[-1] in lc.TERMINAL, (tid, events)
            assert task["pexit"] == "0" or "server stopped" in task["debugerror"] \
                or "renewing its lease" in task["debugerror"], task["debugerror"]
        assert ends[ids[0]]["pexit"] == "0"  # A's task, running while B started, was left alone
        assert Counter(t["pexit"] for t in ends.values())["0"] >= 6  # at most B's running tasks failed
        time.sleep(3)  # past a lease: no late write changes any ended task
        assert all(a.store.get_task(int(tid)).status == ends[tid]["status"] for tid in ids)
    finally:
        a.stop()
        b.stop()
        a.store.engine.dispose()
        b.store.engine.dispose()
        drop()
