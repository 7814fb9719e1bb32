"""Issue 14, the server's own cost: every mechanism that makes it cheaper keeps doing its job.

Queue positions from sequence numbers, all-or-nothing batched transitions, previews in their own
table, migration 0006 on existing data, the cross-process SQLite write lock, the project cache,
adapters not re-set when unchanged, evict-before-load, parallel PNG encoding, the torch thread
policy, scheduler reuse, and ``easel serve --api-processes``. No timing is asserted: speed is
measured by ``bench/bench_server.py`` (``docs/benchmarks.md``)."""
from __future__ import annotations

import base64
import io
import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import SMALL, TIME_SCALE, TOOL, free_port
from easel.config import Settings
from easel.storage import output_key
from easel.store import LimitReached, Store, new_token
from easel.tasks import lifecycle as lc

OTHERS = tuple(s for s in lc.TRANSITIONS if s != lc.QUEUE)


def _submit(store, project_id: int, n: int) -> list[int]:
    return [lc.submit(store, project_id=project_id, tool=TOOL, parameters={}, inputs={}, callbackurl="",
                      cost_per_second=0)[0].id for _ in range(n)]


def _true_positions(store, ids: list[int]) -> dict[int, int]:
    queued = [t for t in ids if store.get_task(t).status == lc.QUEUE]
    return {t: i + 1 for i, t in enumerate(queued)}


# -- queue positions -------------------------------------------------------------------------------

def test_queue_positions_stay_exact_after_cancels_claims_and_requeues(store):
    p = store.create_project("p")
    ids = _submit(store, p.id, 120)
    rng = random.Random(7)
    for tid in rng.sample(ids, 25):
        lc.cancel(store, tid)  # out of order, anywhere in the queue
    claimed = [lc.claim(store, "w1") for _ in range(10)]
    assert claimed == sorted(claimed)  # claims follow the submission order
    task = store.get_task(claimed[3])
    assert lc.requeue(store, task)  # back in the queue, at its old place: now the head
    tasks = [store.get_task(t) for t in ids]
    truth = _true_positions(store, ids)
    assert lc.queue_positions(store, tasks) == truth
    assert truth[claimed[3]] == 1
    # the other way of counting, used when many tasks left the queue out of order, agrees
    seqs = {t.queue_seq: t.id for t in tasks if t.status == lc.QUEUE}
    fallback = store.queue_positions(lc.QUEUE, OTHERS, list(seqs), cap=1)
    assert {seqs[s]: pos for s, pos in fallback.items()} == truth
    # one task alone, by either way
    last = max(seqs)
    for cap in (1, 2000):
        assert store.queue_positions(lc.QUEUE, OTHERS, [last], cap=cap) == {last: truth[seqs[last]]}
    # tasks no longer queued have no position
    gone = store.get_task(claimed[0])
    assert lc.queue_positions(store, [gone]) == {}


def test_task_list_and_detail_agree_on_positions_total_and_outputs(tmp_path):
    from easel.api.routes.task import list_tasks
    from easel.api.services import Services
    from easel.api.views import task_view

    api = Services.build(Settings(data_dir=tmp_path), None)
    api.store.migrate()
    project = api.store.create_project("p", "apikey")
    other = api.store.create_project("q", "apikey")
    mine = _submit(api.store, project.id, 30)
    _submit(api.store, other.id, 5)  # another project's tasks are ahead in the queue too
    mine += _submit(api.store, project.id, 10)
    for tid in mine[3:9]:
        lc.cancel(api.store, tid)
    done = lc.claim(api.store, "w")
    api.store.add_outputs(done, [{"name": "0.png", "contenttype": "image/png", "size": 3, "path": "x/0.png"}])
    listed = list_tasks(api, project, {"limit": "50"})
    assert listed["total"] == "40" and len(listed["tasklist"]) == 40
    assert list_tasks(api, project, {"status": lc.CANCEL})["total"] == "6"
    for item in listed["tasklist"]:
        detail = task_view(api, api.store.get_task(int(item["id"])))
        assert item["queueposition"] == detail["queueposition"]
        assert [o["name"] for o in item["outputs"]] == [o["name"] for o in detail["outputs"]]
    everyone = [t.id for t in sorted((api.store.get_task(i) for i in range(1, 46)), key=lambda t: t.queue_seq)]
    truth = _true_positions(api.store, everyone)
    assert {int(i["id"]): int(i["queueposition"]) for i in listed["tasklist"] if i["queueposition"]} == \
        {t: pos for t, pos in truth.items() if t in mine}
    assert [o["name"] for o in next(i for i in listed["tasklist"] if int(i["id"]) == done)["outputs"]] == ["0.png"]


