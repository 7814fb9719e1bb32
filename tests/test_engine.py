"""The task engine: one guarded writer of task state, leases, the event cursor, supervision and
fault handling (in-process, SQLite; the PostgreSQL variants run when a server is reachable)."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time

import pytest

from easel.clock import ManualClock
from easel.config import Settings
from easel.store import Store
from easel.tasks import lifecycle as lc


def _task(store, callback=""):
    p = store.create_project("p")
    task, _ = lc.submit(store, project_id=p.id, tool="wiro/text-to-image-sd-lora", parameters={}, inputs={},
                        callbackurl=callback, cost_per_second=0)
    return task


def _to_output(store, worker="w1", lease=30.0, clock=None):
    clock = clock or ManualClock()
    tid = _task(store).id
    assert lc.claim(store, worker, lease, clock=clock) == tid
    for status in (lc.PREPROCESS_START, lc.PREPROCESS_END, lc.ASSIGN, lc.START):
        assert lc.advance(store, tid, status, owner=worker, lease_seconds=lease, clock=clock)
    assert lc.progress(store, tid, "{}", {"stepCurrent": "1"}, owner=worker, lease_seconds=lease, clock=clock) is False
    return tid


def test_a_terminal_task_never_changes_again(store, caplog):
    for end in lc.TERMINAL:
        tid = _to_output(store)
        assert lc.advance(store, tid, end, pexit="1")
        caplog.clear()
        with caplog.at_level(logging.WARNING, "easel.lifecycle"):
            for status in (lc.QUEUE, *lc.RUNNING, *lc.TERMINAL):
                assert not lc.advance(store, tid, status), status
            assert lc.progress(store, tid, "{}", {}, owner="w1") is None  # the step write of a late worker
        task = store.get_task(tid)
        assert task.status == end and task.pexit == "1"
        assert "rejected" in caplog.text


def test_the_transition_table_is_the_only_way(store):
    tid = _task(store).id
    assert not lc.advance(store, tid, lc.START)  # queued -> started skips the claim
    assert lc.claim(store, "w1") == tid
    assert not lc.advance(store, tid, lc.POSTPROCESS_START)  # accept -> postprocess skips the run
    assert not lc.advance(store, tid, lc.PREPROCESS_START, owner="w2")  # another worker's write
    assert lc.advance(store, tid, lc.PREPROCESS_START, owner="w1")
    assert all(lc.TRANSITIONS[s] == frozenset() for s in lc.TERMINAL)


def test_a_failed_task_is_not_resurrected_by_its_workers_progress(store):
    """The reported defect: start-up recovery of a second server failed a running task, then
    the worker's next step (task_output, unguarded) brought it back and it ended as a success."""
    tid = _to_output(store)
    task = store.get_task(tid)
    assert lc.fail(store, task, "ended elsewhere")
    assert lc.progress(store, tid, "{}", {"stepCurrent": "2"}, owner="w1") is None
    assert not lc.advance(store, tid, lc.OUTPUT_FULL, owner="w1")
    assert not lc.advance(store, tid, lc.POSTPROCESS_END, owner="w1", pexit="0")
    task = store.get_task(tid)
    assert (task.status, task.pexit) == (lc.POSTPROCESS_END, "1")


def test_recovery_fails_only_tasks_whose_lease_expired(store):
    clock = ManualClock()
    live = _to_output(store, "server-a-worker", lease=60, clock=clock)
    stale = _to_output(store, "dead-worker", lease=10, clock=clock)
    assert lc.recover_interrupted(store, lease_seconds=60, clock=clock) == []  # no lease has expired yet
    clock.advance(11)
    assert lc.recover_interrupted(store, lease_seconds=60, clock=clock) == [stale]
    assert store.get_task(live).status == lc.OUTPUT
    dead = store.get_task(stale)
    assert dead.status == lc.POSTPROCESS_END and dead.pexit == "1" and "stopped renewing its lease" in dead.debugerror
    assert lc.recover_interrupted(store, lease_seconds=60, clock=clock) == []  # ended once


