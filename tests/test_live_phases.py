"""Issue 24: the phase a task is in (waiting for a worker, loading weights) in the WebSocket's
progress frames when the client asks for it (``?phases=1`` or ``"phases": true``); without it the
frames stay exactly Wiro's (tests/test_live.py, tests/test_conformance.py check those)."""
from __future__ import annotations

import concurrent.futures
import json

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient

from conftest import SMALL, TIME_SCALE, TOOL
from easel.api import live
from easel.tasks import lifecycle as lc

PROGRESS_KEYS = {"type", "task", "percentage", "stepCurrent", "stepTotal", "speed", "speedType", "elapsedTime",
                 "remainingTime"}
PHASE_NAMES = (lc.WAITING, lc.LOADING)


def _app(store) -> Starlette:
    async def socket(ws):
        await live.serve_socket(ws, store, lambda task: [], poll=0.02)

    return Starlette(routes=[WebSocketRoute("/v1", socket)])


class Frames:
    """A registered client of the in-process socket; :meth:`next` waits with a deadline."""

    def __init__(self, ws, pool):
        self.ws, self.pool = ws, pool

    def next(self, timeout: float = 10.0) -> dict:
        return self.pool.submit(self.ws.receive_json).result(timeout=timeout * TIME_SCALE)

    def until(self, last: str) -> list[dict]:
        """The frames up to the first of type ``last``, that one included."""
        frames = [self.next()]
        while frames[-1]["type"] != last:
            frames.append(self.next())
        return frames


@pytest.fixture
def connect(store):
    with TestClient(_app(store)) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        def open_(token: str, query: str = "", **register):
            ctx = client.websocket_connect("/v1" + query)
            ws = ctx.__enter__()
            opened.append(ctx)
            ws.send_text(json.dumps({"type": "task_info", "tasktoken": token, **register}))
            return Frames(ws, pool)

        opened = []
        yield open_
        for ctx in opened:
            ctx.__exit__(None, None, None)


def _queued(store):
    project = store.create_project("p")
    task, _ = lc.submit(store, project_id=project.id, tool=TOOL, parameters=SMALL, inputs=dict(SMALL),
                        callbackurl="", cost_per_second=0)
    return task


def _killed(store):
    """A task that went through every stage up to task_start, then was killed."""
    task = _queued(store)
    assert lc.claim(store, "w1", preprocess=True) == task.id
    assert lc.advance_through(store, task.id, [lc.Stage(lc.PREPROCESS_END), lc.Stage(lc.ASSIGN)])
    assert lc.advance(store, task.id, lc.START)
    lc.finish_killed(store, task.id)
    return task


def _is_phase(frame: dict, name: str) -> bool:
    return frame["type"] == "task_output" and frame["message"]["task"] == name


def _check_phase_frame(frame: dict, task, name: str) -> float:
    """The frame is the progress frame of phase ``name``; returns its elapsed seconds."""
    assert list(frame) == ["type", "id", "tasktoken", "message", "result"], frame
    assert frame["id"] == str(task.id) and frame["tasktoken"] == task.socketaccesstoken and frame["result"] is True
    message = frame["message"]
    assert set(message) == PROGRESS_KEYS and all(isinstance(v, str) for v in message.values()), message
    assert message["type"] == "progressGenerate" and message["task"] == name
    assert (message["stepCurrent"], message["stepTotal"], message["percentage"]) == ("0", "0", "0")
    return float(message["elapsedTime"].rstrip("s"))