# -- the store's writes ------------------------------------------------------------------------------

def test_batched_transitions_are_all_or_nothing(store):
    p = store.create_project("p")
    (tid,) = _submit(store, p.id, 1)
    assert lc.claim(store, "w1") == tid
    before = [e.type for e in store.events(tid)]
    # the second step is illegal after the first (task_start needs task_assign): nothing is written
    assert not lc.advance_through(store, tid, [lc.Stage(lc.PREPROCESS_START), lc.Stage(lc.START)], owner="w1")
    assert [e.type for e in store.events(tid)] == before and store.get_task(tid).status == lc.ACCEPT
    # a legal chain is written whole, in order, one event each
    assert lc.advance_through(store, tid, [lc.Stage(lc.PREPROCESS_START), lc.Stage(lc.PREPROCESS_END),
                                           lc.Stage(lc.ASSIGN)], owner="w1", lease_seconds=30)
    task = store.get_task(tid)
    assert task.status == lc.ASSIGN and task.preprocessstarttime and task.assigntime and task.lease_expires_at
    assert [e.type for e in store.events(tid)][-3:] == [lc.PREPROCESS_START, lc.PREPROCESS_END, lc.ASSIGN]
    assert [e.seq for e in store.events(tid)] == list(range(1, 6))
    # another worker's chain is refused
    assert not lc.advance_through(store, tid, [lc.Stage(lc.START), lc.Stage(lc.OUTPUT)], owner="w2")


def test_previews_are_stored_apart_and_deleted_with_the_step_events(store):
    p = store.create_project("p")
    (tid,) = _submit(store, p.id, 1)
    assert lc.claim(store, "w1") == tid
    for status in (lc.PREPROCESS_START, lc.PREPROCESS_END, lc.ASSIGN, lc.START):
        assert lc.advance(store, tid, status, owner="w1")
    jpeg = b"\xff\xd8\xff\xe0 not really a jpeg"
    assert lc.progress(store, tid, "{}", {}, owner="w1") is False
    assert lc.progress(store, tid, "{}", {}, owner="w1", preview=jpeg) is False
    plain = store.events(tid)
    assert all(e.preview is None for e in plain)  # the images are not read unless asked for
    shown = [e for e in store.events(tid, previews=True) if e.preview]
    assert len(shown) == 1 and base64.b64decode(shown[0].preview) == jpeg and shown[0].type == lc.OUTPUT
    assert [(x.seq, x.data) for x in store.previews(tid)] == [(shown[0].seq, jpeg)]
    assert lc.advance(store, tid, lc.POSTPROCESS_END, owner="w1", pexit="0")
    assert store.thin_events(lc.TERMINAL, time.time() + 1, (lc.OUTPUT, lc.ERROR)) == 2
    assert store.previews(tid) == [] and lc.OUTPUT not in [e.type for e in store.events(tid)]


