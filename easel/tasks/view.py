"""Wiro's view of a task: the ``tasklist`` item, run time, time left, phases, watchers' poll delay.

Reads only: nothing here writes a task (that is :mod:`easel.tasks.lifecycle`'s). Re-exported by
the lifecycle module, where callers find them (``lifecycle.task_view``).
"""
from __future__ import annotations

import json
from typing import Callable

from easel import strict
from easel.clock import SYSTEM, Clock
from easel.store import Output, Task, TaskStatus

QUEUE, OUTPUT = TaskStatus.QUEUE, TaskStatus.OUTPUT
POSTPROCESS_END, CANCEL = TaskStatus.POSTPROCESS_END, TaskStatus.CANCEL
TERMINAL = (POSTPROCESS_END, CANCEL)


def _t(value: float | None) -> str:
    return str(int(value)) if value else "0"


def elapsed_seconds(task: Task, clock: Clock = SYSTEM) -> float:
    """Run time from ``task_start`` (or accept) to the end (or ``clock``'s now, while running)."""
    begin = task.starttime or task.accepttime
    if not begin:
        return 0.0
    end = task.endtime or task.canceltime or (None if task.status not in TERMINAL else task.postprocessendtime)
    return max(0.0, (end or clock.now()) - begin)


WAITING = "Waiting for a worker"  # the phase of a queued task (Task/Detail's progress.task)
LOADING = "Loading weights"  # the phase from task_assign to the first step (load, or reuse when warm)


def phase(name: str) -> dict:
    """A progress object (Task/Detail's ``progress``) for a phase without steps yet: ``task`` is
    the phase's name, the counts are "0" and the time left unknown."""
    return {"task": name, "percentage": "0", "stepCurrent": "0", "stepTotal": "0", "speed": "0.00",
            "speedType": "it/s", "elapsedTime": "0.0s", "remainingTime": ""}


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
              modeldescription: str = "", modelid: str = "0", retention_seconds: float = 0.0) -> dict:
    """The task as Wiro's ``tasklist`` item: every value a string, as the docs show.

    As the seeds' Kill and Cancel answers show, a ``task_cancel`` task (cancelled while queued,
    or killed while running) has ``pexit`` "0" and its cancel time as ``endtime``; the reason is
    in ``debugerror``. ``categories`` is a JSON-encoded string, ``modelid`` the tool's id.

    Beyond Wiro: ``progress`` (latest progressGenerate object), ``queueposition`` (1 = next to
    run; "" unless queued) and ``eta`` (estimated seconds until the end; "" when unknown).
    """
    elapsed = elapsed_seconds(task)
    eta = eta_seconds(task)
    cps = task.cost_per_second if cps is None else cps
    billed = task.status == POSTPROCESS_END and task.pexit == "0"
    cancelled = task.status == CANCEL
    ended = task.postprocessendtime or task.canceltime if task.status in TERMINAL else None
    owner, _, project = task.tool.partition("/")
    out_list = [{
        "id": o.id, "name": o.name, "contenttype": o.contenttype, "parentid": task.uuid.replace("-", "")[:32],
        "uuid": task.uuid, "size": str(o.size), "addedtime": _t(o.addedtime), "modifiedtime": _t(o.addedtime),
        "accesskey": task.file_accesskey, "foldercount": "0", "filecount": "0", "ispublic": 0,
        "expiretime": _t(ended + retention_seconds) if retention_seconds > 0 and ended else None,
        "url": url_for(task, o),
    } for o in outputs]
    # stored data may hold text that cannot be encoded (a lone surrogate stored before Run refused
    # them): answered with U+FFFD instead of failing every later Task/Detail and Task/List
    return strict.clean_text({
        "id": str(task.id), "uuid": task.uuid, "name": "", "socketaccesstoken": task.socketaccesstoken,
        "parameters": json.loads(task.parameters or "{}"),
        "debugoutput": task.debugoutput or "", "debugerror": task.debugerror or "",
        "starttime": _t(task.starttime), "endtime": _t(task.endtime or (task.canceltime if cancelled else None)),
        "elapsedseconds": f"{elapsed:.4f}",
        "status": task.status, "cps": f"{cps:.12f}", "totalcost": f"{elapsed * cps:.12f}" if billed else "0",
        "guestid": None, "projectid": str(task.project_id), "modelid": modelid, "description": "", "basemodelid": "0",
        "runtype": "model", "modelfolderid": "", "modelfileid": "", "callbackurl": task.callbackurl or "",
        "marketplaceid": None, "modelslugowner": owner, "modelslugproject": project,
        "modeldescription": modeldescription,
        "createtime": _t(task.createtime), "canceltime": _t(task.canceltime), "assigntime": _t(task.assigntime),
        "accepttime": _t(task.accepttime), "preprocessstarttime": _t(task.preprocessstarttime),
        "preprocessendtime": _t(task.preprocessendtime), "postprocessstarttime": _t(task.postprocessstarttime),
        "postprocessendtime": _t(task.postprocessendtime), "pexit": "0" if cancelled else task.pexit if task.pexit is not None else "",
        "categories": json.dumps(categories, separators=(",", ":")), "outputs": out_list,
        # beyond Wiro: the latest progressGenerate, or the phase without steps
        "progress": json.loads(task.progress) if task.progress else phase(WAITING) if task.status == QUEUE else {},
        "queueposition": str(queueposition) if queueposition is not None and task.status == QUEUE else "",
        "eta": "" if eta is None else f"{eta:.1f}",
        "size": str(sum(o.size for o in outputs)),
    })
