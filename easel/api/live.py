"""Wiro's WebSocket protocol for live task events, served from the store.

A client connects to ``Settings.api.ws_path`` (``/v1``), sends ``{"type": "task_info", "tasktoken":
"<socketaccesstoken>"}`` and receives one frame per lifecycle event, in order, starting with the
events it missed (a late client gets the whole history first)::

    {"type": "task_output", "id": "<task id>", "tasktoken": "<token>", "message": ..., "result": true}

``message`` is exactly what Wiro's ``websocket.md`` shows for each type:

- lifecycle events (``task_queue``, ``task_accept``, ... ``task_postprocess_start``, ``task_cancel``): ``null``;
- ``task_output`` (one per denoising step): the flat progress object ``{"type": "progressGenerate",
  "task": "Generate", "percentage": "60", "stepCurrent": "6", "stepTotal": "10", "speed": "1.2",
  "speedType": "it/s", "elapsedTime": "5.0s", "remainingTime": "3.3s"}``, every value a string;
- ``task_error``: the stderr line (a string);
- ``task_output_full`` / ``task_error_full``: ``{"raw": "<accumulated log>"}``; ``task_error_full``
  is sent only when stderr is non-empty;
- ``task_postprocess_end``: the outputs array (as in Task/Detail).

After the terminal frame (``task_postprocess_end`` or ``task_cancel``) the server closes the socket.

Beyond Wiro: with ``?previews=1`` on the URL, or ``"previews": true`` in the registration,
progress frames that have one carry ``preview`` (base64 JPEG of the current latent, see
``easel.tools.previews``) and ``previewType`` (``image/jpeg``) as extra top-level keys, which
Wiro clients ignore.

Beyond Wiro, the phase: with ``?phases=1``, or ``"phases": true`` in the registration, the stepless
phases of a task come as progress frames too, so that a client showing ``task_output`` progress
shows what the task is doing before its first step (as Task/Detail's ``progress.task`` does): after
``task_queue`` a ``task_output`` frame whose message is ``{"type": "progressGenerate", "task":
"Waiting for a worker", "stepCurrent": "0", "stepTotal": "0", ..., "elapsedTime": "<seconds in the
phase>s"}``, after ``task_assign`` one with ``"task": "Loading weights"``, each repeated every
:data:`PHASE_EVERY` seconds while the phase lasts (its ``elapsedTime`` growing). Downloads need no
option: weights fetched for a task always come as ``task_output`` frames with ``"task":
"Downloading"`` (bytes, ``speedType`` ``B/s``), and the steps with ``"task": "Generate"``. Without
the option the frames are exactly Wiro's: its lifecycle frames carry no message (``task_queue`` is
the wait, ``task_assign`` "the model is being loaded into memory") and its clients count
``task_output`` frames as steps, so the phase frames are not sent unasked.

Events come from the ``events`` table, which every worker process writes: a client may be
connected to any API process, not the one whose executor started the worker. Each socket reads the
store (one indexed query per read) when it is woken and otherwise at intervals:

- with pushed wake-ups (:mod:`easel.store.notify`: Redis pub/sub, or PostgreSQL ``LISTEN/NOTIFY``),
  at once after each event's commit, and every ``Settings.live.live_fallback_poll_interval`` (1 s)
  besides, so a lost wake-up only delays;
- without (SQLite, or the listener is reconnecting): every ``Settings.live.live_poll_interval`` (20 ms)
  after an event or when the end is near, backing off to 250 ms while nothing happens.

Previews come from the ``previews`` table, read only for a client that asked for them.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from easel import metrics
from easel.store import Event, Store, Task
from easel.store.hub import Hub
from easel.tasks import lifecycle as lc

REGISTER_TIMEOUT = 60.0
PHASE_EVERY = 5.0  # seconds between repeated phase frames while a stepless phase lasts (``phases``)
# the stepless phase each lifecycle event begins (Task/Detail's ``progress.task`` meanwhile)
PHASES = {lc.QUEUE: lc.WAITING, lc.ASSIGN: lc.LOADING}


def progress_message(raw: str) -> Any:
    """A stored ``task_output`` message as Wiro sends it: the flat ``progressGenerate`` object
    with string values (older stores nest it under ``"progressGenerate"``), or the plain string."""
    if not raw.startswith("{"):
        return raw
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(data.get("progressGenerate"), dict):
        data = {"type": "progressGenerate", **data["progressGenerate"]}
    return {k: v if isinstance(v, (str, list, bool)) or v is None else str(v) for k, v in data.items()}


def frame(task: Task, event: Event, outputs: Callable[[Task], list], previews: bool) -> dict | None:
    """The WebSocket frame of one stored event; None for an event Wiro does not send (an empty
    ``task_error_full``)."""
    raw = event.message or ""
    message: Any = None
    if event.type == lc.OUTPUT:
        message = progress_message(raw)
    elif event.type == lc.ERROR:
        message = raw
    elif event.type in (lc.OUTPUT_FULL, lc.ERROR_FULL):
        if event.type == lc.ERROR_FULL and not raw:
            return None
        message = {"raw": raw}
    elif event.type == lc.POSTPROCESS_END:
        message = outputs(task)
    out = {"type": event.type, "id": str(task.id), "tasktoken": task.socketaccesstoken, "message": message,
           "result": True}
    if previews and event.preview:
        out["preview"] = event.preview
        out["previewType"] = "image/jpeg"
    return out


def phase_frame(task: Task, name: str, seconds: float) -> dict:
    """The progress frame of a stepless phase (``phases`` asked): a ``task_output`` frame whose
    message is :func:`lifecycle.phase` as Wiro's flat ``progressGenerate`` object, ``task`` the
    phase's name (:data:`PHASES`) and ``elapsedTime`` the ``seconds`` spent in it so far (>= 0)."""
    message = {"type": "progressGenerate", **lc.phase(name), "elapsedTime": f"{max(0.0, seconds):.1f}s"}
    return {"type": lc.OUTPUT, "id": str(task.id), "tasktoken": task.socketaccesstoken, "message": message,
            "result": True}


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