def test_migration_0006_numbers_existing_tasks_and_moves_their_previews(tmp_path):
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    import easel.store as st

    url = Settings(data_dir=tmp_path).core.database_url
    store = Store(url)
    cfg = Config(str(st.HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(st.HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005_files")
        conn.execute(text("INSERT INTO projects (id, name, apikey, apisecret, auth_mode, nonce_policy, created_at) "
                          "VALUES (1, 'p', 'sha256:x', 's', 'apikey', 'lenient', 0)"))
        for i, status in ((3, "task_queue"), (5, "task_postprocess_end"), (9, "task_queue")):
            conn.execute(text(
                "INSERT INTO tasks (id, uuid, project_id, tool, socketaccesstoken, file_accesskey, status, parameters, "
                "inputs, callbackurl, debugoutput, debugerror, progress, cost_per_second, kill_requested, worker_id, "
                "createtime, event_seq) VALUES (:i, :u, 1, 't', :s, :f, :st, '{}', '{}', '', '', '', '', 0, 0, '', 0, 1)"),
                {"i": i, "u": f"u{i}", "s": f"s{i}", "f": f"f{i}", "st": status})
        shot = base64.b64encode(b"jpeg bytes").decode()
        conn.execute(text("INSERT INTO events (task_id, type, message, created_at, seq, preview) VALUES "
                          "(5, 'task_output', '{}', 0, 2, :p), (5, 'task_output', '{}', 0, 3, NULL), "
                          "(5, 'task_output', '{}', 0, 4, 'not base64!')"), {"p": shot})
    store.migrate()
    rows = {t.id: t.queue_seq for t in (store.get_task(i) for i in (3, 5, 9))}
    assert rows == {3: 1, 5: 2, 9: 3}  # submission order, no gaps
    assert store.count_tasks(1) == 3
    assert [(x.task_id, x.seq, x.data) for x in store.previews(5)] == [(5, 2, b"jpeg bytes")]
    assert lc.queue_positions(store, [store.get_task(9)]) == {9: 2}
    new, _ = lc.submit(store, project_id=1, tool="t", parameters={}, inputs={}, callbackurl="", cost_per_second=0)
    assert new.queue_seq == 4 and store.count_tasks(1) == 4
    assert lc.queue_positions(store, [store.get_task(new.id)]) == {new.id: 3}


def _hold_lock(db: str, hold: float, log: str, ready) -> None:
    s = Store(f"sqlite:///{db}")
    with s._write_lock:
        with open(log, "a") as fh:
            fh.write("child-in\n")
        ready.set()
        time.sleep(hold)
        with open(log, "a") as fh:
            fh.write("child-out\n")


def test_sqlite_writers_of_two_processes_take_turns(store, tmp_path):
    db = store.url.split("///", 1)[1]
    log = tmp_path / "order.log"
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_lock, args=(db, 1.0, str(log), ready))
    child.start()
    try:
        assert ready.wait(60 * TIME_SCALE)
        with store._write_lock:  # waits for the child's turn to end
            with log.open("a") as fh:
                fh.write("parent-in\n")
        assert log.read_text().split() == ["child-in", "child-out", "parent-in"]
    finally:
        child.join(30)
    # re-entrant in a thread, and one lock per database file for every store of the process
    other = Store(store.url)
    assert other._write_lock is store._write_lock
    with store._write_lock, other._write_lock:
        p = other.create_project("nested")  # a write through the second store inside the first's turn
    assert store.project_by_key(p.apikey).name == "nested"


def _submit_together(store, calls: list[dict]) -> list:
    """Run ``calls`` (``lc.submit`` keywords) in threads while this thread holds the write turn, so
    that all of them queue up behind one leader; returns each call's task, or the exception."""
    from sqlalchemy import event as sa_event

    commits: list[int] = []
    sa_event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    results: list = [None] * len(calls)

    def one(i: int) -> None:
        try:
            results[i] = lc.submit(store, tool=TOOL, parameters={"i": i}, inputs={}, callbackurl="",
                                   cost_per_second=0, **calls[i])
        except Exception as exc:  # noqa: BLE001 - compared by the test
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    with store._write_lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30 * TIME_SCALE
        while len(store._group.queue) < len(calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(store._group.queue) == len(calls)  # the leader waits for the turn, the others for it
    for t in threads:
        t.join(30 * TIME_SCALE)
    return results, len(commits)


def test_concurrent_runs_are_committed_together_with_each_answer_as_if_alone(store):
    p, q = store.create_project("p"), store.create_project("q")
    calls = ([{"project_id": p.id}] * 10 + [{"project_id": p.id, "idempotency_key": "dup"}] * 3
             + [{"project_id": q.id, "max_unfinished": 2}] * 4 + [{"project_id": q.id, "max_unfinished": 2,
                                                                    "idempotency_key": "again"}] * 2)
    results, commits = _submit_together(store, calls)
    assert commits == 1  # nineteen Runs, one transaction
    assert not store._group.leading and not store._group.queue
    plain = [r for r, c in zip(results, calls) if c == {"project_id": p.id}]
    assert all(created for _task, created in plain)
    dup = [r for r, c in zip(results, calls) if c.get("idempotency_key") == "dup"]
    assert sorted(created for _t, created in dup) == [False, False, True]
    assert len({t.id for t, _c in dup}) == 1  # the retries get the first call's task
    limited = [r for r, c in zip(results, calls) if c["project_id"] == q.id]
    refused = [r for r in limited if isinstance(r, LimitReached)]
    admitted = [r for r in limited if not isinstance(r, Exception) and r[1]]
    retried = [r for r in limited if not isinstance(r, Exception) and not r[1]]
    assert len(admitted) == 2 and len(refused) + len(retried) == 4  # limit 2, whatever the arrival order
    assert all(t.id in {a[0].id for a in admitted} for t, _c in retried)  # an admitted "again", answered again
    assert store.count_in((lc.QUEUE, *lc.RUNNING), project_id=q.id) == 2
    # what each call got is what the database holds: ids, sequence numbers, tokens, the first event
    created = [r[0] for r in results if not isinstance(r, Exception) and r[1]]
    assert len(created) == 10 + 1 + 2 and all(not isinstance(r, Exception) for r in results[:13])
    for task in created:
        row = store.get_task(task.id)
        assert (row.uuid, row.queue_seq, row.socketaccesstoken, json.loads(row.parameters)) == \
            (task.uuid, task.queue_seq, task.socketaccesstoken, json.loads(task.parameters))
        assert [e.type for e in store.events(task.id)] == [lc.QUEUE]
    seqs = [t.queue_seq for t in sorted(created, key=lambda t: t.id)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # the queue keeps the insertion order
    assert lc.queue_positions(store, sorted(created, key=lambda t: t.id)) == \
        {t.id: i + 1 for i, t in enumerate(sorted(created, key=lambda t: t.id))}
    assert store.count_tasks(p.id) == 11 and store.count_tasks(q.id) == 2
    # a lone Run afterwards is its own group
    _submit(store, p.id, 1)
    assert store.count_tasks(p.id) == 12


def test_a_failed_group_fails_each_of_its_runs_and_the_next_run_leads_again(store, monkeypatch):
    from sqlalchemy.exc import OperationalError

    p = store.create_project("p")
    real = store.submission._insert_group

    def broken(conn, group):
        real(conn, group)  # every call got a result, then the commit's database fails
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(store.submission, "_insert_group", broken)
    results, _commits = _submit_together(store, [{"project_id": p.id}] * 5)
    assert all(isinstance(r, OperationalError) for r in results), results
    assert store.count_tasks(p.id) == 0 and store.tasks_of(p.id) == []  # rolled back, nothing half-stored
    monkeypatch.setattr(store.submission, "_insert_group", real)
    assert len(_submit(store, p.id, 3)) == 3 and store.count_tasks(p.id) == 3


def test_a_claim_enters_preprocess_in_its_transaction_and_outputs_land_with_the_last_stage(store):
    p = store.create_project("p")
    tid = _submit(store, p.id, 1)[0]
    assert lc.claim(store, "w1", 60, preprocess=True) == tid
    assert [e.type for e in store.events(tid)] == [lc.QUEUE, lc.ACCEPT, lc.PREPROCESS_START]
    task = store.get_task(tid)
    assert task.status == lc.PREPROCESS_START and task.worker_id == "w1" and task.accepttime
    walk = [lc.Stage(lc.PREPROCESS_END), lc.Stage(lc.ASSIGN), lc.Stage(lc.START), lc.Stage(lc.OUTPUT_FULL),
            lc.Stage(lc.ERROR_FULL), lc.Stage(lc.END), lc.Stage(lc.POSTPROCESS_START)]
    assert lc.advance_through(store, tid, walk, owner="w1")
    out = [{"name": "0.png", "contenttype": "image/png", "size": 3, "path": f"{task.uuid}/0.png"}]
    end = [lc.Stage(lc.POSTPROCESS_END, values={"pexit": "0"})]
    assert not lc.advance_through(store, tid, end, owner="w2", outputs=out)  # not its task: nothing stored
    assert store.outputs(tid) == [] and store.get_task(tid).status == lc.POSTPROCESS_START
    assert lc.advance_through(store, tid, end, owner="w1", outputs=out)
    done = store.get_task(tid)
    assert (done.status, done.pexit) == (lc.POSTPROCESS_END, "0")
    assert [o.name for o in store.outputs(tid)] == ["0.png"]


def test_tokens_are_alphanumeric_and_random():
    tokens = {new_token() for _ in range(2000)}
    assert len(tokens) == 2000
    assert all(len(t) == 30 and t.isascii() and t.isalnum() for t in tokens)
    assert set("".join(tokens)) == set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    assert len(new_token(64)) == 64


# -- authentication ------------------------------------------------------------------------------------

def test_project_cache_rereads_after_its_ttl_and_never_caches_unknown_keys(store, monkeypatch):
    from easel.api import auth
    from easel.clock import ManualClock
    from easel.signing import signature

    clock = ManualClock()
    cache = auth.ProjectCache(store, ttl=0.2, clock=clock)
    assert cache.get("no-such-key") is None
    made = store.create_project("p", nonce_policy="lenient")
    assert cache.get(made.apikey).nonce_policy == "lenient"  # created a moment ago: found at once
    settings = Settings()
    headers = {"x-api-key": made.apikey, "x-nonce": "1", "x-signature": signature(made.apikey, made.apisecret, "1")}
    assert auth.authenticate_without_io(headers, settings, cache).id == made.id
    store.set_nonce_policy(made.apikey, "strict")
    reads = []
    monkeypatch.setattr(store, "project_by_key", lambda key, real=store.project_by_key: reads.append(key) or real(key))
    assert cache.get(made.apikey).nonce_policy == "lenient" and reads == []  # within the TTL: the cached row
    clock.advance(0.19)
    assert cache.get(made.apikey).nonce_policy == "lenient" and reads == []  # still within it
    clock.advance(0.02)
    assert cache.get(made.apikey).nonce_policy == "strict" and len(reads) == 1
    # a strict project needs the nonce store: never authenticated without I/O
    assert auth.authenticate_without_io(headers, settings, cache) is None
    # a lenient one is checked all the same: a wrong signature is refused
    other = store.create_project("q")
    cache.get(other.apikey)
    with pytest.raises(auth.WiroError):
        auth.authenticate_without_io({**headers, "x-api-key": other.apikey}, settings, cache)


# -- models: adapters and the cache ----------------------------------------------------------------------

def test_adapters_are_set_only_when_the_request_changes_them(tmp_path, tiny):
    from easel.catalog import ModelCatalog
    from easel.weights import ModelManager
    from easel.weights.sources import Weights
    from easel.tools.sd_lora import load_pipeline

    manager = ModelManager(Settings(data_dir=tmp_path), ModelCatalog.load())
    pipe = manager.pipeline("base", lambda: load_pipeline(Weights("diffusers", tiny["sd15"])))
    calls = []
    real = pipe.set_adapters
    pipe.set_adapters = lambda names, adapter_weights=None: (calls.append((tuple(names), tuple(adapter_weights))),
                                                             real(names, adapter_weights=adapter_weights))[1]
    state = manager.adapters(pipe)
    a, b = ("a", str(tiny["sd15-lora-kohya"]), 1.0), ("b", str(tiny["sd15-lora-peft"]), 0.5)

    def active():
        return set(pipe.get_active_adapters())

    state.apply(pipe, [a])
    state.apply(pipe, [a])  # unchanged: no call
    assert len(calls) == 1 and state.last_action == "adapters unchanged"
    state.apply(pipe, [("a", a[1], 0.25)])  # another scale: set
    assert len(calls) == 2 and calls[-1][1] == (0.25,)
    state.apply(pipe, [a, b])  # another set, with a new file: set
    assert len(calls) == 3 and len(calls[-1][0]) == 2 and len(active()) == 2
    state.apply(pipe, [a, b])
    assert len(calls) == 3
    state.apply(pipe, [])  # none: LoRA off, nothing set
    assert len(calls) == 3 and state.last_action == "LoRA disabled"
    state.apply(pipe, [])
    assert state.last_action == "adapters unchanged"
    state.apply(pipe, [b])  # on again, one adapter
    assert len(calls) == 4 and calls[-1][1] == (0.5,) and len(active()) == 1
    assert state.adapter_sets == 4


class _Model:
    """A stand-in for a pipeline: its "weights" are one tensor of ``mib`` MiB."""

    def __init__(self, mib: int, log: list, name: str):
        import torch

        self.weight = torch.nn.Linear(1, 1)
        self.weight.weight = torch.nn.Parameter(torch.zeros(mib * 2**18))  # float32: 4 bytes each
        self.components = {"net": self.weight}
        log.append(("load", name))


def test_the_cache_evicts_before_it_loads_and_releases_memory(monkeypatch):
    from easel.weights import cache as cache_mod

    released = []
    monkeypatch.setattr(cache_mod, "release_device_memory", lambda compiled: released.append(compiled))
    log: list = []
    cache = cache_mod.PipelineCache(budget_bytes=10 * 2**20)

    def loader(name: str, mib: int):
        def load():
            log.append(("resident at load", tuple(cache.keys())))
            return _Model(mib, log, name)
        return load

    cache.get("a", loader("a", 4), expected_bytes=4 * 2**20)
    cache.get("b", loader("b", 4), expected_bytes=4 * 2**20)
    cache.get("a", loader("a", 4))  # a hit: a becomes the most recently used
    # c is expected at 4 MiB: b (least recently used) goes before c is loaded, a stays
    cache.get("c", loader("c", 4), expected_bytes=4 * 2**20)
    assert ("resident at load", ("a",)) in log and cache.evictions == ["b"] and cache.keys() == ["a", "c"]
    # d's estimate is low (1 MiB): it is loaded next to both, then the cache trims after the load
    cache.get("d", loader("d", 8), expected_bytes=2**20)
    assert cache.evictions == ["b", "a", "c"] and cache.keys() == ["d"]
    # b comes back: its measured size (4 MiB) is known now, so d goes first although no estimate is given
    cache.get("b", loader("b", 4))
    assert log[-2] == ("resident at load", ()) and cache.evictions[-1] == "d"
    assert released and released == [False] * len(released)
    assert cache.loads == {"a": 1, "b": 2, "c": 1, "d": 1}


def test_evicting_a_compiled_entry_drops_compile_state(monkeypatch):
    from easel.weights import cache as cache_mod

    released = []
    monkeypatch.setattr(cache_mod, "release_device_memory", lambda compiled: released.append(compiled))
    cache = cache_mod.PipelineCache(budget_bytes=5 * 2**20)
    log: list = []
    compiled = _Model(4, log, "x")
    compiled.components["net"]._compiled_call_impl = lambda *a: None  # what nn.Module.compile() sets
    cache.get("x", lambda: compiled)
    cache.get("y", lambda: _Model(4, log, "y"), expected_bytes=4 * 2**20)
    assert released == [True]


def test_the_cache_evicts_until_the_device_has_room_for_the_new_weights_and_the_headroom(monkeypatch):
    """A GPU of 20 MiB where another process (a second worker) holds 6 MiB: the byte budget (100
    MiB) would keep everything, the device's free memory decides. The probe is the accounting of
    this test's device (the resident models' bytes + the other process's); on CUDA it is
    ``torch.cuda.mem_get_info`` (``device_free_bytes``, the ``gpu`` tests)."""
    from easel.weights import cache as cache_mod

    monkeypatch.setattr(cache_mod, "release_device_memory", lambda compiled: None)
    mib, other = 2**20, [6 * 2**20]
    cache = cache_mod.PipelineCache(budget_bytes=100 * mib, headroom_bytes=3 * mib,
                                    free_bytes=lambda: 20 * mib - other[0] - cache.used_bytes)
    log: list = []
    cache.get("a", lambda: _Model(4, log, "a"), expected_bytes=4 * mib)
    cache.get("b", lambda: _Model(4, log, "b"), expected_bytes=4 * mib)  # 6 + 8 used: 6 MiB free
    assert cache.keys() == ["a", "b"] and cache.evictions == []
    # c needs 4 + 3 MiB of headroom: a goes before c loads (10 MiB free then)
    cache.get("c", lambda: _Model(4, log, "c"), expected_bytes=4 * mib)
    assert cache.evictions == ["a"] and cache.keys() == ["b", "c"]
    other[0] = 12 * 2**20  # the other worker loaded more: 20 - 12 - 8 = 0 MiB free
    cache.get("b", lambda: _Model(4, log, "b"))  # a hit evicts nothing: no load, no new memory
    assert cache.keys() == ["c", "b"]
    cache.get("d", lambda: _Model(2, log, "d"), expected_bytes=2 * mib)  # needs 5: c and b go
    assert cache.evictions == ["a", "c", "b"] and cache.keys() == ["d"]
    # without a device (the probe answers None) only the byte budget counts
    cpu = cache_mod.PipelineCache(budget_bytes=100 * mib, headroom_bytes=3 * mib, free_bytes=lambda: None)
    for name in "xyz":
        cpu.get(name, lambda: _Model(4, log, name), expected_bytes=4 * mib)
    assert cpu.evictions == []


def test_releasing_memory_without_cuda_is_harmless_and_trims_the_heap(monkeypatch):
    from easel.weights import cache as cache_mod

    trims = []
    monkeypatch.setattr(cache_mod, "release_free_heap", lambda: trims.append(True) or True)
    cache_mod.release_device_memory(False)
    cache_mod.release_device_memory(True)  # resets torch.compile's caches; no CUDA call without CUDA
    assert trims == [True, True]  # the evicted pipeline's CPU memory goes back (easel.malloc)


# -- PNG encoding, threads, schedulers ------------------------------------------------------------------

def test_pngs_are_encoded_in_parallel_in_order_and_errors_surface(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from easel.tools.base import save_pngs, write_pngs

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)) for _ in range(5)]
    paths = write_pngs(images, tmp_path, 10, lambda seed: f"seed {seed}", {"tool": "t"})
    assert [p.name for p in paths] == [f"{i}.png" for i in range(5)]
    for i, (path, image) in enumerate(zip(paths, images)):
        read = Image.open(path)
        assert read.format == "PNG" and read.tobytes() == image.tobytes()
        assert read.text["parameters"] == f"seed {10 + i}" and json.loads(read.text["easel"])["seed"] == 10 + i
    real = Image.Image.save
    done = []

    def flaky(self, fp, *a, **k):
        if str(fp).endswith("2.png"):
            raise OSError(28, "No space left on device")
        real(self, fp, *a, **k)
        done.append(Path(fp).name)

    monkeypatch.setattr(Image.Image, "save", flaky)
    with pytest.raises(OSError):
        save_pngs([(im, tmp_path / f"x{i}.png", None) for i, im in enumerate(images)])
    assert sorted(done) == ["x0.png", "x1.png", "x3.png", "x4.png"]  # every other job finished first


def test_worker_torch_threads_leave_the_api_a_core():
    from easel.tasks.threads import torch_thread_count

    auto = Settings()
    assert torch_thread_count(auto.worker, shares_cpu_with_api=True, cuda=False, cores=2) == 1
    assert torch_thread_count(auto.worker, shares_cpu_with_api=True, cuda=False, cores=16) == 15
    assert torch_thread_count(auto.with_(workers=4).worker, shares_cpu_with_api=True, cuda=False, cores=16) == 3
    assert torch_thread_count(auto.with_(workers=4).worker, shares_cpu_with_api=True, cuda=False, cores=2) == 1
    assert torch_thread_count(auto.worker, shares_cpu_with_api=True, cuda=True, cores=16) is None
    assert torch_thread_count(auto.worker, shares_cpu_with_api=False, cuda=False, cores=16) is None
    assert torch_thread_count(auto.with_(torch_threads=6).worker, shares_cpu_with_api=True, cuda=True, cores=2) == 6
    with pytest.raises(ValueError):
        Settings(torch_threads=-1)


def test_a_scheduler_is_reused_until_another_class_is_asked_for(tmp_path, tiny):
    from easel.catalog import load_tools
    from easel.tasks.runner import Worker

    s = Settings(data_dir=tmp_path / "data")
    s.core.models_dir.mkdir(parents=True)
    (s.core.models_dir / "tiny").symlink_to(next(iter(tiny.values())).parent)
    worker = Worker(s, "w-test")
    worker.store.migrate()
    p = worker.store.create_project("p")
    spec = load_tools()[TOOL]
    seen = []
    pixels = []
    for scheduler in ("EulerDiscreteScheduler", "EulerDiscreteScheduler", "DDIMScheduler", "EulerDiscreteScheduler"):
        params = {**SMALL, "scheduler": scheduler}
        task, _ = lc.submit(worker.store, project_id=p.id, tool=TOOL, parameters=params,
                            inputs=spec.validate(params, worker.catalog), callbackurl="", cost_per_second=0)
        assert worker.run_next() == task.id
        done = worker.store.get_task(task.id)
        assert done.pexit == "0", done.debugerror
        pipe = next(worker.models.pipelines.peek(k) for k in worker.models.pipelines.keys() if k.startswith("sd15:"))
        seen.append(pipe.scheduler)
        pixels.append(worker.storage.get_bytes(output_key(worker.store.outputs(task.id)[0].path)))
    assert seen[0] is seen[1] and type(seen[2]).__name__ == "DDIMScheduler"
    assert type(seen[3]).__name__ == "EulerDiscreteScheduler" and seen[3] is not seen[0]
    from PIL import Image

    decoded = [Image.open(io.BytesIO(b)).tobytes() for b in pixels]
    assert decoded[0] == decoded[1] == decoded[3] != decoded[2]  # a reused scheduler starts each run afresh


# -- easel serve --api-processes ------------------------------------------------------------------------

def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_several_api_processes_share_the_port_the_store_and_the_workers(tmp_path):
    from easel.signing import signature

    data = tmp_path / "srv"
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "easel", "serve", "--port", str(port), "--data-dir", str(data),
                             "--model-source", "tiny", "--api-processes", "2"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120 * TIME_SCALE
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        store = Store(Settings(data_dir=data).core.database_url)
        project = store.create_project("p")
        tree = _descendants(proc.pid)
        assert len(tree) >= 3  # two API processes and a worker (besides multiprocessing's helpers)
        ids = []
        with httpx.Client(timeout=60) as client:  # a new connection each time: the kernel deals them out
            for i in range(8):
                nonce = str(1000 + i)
                headers = {"x-api-key": project.apikey, "x-nonce": nonce,
                           "x-signature": signature(project.apikey, project.apisecret, nonce), "Connection": "close"}
                r = client.post(f"{base}/v1/Run/{TOOL}", json={**SMALL, "seed": str(i)}, headers=headers)
                assert r.status_code == 200 and r.json()["result"], r.text
                ids.append(r.json()["taskid"])
            deadline = time.time() + 120 * TIME_SCALE
            while time.time() < deadline and any(store.get_task(int(t)).status != lc.POSTPROCESS_END for t in ids):
                time.sleep(0.2)
        assert all(store.get_task(int(t)).pexit == "0" for t in ids)  # the parent's worker ran them all
        assert len({store.get_task(int(t)).queue_seq for t in ids}) == 8
    finally:
        tree = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.2)
    assert not [p for p in tree if _alive(p)], "processes of the server outlived it"


# -- the benchmark runs (no numbers asserted) ------------------------------------------------------------

def test_bench_server_list_section_runs():
    out = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "bench" / "bench_server.py"),
                          "--only", "list", "--tasks", "3000"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| list | 3000 tasks, all queued |" in out.stdout and "Task/List" in out.stdout