def test_expired_unstarted_task_is_requeued_when_the_policy_says_so(store):
    clock = ManualClock()
    tid = _task(store).id
    lc.claim(store, "w1", lease_seconds=10, clock=clock)
    lc.advance(store, tid, lc.PREPROCESS_START, owner="w1", clock=clock)
    assert lc.expire_leases(store, 60, requeue_unstarted=True, clock=clock) == {}
    clock.advance(11)
    assert lc.expire_leases(store, 60, requeue_unstarted=True, clock=clock) == {tid: "requeued"}
    task = store.get_task(tid)
    assert task.status == lc.QUEUE and task.worker_id == "" and task.accepttime is None
    assert not lc.advance(store, tid, lc.PREPROCESS_END, owner="w1")  # the old worker cannot write any more
    assert lc.claim(store, "w2") == tid


def test_a_task_over_its_time_limit_is_failed_by_any_process(store):
    clock = ManualClock()
    tid = _to_output(store, lease=60, clock=clock)
    assert lc.expire_leases(store, 60, task_timeout=10, clock=clock) == {}
    clock.advance(50)  # within its lease, but past the limit + a lease since it was accepted
    assert lc.expire_leases(store, 60, task_timeout=10, clock=clock) == {}
    assert store.renew_lease(tid, "w1", clock.now() + 60, lc.RUNNING)  # its worker still renews the lease
    clock.advance(21)  # the lease holds; the limit (+ a lease of grace) since it was accepted has passed
    assert lc.expire_leases(store, 60, task_timeout=10, clock=clock) == {tid: "timed out"}
    assert "EASEL_TASK_TIMEOUT_SECONDS" in store.get_task(tid).debugerror


def test_event_sequence_is_dense_and_ordered(store):
    tid = _to_output(store)
    lc.log_event(store, tid, lc.ERROR, "warning", owner="w1")
    events = store.events(tid)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in store.events(tid, after_seq=events[-2].seq)] == [lc.ERROR]


# -- supervision and faults -----------------------------------------------------------------------

def test_supervisor_survives_store_errors_and_health_says_why(tmp_path):
    from easel.executors.local import LocalExecutor

    ex = LocalExecutor(Settings(data_dir=tmp_path), supervise_interval=0.05)
    calls = []

    def broken():
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    ex.supervise_once = broken
    ex._supervisor = threading.Thread(target=ex._supervise, daemon=True)
    ex._supervisor.start()
    deadline = time.time() + 10
    while len(calls) < 3 and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert len(calls) >= 3 and ex._supervisor.is_alive()
        ok, why = ex.health()
        assert not ok and "no worker process is running" in why
    finally:
        ex._done.set()
        ex._supervisor.join(5)
    ok, why = ex.health()
    assert not ok and "supervisor is not running" in why


class _FakeProc:
    def __init__(self, exitcode):
        self.exitcode = exitcode
        self.pid = None  # multiprocessing.Process has one; the supervisor reports it to the metrics

    def is_alive(self):
        return False


def test_a_worker_that_keeps_dying_is_restarted_with_backoff(tmp_path, store):
    from easel.executors.local import LocalExecutor
    from easel.supervise import Child

    ex = LocalExecutor(Settings(data_dir=tmp_path))
    ex._store = store
    spawned = []
    ex.workers.spawn = lambda slot: spawned.append(slot) or Child(_FakeProc(1), "dead-1")
    tid = _to_output(store, worker="dead-1")
    ex.workers.children = [Child(_FakeProc(1), "dead-1")]
    delays = []
    for _ in range(4):
        ex.supervise_once()
        delays.append(ex.workers._restart_at[0] - time.monotonic())
        ex.workers._restart_at[0] = 0.0
        ex.supervise_once()  # the restart after the backoff
    assert delays == sorted(delays) and delays[-1] > delays[0] >= 0.5 and spawned == [0] * 4
    task = store.get_task(tid)
    assert task.status == lc.POSTPROCESS_END and "exit code 1" in task.debugerror


def test_storage_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import shutil

    from easel.storage import LocalStorage

    storage = LocalStorage(Settings(data_dir=tmp_path))
    src = tmp_path / "0.png"
    src.write_bytes(b"x" * 1000)

    def exdev(*_a):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full(a, b):
        with open(b, "wb") as fh:
            fh.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", str(b))

    monkeypatch.setattr("easel.storage.os.replace", exdev)
    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(OSError):
        storage.save("u1", src)
    assert [p for p in (tmp_path / "files").rglob("*") if p.is_file()] == []


# -- a real worker in this process (tiny SD model) -------------------------------------------------

