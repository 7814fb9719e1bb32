"""The API's own seams, in process: Kill waits on the task's pushed wake-up (and polls where none
is pushed), authentication and the rate limit read an injected clock (a ManualClock moves instead
of the test sleeping), and the services object the routes share."""
from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from conftest import TOOL
from easel.api import auth, create_app
from easel.api.errors import WiroError
from easel.api.ratelimit import LocalWindow, RateLimiter
from easel.api.routes import task as task_routes
from easel.api.services import Services
from easel.clock import ManualClock
from easel.config import Settings
from easel.signing import signature
from easel.store import Store
from easel.tasks import lifecycle as lc


def _running_task(store: Store, project_id: int) -> int:
    task, _ = lc.submit(store, project_id=project_id, tool=TOOL, parameters={}, inputs={}, callbackurl="",
                        cost_per_second=0)
    assert lc.claim(store, "w1", task_id=task.id) == task.id
    return task.id


def _kill_when_asked(store: Store, task_id: int, stop: threading.Event) -> threading.Thread:
    """A stand-in worker: ends the task as killed once Kill has asked (as the runner does at its next step)."""
    def run():
        while not stop.is_set():
            if store.kill_requested(task_id):
                lc.finish_killed(store, task_id, owner="w1")
                return
            stop.wait(0.01)  # polling the store for the request, as a worker does between steps

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _kill(tmp_path, worker_store_of) -> tuple[dict, float]:
    """Kill a running task through the app; the stand-in worker writes through ``worker_store_of(app
    store)``. Returns Kill's answer and how long it took."""
    settings = Settings(data_dir=tmp_path)
    app = create_app(settings, None, dispatch_webhooks=False)
    svc: Services = app.state.services
    svc.store.migrate()
    project = svc.store.create_project("p", "apikey")
    tid = _running_task(svc.store, project.id)
    stop = threading.Event()
    with TestClient(app) as http:
        worker = _kill_when_asked(worker_store_of(svc.store), tid, stop)
        try:
            began = time.monotonic()
            answer = http.post("/v1/Task/Kill", json={"taskid": str(tid)}, headers={"x-api-key": project.apikey}).json()
            took = time.monotonic() - began
        finally:
            stop.set()
            worker.join(10)
    svc.store.engine.dispose()
    return answer, took


def test_kill_answers_on_the_tasks_pushed_wake_up(tmp_path, monkeypatch):
    # the worker writes through the app's own store: its commit wakes the waiter in this process
    # (easel.store.notify), so Kill answers at once although it would otherwise read the task again
    # only after two minutes
    monkeypatch.setattr(task_routes, "KILL_POLL_SECONDS", 120.0)
    monkeypatch.setattr(task_routes, "KILL_WAIT_SECONDS", 120.0)
    answer, took = _kill(tmp_path, lambda store: store)
    assert answer["result"] is True and answer["tasklist"][0]["status"] == lc.CANCEL
    assert "killed" in answer["tasklist"][0]["debugerror"]
    assert took < 60, took


def test_kill_polls_where_no_wake_up_is_pushed(tmp_path, monkeypatch):
    # another process's store (its own publisher): nothing wakes this API's waiter, so Kill reads
    # the task every KILL_POLL_SECONDS until the worker has ended it
    stores = []

    def other_process(store: Store) -> Store:
        stores.append(Store(store.url))
        return stores[-1]

    try:
        answer, took = _kill(tmp_path, other_process)
    finally:
        for s in stores:
            s.engine.dispose()
    assert answer["result"] is True and answer["tasklist"][0]["status"] == lc.CANCEL
    assert took < task_routes.KILL_WAIT_SECONDS, took


def test_kill_answers_the_current_state_at_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(task_routes, "KILL_WAIT_SECONDS", 0.3)  # no worker acknowledges: Kill stops waiting
    answer, _took = _kill(tmp_path, lambda store: _Deaf())
    assert answer["result"] is True and answer["tasklist"][0]["status"] == lc.ACCEPT


class _Deaf:
    """A worker's store that never sees the kill request."""

    def kill_requested(self, _task_id: int) -> bool:
        return False


def test_project_cache_and_strict_nonces_follow_the_injected_clock(store):
    clock = ManualClock(start=1_700_000_000)
    settings = Settings()
    window = settings.api.nonce_window_seconds
    made = store.create_project("p", nonce_policy="strict")

    def headers(nonce: str) -> dict:
        return {"x-api-key": made.apikey, "x-nonce": nonce, "x-signature": signature(made.apikey, made.apisecret, nonce)}

    cache = auth.ProjectCache(store, clock=clock)
    assert auth.authenticate(headers("1700000000"), store, settings, cache, clock).id == made.id
    clock.advance(window + 2)  # a timestamp nonce of the old "now" is stale by the injected clock
    with pytest.raises(WiroError) as refused:
        auth.authenticate(headers("1700000001"), store, settings, cache, clock)
    assert refused.value.status == 401 and "strict" in refused.value.detail
    fresh = str(int(clock.now()))
    assert auth.authenticate(headers(fresh), store, settings, cache, clock).id == made.id
    assert auth.authenticate(headers(fresh + "000"), store, settings, cache, clock).id == made.id  # milliseconds


def test_rate_limit_window_moves_with_the_injected_clock():
    clock = ManualClock()
    limiter = RateLimiter(3, clock=clock)
    assert [limiter.check("k") for _ in range(3)] == [None] * 3
    assert limiter.check("k") == 60.0 and limiter.check("other") is None
    clock.advance(20)
    limiter.check("other")
    assert limiter.check("k") == 40.0  # refused requests are not counted
    clock.advance(40.5)
    # the first three left the window: three more fit, then the limit holds again
    assert [limiter.check("k") for _ in range(4)] == [None, None, None, 60.0]
    assert RateLimiter(0, clock=clock).check("k") is None  # 0: unlimited


def test_local_window_forgets_idle_keys_when_it_holds_many():
    clock = ManualClock()
    window = LocalWindow(1, 60, clock)
    window.MAX_KEYS = 3
    for key in "abc":
        assert window.hit(key) is None
    clock.advance(61)
    assert window.hit("d") is None and set(window._hits) == {"d"}


def test_the_apps_rate_limit_answers_429_until_its_clock_moves(tmp_path):
    clock = ManualClock()
    settings = Settings(data_dir=tmp_path, rate_limit_per_minute=2)
    app = create_app(settings, None, dispatch_webhooks=False, clock=clock)
    svc: Services = app.state.services
    svc.store.migrate()
    project = svc.store.create_project("p", "apikey")
    with TestClient(app) as http:
        codes = [http.post("/v1/Tool/List", headers={"x-api-key": project.apikey}) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert codes[2].headers["retry-after"] == "60" and codes[2].json()["result"] is False
        clock.advance(30)
        assert http.post("/v1/Tool/List", headers={"x-api-key": project.apikey}).headers["retry-after"] == "30"
        clock.advance(30.5)
        assert http.post("/v1/Tool/List", headers={"x-api-key": project.apikey}).status_code == 200
    svc.store.engine.dispose()