def test_bench_counts_the_png_encoding_where_the_sd_and_flux_runs_call_it():
    """``bench_server.attribute_cpu`` must wrap ``write_pngs`` (model work) and ``latent_to_jpeg``
    (Easel's) in every module whose globals the SD and FLUX tools' runs call them through: when
    issue 22 moved the FLUX run to ``tools/common.py``, its 1024² PNG went uncounted and showed as
    Easel's own CPU (5.5 → 86 ms per task, docs/benchmarks.md). Run apart: the wrappers stay."""
    script = """
import inspect, sys, types
sys.path.insert(0, sys.argv[1])
import bench_server
from easel.catalog import load_tools
tools = load_tools()
bench_server.attribute_cpu()
seen, missed = set(), []
for name in (bench_server.SD, bench_server.FLUX):
    module = sys.modules[tools[name].module] if tools[name].module in sys.modules else __import__(
        tools[name].module, fromlist=["_"])
    reached = {module} | {sys.modules[v.__module__] for v in vars(module).values()
                          if isinstance(v, types.FunctionType) and v.__module__.startswith("easel.tools.")}
    for m in reached:
        source = inspect.getsource(m)
        for fn in ("write_pngs", "latent_to_jpeg"):
            if fn + "(" in source.replace("def " + fn + "(", ""):
                seen.add((m.__name__, fn))
                if not hasattr(getattr(m, fn), "__wrapped__"):
                    missed.append((m.__name__, fn))
print(sorted(seen), missed)
assert ("easel.tools.common", "write_pngs") in seen and not missed, missed
"""
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent.parent / "bench")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