def _worker(tmp_path, tiny, **settings):
    from easel.tasks.runner import Worker

    s = Settings(data_dir=tmp_path / "data", **settings)
    (s.core.models_dir).mkdir(parents=True, exist_ok=True)
    (s.core.models_dir / "tiny").symlink_to(next(iter(tiny.values())).parent)  # reuse the session's tiny models
    worker = Worker(s, "w-test")
    worker.store.migrate()
    return worker


def _submit(worker, **inputs):
    from conftest import SMALL, TOOL
    from easel.catalog import load_tools

    spec = load_tools()[TOOL]
    p = worker.store.create_project("p")
    params = {**SMALL, **inputs}
    task, _ = lc.submit(worker.store, project_id=p.id, tool=TOOL, parameters=params,
                        inputs=spec.validate(params, worker.catalog), callbackurl="", cost_per_second=0)
    return task.id


def test_disk_full_while_writing_outputs_fails_cleanly(tmp_path, tiny, monkeypatch):
    """ENOSPC while the tool writes its PNG: the task fails with the cause, its message shows no
    server path, and no partial file is left anywhere under the data directory."""
    from PIL import Image

    worker = _worker(tmp_path, tiny)
    tid = _submit(worker, samples=2)
    real_save = Image.Image.save

    def full_disk(self, fp, *a, **k):
        real_save(self, fp, *a, **k)
        if not isinstance(fp, (str, os.PathLike)):
            return  # a preview into memory
        with open(fp, "r+b") as fh:  # half written, then the disk is full
            fh.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert worker.run_next() == tid
    task = worker.store.get_task(tid)
    assert (task.status, task.pexit) == (lc.POSTPROCESS_END, "1")
    assert "No space left on device" in task.debugerror and str(tmp_path) not in task.debugerror
    leftovers = [p for p in worker.settings.core.data_dir.rglob("*.png")]
    assert leftovers == [] and worker.store.outputs(tid) == []
    monkeypatch.setattr(Image.Image, "save", real_save)
    second = _submit(worker)
    assert worker.run_next() == second and worker.store.outputs(second)  # the worker is fine afterwards


def test_the_worker_gives_back_free_heap_after_each_task(tmp_path, tiny, monkeypatch):
    """Once a task has ended (its client already has the result), the worker gives back the free
    heap beyond what it keeps between tasks (``easel.malloc.release_free_heap_beyond``)."""
    from easel.tasks import runner

    worker = _worker(tmp_path, tiny)
    seen = []
    monkeypatch.setattr(runner, "release_free_heap_beyond", lambda: seen.append(worker.store.get_task(tid).status))
    tid = _submit(worker)
    assert worker.run_next() == tid
    assert seen == [lc.POSTPROCESS_END]


def test_a_task_over_its_time_limit_ends_failed_with_the_reason(tmp_path, tiny):
    worker = _worker(tmp_path, tiny, task_timeout_seconds=0.5)
    tid = _submit(worker, steps=150, width=256, height=256, samples=2)
    began = time.monotonic()
    worker.run_next()
    task = worker.store.get_task(tid)
    assert (task.status, task.pexit) == (lc.POSTPROCESS_END, "1") and "EASEL_TASK_TIMEOUT_SECONDS" in task.debugerror
    assert time.monotonic() - began < 60


def test_the_heartbeat_keeps_the_lease_during_a_long_phase(tmp_path, tiny, monkeypatch):
    """A phase without steps (a download, a model load) longer than the lease: the heartbeat
    renews it, so no other process ends the task meanwhile."""
    from easel.tools import sd_lora

    worker = _worker(tmp_path, tiny, lease_seconds=0.6)
    tid = _submit(worker)
    real_prepare = sd_lora.prepare
    seen = {}

    def slow_prepare(inputs, ctx):
        time.sleep(2.0)  # > 3 leases
        seen["expired"] = lc.expire_leases(worker.store, 0.6)
        return real_prepare(inputs, ctx)

    monkeypatch.setattr(sd_lora, "prepare", slow_prepare)
    worker.run_next()
    assert seen["expired"] == {}
    assert worker.store.get_task(tid).pexit == "0"


# -- retention ------------------------------------------------------------------------------------

