"""Task statuses, legal transitions, stage times, exit codes, cost, and Wiro's task view.

Order of a successful run (Wiro's documented lifecycle)::

    task_queue → task_accept → task_preprocess_start → task_preprocess_end → task_assign
    → task_start → task_output (per step) → task_output_full → task_end
    → task_postprocess_start → task_postprocess_end (pexit "0")

A tool error ends at ``task_postprocess_end`` with ``pexit`` "1" and the message in
``debugerror``. Cancel (queued) and Kill (running) end at ``task_cancel`` (``pexit`` "-1" for a
killed run). Only successful tasks are billed: ``totalcost`` = elapsed seconds × cost per second.
"""
from __future__ import annotations

import json
import time
from typing import Callable

from easel import metrics
from easel.store import Output, Store, Task

QUEUE = "task_queue"
ACCEPT = "task_accept"
PREPROCESS_START = "task_preprocess_start"
PREPROCESS_END = "task_preprocess_end"
ASSIGN = "task_assign"
START = "task_start"
OUTPUT = "task_output"
ERROR = "task_error"
OUTPUT_FULL = "task_output_full"
ERROR_FULL = "task_error_full"
END = "task_end"
POSTPROCESS_START = "task_postprocess_start"
POSTPROCESS_END = "task_postprocess_end"
CANCEL = "task_cancel"

RUNNING = (ACCEPT, PREPROCESS_START, PREPROCESS_END, ASSIGN, START, OUTPUT, OUTPUT_FULL, ERROR_FULL, END,
           POSTPROCESS_START)
TERMINAL = (POSTPROCESS_END, CANCEL)

TIME_COLUMN = {
    ACCEPT: "accepttime", PREPROCESS_START: "preprocessstarttime", PREPROCESS_END: "preprocessendtime",
    ASSIGN: "assigntime", START: "starttime", END: "endtime", POSTPROCESS_START: "postprocessstarttime",
    POSTPROCESS_END: "postprocessendtime", CANCEL: "canceltime",
}

KILLED_PEXIT = "-1"
INTERRUPTED_MESSAGE = ("The server stopped while this task was running; it was not restarted because a "
                       "task that was mid-run may be what stopped the worker. Submit it again.")
# The same message ends a task that a worker abandons at a denoising step because the server is
# shutting down (SIGTERM) or its process is gone (SIGKILL): one outcome, whichever way it stopped.


def submit(store: Store, *, project_id: int, tool: str, parameters: dict, inputs: dict,
           callbackurl: str, cost_per_second: float, uuid: str | None = None,
           idempotency_key: str | None = None) -> tuple[Task, bool]:
    """Store a new queued task (durable before the caller acknowledges it).

    Returns:
        ``(task, created)``; ``created`` is False when ``idempotency_key`` was already used by the
        project, and ``task`` is then the first task submitted with it.
    """
    return store.create_task(project_id=project_id, tool=tool, status=QUEUE, parameters=parameters, inputs=inputs,
                             callbackurl=callbackurl, cost_per_second=cost_per_second, first_event=QUEUE, uuid=uuid,
                             idempotency_key=idempotency_key)


def claim(store: Store, worker_id: str) -> int | None:
    """Take the oldest queued task for ``worker_id`` (``task_accept``); None when the queue is empty."""
    return store.claim_next(worker_id, QUEUE, ACCEPT, TIME_COLUMN[ACCEPT])


def advance(store: Store, task_id: int, status: str, message: str = "", **values) -> None:
    """Move a running task to ``status``, stamping that stage's time column."""
    if status in TIME_COLUMN:
        values.setdefault(TIME_COLUMN[status], time.time())
    if store.transition(task_id, status, only_from=RUNNING, event_message=message, webhook=status in TERMINAL,
                        **values) and status in TERMINAL:
        metrics.task_ended(store.get_task(task_id))


def cancel(store: Store, task_id: int) -> bool:
    """Cancel a queued task; False if it is no longer queued (Wiro: not in a cancellable state)."""
    if not store.transition(task_id, CANCEL, only_from=(QUEUE,), canceltime=time.time(), webhook=True):
        return False
    metrics.task_ended(store.get_task(task_id))
    return True


def request_kill(store: Store, task_id: int) -> bool:
    """Ask the worker running ``task_id`` to stop at its next step; False if it is not running."""
    return store.request_kill(task_id, RUNNING)


def finish_killed(store: Store, task_id: int) -> None:
    advance(store, task_id, CANCEL, pexit=KILLED_PEXIT, debugerror="Task was killed by request.")


def recover_interrupted(store: Store) -> list[int]:
    """End tasks left running by a stopped server as failed (``pexit`` "1", reason in ``debugerror``).

    Queued tasks are left queued: the workers run them after the restart.
    """
    ids = []
    now = time.time()
    for task in store.tasks_in(RUNNING):
        if store.transition(task.id, POSTPROCESS_END, only_from=RUNNING, pexit="1", webhook=True,
                            debugerror=(task.debugerror + "\n" if task.debugerror else "") + INTERRUPTED_MESSAGE,
                            endtime=task.endtime or now, postprocessendtime=now):
            metrics.task_ended(store.get_task(task.id))
        ids.append(task.id)
    return ids