async def serve_socket(ws: WebSocket, store: Store, outputs: Callable[[Task], list], poll: float = 0.1,
                       hub: Hub | None = None, fallback: float = 1.0) -> None:
    """Run one client connection (registration, replay, live events, close).

    ``poll``: seconds between store reads near events when nothing is pushed; ``hub``: this
    process's wake-up hub (None: polling only); ``fallback``: seconds between reads while the hub
    is pushing and no wake-up comes."""
    await ws.accept()
    with metrics.websocket_open():
        await _serve(ws, store, outputs, poll, hub or Hub(), fallback)


async def _serve(ws: WebSocket, store: Store, outputs: Callable[[Task], list], poll: float, hub: Hub,
                 fallback: float) -> None:
    previews = _flag(ws.query_params.get("previews", ""))
    phases = _flag(ws.query_params.get("phases", ""))
    try:
        while True:
            raw = await asyncio.wait_for(ws.receive_text(), REGISTER_TIMEOUT)
            try:
                msg = json.loads(raw)
            except ValueError:
                msg = {}
            token = str(msg.get("tasktoken", "")) if isinstance(msg, dict) else ""
            if isinstance(msg, dict) and msg.get("type") == "task_info" and token:
                break
            await ws.send_json({"type": "error", "result": False,
                                "message": 'send {"type": "task_info", "tasktoken": "<socketaccesstoken>"} first'})
        previews = previews or bool(msg.get("previews"))
        phases = phases or _flag(msg.get("phases"))
        task = await run_in_threadpool(store.get_task, None, token)
        if task is None:
            await ws.send_json({"type": "error", "result": False, "tasktoken": token,
                                "message": "There is no task with this tasktoken."})
            await ws.close(code=1008)
            return
        last = 0
        delay = poll
        current: tuple[str, float] | None = None  # (phase, its start: the event's time) while one lasts
        sent = 0.0  # when its last phase frame went out (loop time)
        loop = asyncio.get_running_loop()
        with hub.watch(task.id) as watch:
            while True:
                watch.clear()  # a wake-up from here on, even during the read, ends the next wait
                events = await run_in_threadpool(store.events, task.id, last, previews)
                if events:
                    task = await run_in_threadpool(store.get_task, task.id)
                    for i, ev in enumerate(events):
                        last = ev.seq
                        out = await run_in_threadpool(frame, task, ev, outputs, previews)
                        if out is not None:
                            await ws.send_json(out)
                        if ev.type in lc.TERMINAL:
                            await ws.close()
                            return
                        if phases:
                            current = (PHASES[ev.type], ev.created_at) if ev.type in PHASES else None
                            if current:  # a past phase (replayed) lasted until the next event
                                end = events[i + 1].created_at if i + 1 < len(events) else time.time()
                                await ws.send_json(phase_frame(task, current[0], end - current[1]))
                                sent = loop.time()
                    delay = poll
                elif task.status == lc.OUTPUT and lc.poll_delay(task, poll, 0.25) == poll:
                    delay = poll  # the last step is near: its outputs should go out at once
                else:
                    delay = min(0.25, delay * 1.5)  # nothing new: back off, several steps per read
                if current and loop.time() - sent >= PHASE_EVERY:  # the phase lasts: say so again
                    await ws.send_json(phase_frame(task, current[0], time.time() - current[1]))
                    sent = loop.time()
                wait = fallback if hub.pushing else delay
                if current:
                    wait = max(0.0, min(wait, sent + PHASE_EVERY - loop.time()))
                await watch.wait(wait)
    except (WebSocketDisconnect, asyncio.TimeoutError, RuntimeError):
        return