def test_retention_sweeper_removes_expired_outputs_and_orphans(tmp_path):
    from easel.api.services import Services
    from easel.api.views import task_view

    settings = Settings(data_dir=tmp_path / "d", output_retention_seconds=60, orphan_retention_seconds=60,
                        event_retention_seconds=90)
    api = Services.build(settings, None)
    api.store.migrate()
    store = api.store
    tid = _to_output(store)
    task = store.get_task(tid)
    for status in (lc.OUTPUT_FULL, lc.ERROR_FULL, lc.END, lc.POSTPROCESS_START):
        lc.advance(store, tid, status, owner="w1")
    (settings.core.files_dir / task.uuid).mkdir(parents=True)
    (settings.core.files_dir / task.uuid / "0.png").write_bytes(b"png")
    store.add_outputs(tid, [{"name": "0.png", "contenttype": "image/png", "size": 3, "path": f"{task.uuid}/0.png"}])
    (settings.core.uploads_dir / task.uuid).mkdir(parents=True)
    lc.advance(store, tid, lc.POSTPROCESS_END, owner="w1", pexit="0")
    ended = store.get_task(tid).postprocessendtime
    assert task_view(api, store.get_task(tid))["outputs"][0]["expiretime"] == str(int(ended + 60))
    orphan = settings.core.uploads_dir / "no-such-task"
    orphan.mkdir()
    scratch = settings.core.data_dir / "easel-00000000-0000-0000-0000-000000000000-x"
    scratch.mkdir()
    fetched = settings.core.models_dir / "fetched" / ("a" * 64 + ".safetensors")
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(b"w")
    old = time.time() - 3600
    for p in (orphan, scratch, fetched):
        os.utime(p, (old, old))

    steps = [e.type for e in store.events(tid)]
    assert lc.OUTPUT in steps
    assert api.maintenance.sweep(now=ended + 30) == {"tasks": 0, "orphans": 2, "fetched": 1, "events": 0}
    assert (settings.core.files_dir / task.uuid / "0.png").exists()  # not expired yet
    assert api.maintenance.sweep(now=ended + 61)["tasks"] == 1
    assert not (settings.core.files_dir / task.uuid).exists() and not (settings.core.uploads_dir / task.uuid).exists()
    assert store.outputs(tid) == [] and store.get_task(tid).status == lc.POSTPROCESS_END  # the record stays
    assert not orphan.exists() and not scratch.exists() and not fetched.exists()
    assert api.maintenance.sweep(now=ended + 62)["tasks"] == 0  # once
    assert api.maintenance.sweep(now=ended + 91)["events"] == steps.count(lc.OUTPUT) + steps.count(lc.ERROR)
    kept = [e.type for e in store.events(tid)]  # the lifecycle stays for a late WebSocket client
    assert kept == [t for t in steps if t not in (lc.OUTPUT, lc.ERROR)] and kept[-1] == lc.POSTPROCESS_END


def test_a_stop_during_a_long_phase_fails_the_task_and_exits(tmp_path, tiny, monkeypatch):
    """SIGTERM (or the server's death) while a worker downloads or loads a model: no step comes to
    notice it, so the heartbeat fails the task within a few seconds and ends the process (it used
    to stay in task_assign until the next start, or the orphan outlived its server)."""
    from easel.tools import sd_lora

    worker = _worker(tmp_path, tiny)
    worker.STOP_GRACE = 0.5
    tid = _submit(worker)
    stop = threading.Event()
    exits = []

    def exit_process(code):
        exits.append(code)  # the heartbeat returns after it, as a real exit would end it

    worker.should_stop = stop.is_set
    worker.exit_process = exit_process

    def stuck_prepare(inputs, ctx):
        stop.set()
        deadline = time.time() + 20
        while not exits and time.time() < deadline:  # a download that does not end
            time.sleep(0.05)
        raise RuntimeError("download interrupted")

    monkeypatch.setattr(sd_lora, "prepare", stuck_prepare)
    worker.run_next()
    task = worker.store.get_task(tid)
    assert exits == [3] and task.status == lc.POSTPROCESS_END and "server stopped" in task.debugerror


def test_healthz_is_503_with_the_reason_while_no_worker_can_run(tmp_path):
    from fastapi.testclient import TestClient

    from easel.api import create_app
    from easel.executors.local import LocalExecutor

    settings = Settings(data_dir=tmp_path)
    Store(settings.core.database_url).migrate()
    ex = LocalExecutor(settings)  # never started: no supervisor, no worker
    with TestClient(create_app(settings, ex, dispatch_webhooks=False)) as http:
        r = http.get("/healthz")
        assert r.status_code == 503 and r.json() == {"ok": False, "reason": "the worker supervisor is not running"}