def test_phases_come_as_progress_frames_and_repeat_while_they_last(store, connect, monkeypatch):
    monkeypatch.setattr(live, "PHASE_EVERY", 0.3)
    task = _queued(store)
    ws = connect(task.socketaccesstoken, "?phases=1")
    assert ws.next()["type"] == "task_queue"
    first = _check_phase_frame(ws.next(), task, lc.WAITING)
    again = _check_phase_frame(ws.next(), task, lc.WAITING)  # still queued: said again, later
    assert 0 <= first < again
    assert lc.claim(store, "w1", preprocess=True) == task.id
    assert lc.advance_through(store, task.id, [lc.Stage(lc.PREPROCESS_END),
                                               lc.Stage(lc.ASSIGN, values={"progress": json.dumps(lc.phase(lc.LOADING))})])
    types = []
    while True:  # a repeated "Waiting" frame may still come before the new events are read
        frame = ws.next()
        if _is_phase(frame, lc.WAITING):
            assert not types
            continue
        types.append(frame["type"])
        if frame["type"] == "task_output":
            _check_phase_frame(frame, task, lc.LOADING)
            break
    assert types == ["task_accept", "task_preprocess_start", "task_preprocess_end", "task_assign", "task_output"]
    assert _is_phase(ws.next(), lc.LOADING)  # loading lasts: repeated
    assert lc.advance(store, task.id, lc.START)
    lc.finish_killed(store, task.id)
    tail = ws.until("task_cancel")
    # after task_start no phase frame comes (the steps name their phase themselves)
    assert [f["type"] for f in tail if not _is_phase(f, lc.LOADING)] == ["task_start", "task_cancel"]
    assert all(f["type"] != "task_output" for f in tail[tail.index(next(f for f in tail if f["type"] == "task_start")):])


def test_a_late_client_gets_each_past_phase_once_with_its_duration(store, connect):
    task = _killed(store)
    events = {e.type: e.created_at for e in store.events(task.id)}
    ws = connect(task.socketaccesstoken, phases=True)  # asked in the registration this time
    frames = ws.until("task_cancel")
    types = [f["type"] for f in frames]
    assert types == ["task_queue", "task_output", "task_accept", "task_preprocess_start", "task_preprocess_end",
                     "task_assign", "task_output", "task_start", "task_cancel"]
    waited = _check_phase_frame(frames[1], task, lc.WAITING)
    loaded = _check_phase_frame(frames[6], task, lc.LOADING)
    assert waited == pytest.approx(events["task_accept"] - events["task_queue"], abs=0.051)
    assert loaded == pytest.approx(events["task_start"] - events["task_assign"], abs=0.051)


def test_without_asking_the_frames_are_wiros(store, connect):
    task = _killed(store)
    for query in ("", "?phases=0"):
        ws = connect(task.socketaccesstoken, query)
        frames = ws.until("task_cancel")
        assert [f["type"] for f in frames] == ["task_queue", "task_accept", "task_preprocess_start",
                                               "task_preprocess_end", "task_assign", "task_start", "task_cancel"]
        assert all(f["message"] is None for f in frames)


def test_a_real_run_with_phases(server, project):
    """Through a server: the phase frames sit right after their lifecycle frame; without them the
    frames are the sequence test_live checks."""
    from test_live import check_sequence, ws_frames

    answer = server.run(project, {**SMALL, "steps": 3})
    token = answer["socketaccesstoken"]
    url = server.base.replace("http", "ws") + "/v1?phases=1"
    from websockets.sync.client import connect as ws_connect

    frames = []
    with ws_connect(url, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
        while not frames or frames[-1]["type"] not in ("task_postprocess_end", "task_cancel"):
            frames.append(json.loads(ws.recv(timeout=120 * TIME_SCALE)))
    phase = [i for i, f in enumerate(frames) if f["type"] == "task_output" and f["message"]["task"] in PHASE_NAMES]
    for name, after in ((lc.WAITING, "task_queue"), (lc.LOADING, "task_assign")):
        first = next(i for i in phase if frames[i]["message"]["task"] == name)
        assert frames[first - 1]["type"] == after, [f["type"] for f in frames]
    wiro = [f for i, f in enumerate(frames) if i not in phase]
    check_sequence(wiro, 3, answer["taskid"], token)
    assert [f["type"] for f in ws_frames(server, token)] == [f["type"] for f in wiro]  # not asked: none
