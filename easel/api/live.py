"""Wiro's WebSocket protocol for live task events, served from the store.

A client connects to ``Settings.ws_path`` (``/v1``), sends ``{"type": "task_info", "tasktoken":
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

Events come from the ``events`` table, which every worker process writes: a client may be
connected to any API process, not the one whose executor started the worker. Each socket reads the
store (one indexed query per read) when it is woken and otherwise at intervals:

- with pushed wake-ups (:mod:`easel.store.notify`: Redis pub/sub, or PostgreSQL ``LISTEN/NOTIFY``),
  at once after each event's commit, and every ``Settings.live_fallback_poll_interval`` (1 s)
  besides, so a lost wake-up only delays;
- without (SQLite, or the listener is reconnecting): every ``Settings.live_poll_interval`` (20 ms)
  after an event or when the end is near, backing off to 250 ms while nothing happens.

Previews come from the ``previews`` table, read only for a client that asked for them.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from easel import metrics
from easel.store import Event, Store, Task
from easel.store.notify import Hub
from easel.tasks import lifecycle as lc

REGISTER_TIMEOUT = 60.0


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
    previews = ws.query_params.get("previews", "").lower() in ("1", "true", "yes")
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
        task = await run_in_threadpool(store.get_task, None, token)
        if task is None:
            await ws.send_json({"type": "error", "result": False, "tasktoken": token,
                                "message": "There is no task with this tasktoken."})
            await ws.close(code=1008)
            return
        last = 0
        delay = poll
        with hub.watch(task.id) as watch:
            while True:
                watch.clear()  # a wake-up from here on, even during the read, ends the next wait
                events = await run_in_threadpool(store.events, task.id, last, previews)
                if events:
                    task = await run_in_threadpool(store.get_task, task.id)
                    for ev in events:
                        last = ev.seq
                        out = await run_in_threadpool(frame, task, ev, outputs, previews)
                        if out is not None:
                            await ws.send_json(out)
                        if ev.type in lc.TERMINAL:
                            await ws.close()
                            return
                    delay = poll
                elif task.status == lc.OUTPUT and lc.poll_delay(task, poll, 0.25) == poll:
                    delay = poll  # the last step is near: its outputs should go out at once
                else:
                    delay = min(0.25, delay * 1.5)  # nothing new: back off, several steps per read
                await watch.wait(fallback if hub.pushing else delay)
    except (WebSocketDisconnect, asyncio.TimeoutError, RuntimeError):
        return