def fail_worker_tasks(store: Store, worker_id: str, reason: str) -> list[int]:
    """End as failed (``pexit`` "1", ``reason`` in ``debugerror``) every task that ``worker_id``
    was running: its process died, so nothing else will finish them. Returns their ids."""
    ids = []
    now = time.time()
    for task in store.tasks_in(RUNNING):
        if task.worker_id != worker_id:
            continue
        if store.transition(task.id, POSTPROCESS_END, only_from=RUNNING, pexit="1", webhook=True,
                            debugerror=(task.debugerror + "\n" if task.debugerror else "") + reason,
                            endtime=task.endtime or now, postprocessendtime=now):
            metrics.task_ended(store.get_task(task.id))
            ids.append(task.id)
    return ids


def _t(value: float | None) -> str:
    return str(int(value)) if value else "0"


def elapsed_seconds(task: Task) -> float:
    """Run time from ``task_start`` (or accept) to the end (or now, while running)."""
    begin = task.starttime or task.accepttime
    if not begin:
        return 0.0
    end = task.endtime or task.canceltime or (None if task.status not in TERMINAL else task.postprocessendtime)
    return max(0.0, (end or time.time()) - begin)


def eta_seconds(task: Task) -> float | None:
    """Seconds until the task should end, from its latest progress (None when unknown)."""
    if task.status in TERMINAL:
        return 0.0
    if not task.progress:
        return None
    try:
        info = json.loads(task.progress)
        return float(str(info.get("remainingTime", "")).rstrip("s"))
    except (ValueError, TypeError):
        return None


def poll_delay(task: Task, base: float, cap: float) -> float:
    """How long a watcher (``Prefer: wait``, a WebSocket) may sleep before reading the task again.

    ``base`` while the end may be near (queued, unknown progress, or less than 0.5 s left);
    otherwise half the estimated time left, at most ``cap``. Watching a long run then costs a few
    reads per second instead of fifty, which matters when the API shares cores with torch.
    """
    eta = eta_seconds(task)
    if task.status not in (OUTPUT,) or eta is None or eta < 0.5:
        return base
    return min(cap, max(base, eta / 2))


def task_view(task: Task, outputs: list[Output], url_for: Callable[[Task, Output], str],
              categories: list[str], cps: float | None = None, queueposition: int | None = None,
              modeldescription: str = "") -> dict:
    """The task as Wiro's ``tasklist`` item: every value a string, as the docs show.

    Beyond Wiro: ``progress`` (latest progressGenerate object), ``queueposition`` (1 = next to
    run; "" unless queued) and ``eta`` (estimated seconds until the end; "" when unknown).
    """
    elapsed = elapsed_seconds(task)
    eta = eta_seconds(task)
    cps = task.cost_per_second if cps is None else cps
    billed = task.status == POSTPROCESS_END and task.pexit == "0"
    owner, _, project = task.tool.partition("/")
    out_list = [{
        "id": o.id, "name": o.name, "contenttype": o.contenttype, "parentid": task.uuid.replace("-", "")[:32],
        "uuid": task.uuid, "size": str(o.size), "addedtime": _t(o.addedtime), "modifiedtime": _t(o.addedtime),
        "accesskey": task.file_accesskey, "foldercount": "0", "filecount": "0", "ispublic": 0, "expiretime": None,
        "url": url_for(task, o),
    } for o in outputs]
    return {
        "id": str(task.id), "uuid": task.uuid, "name": "", "socketaccesstoken": task.socketaccesstoken,
        "parameters": json.loads(task.parameters or "{}"),
        "debugoutput": task.debugoutput or "", "debugerror": task.debugerror or "",
        "starttime": _t(task.starttime), "endtime": _t(task.endtime), "elapsedseconds": f"{elapsed:.4f}",
        "status": task.status, "cps": f"{cps:.12f}", "totalcost": f"{elapsed * cps:.12f}" if billed else "0",
        "guestid": None, "projectid": str(task.project_id), "modelid": "0", "description": "", "basemodelid": "0",
        "runtype": "model", "modelfolderid": "", "modelfileid": "", "callbackurl": task.callbackurl or "",
        "marketplaceid": None, "modelslugowner": owner, "modelslugproject": project,
        "modeldescription": modeldescription,
        "createtime": _t(task.createtime), "canceltime": _t(task.canceltime), "assigntime": _t(task.assigntime),
        "accepttime": _t(task.accepttime), "preprocessstarttime": _t(task.preprocessstarttime),
        "preprocessendtime": _t(task.preprocessendtime), "postprocessstarttime": _t(task.postprocessstarttime),
        "postprocessendtime": _t(task.postprocessendtime), "pexit": task.pexit if task.pexit is not None else "",
        "categories": json.dumps(categories), "outputs": out_list,
        "progress": json.loads(task.progress) if task.progress else {},  # beyond Wiro: latest progressGenerate
        "queueposition": str(queueposition) if queueposition is not None and task.status == QUEUE else "",
        "eta": "" if eta is None else f"{eta:.1f}",
        "size": str(sum(o.size for o in outputs)),
    }
