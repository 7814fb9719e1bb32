"""Tasks as the Wiro routes show, find, wait on and clean them up: functions of the app's
:class:`~.services.Services`, shared by the run, task, file and socket routes, the OpenAI router,
the webhook sender and the retention sweeper."""
from __future__ import annotations

import logging
import time

from starlette.concurrency import run_in_threadpool

from easel import strict
from easel.storage import output_key
from easel.store import Project, Task
from easel.tasks import lifecycle as lc

from . import compat, toolinfo
from . import errors as E
from .errors import WiroError
from .services import Services

log = logging.getLogger("easel.api")


def task_view(svc: Services, task: Task, outputs: list | None = None, position: int | None = None) -> dict:
    """Wiro's task object (``outputs`` and queue ``position`` are read from the store unless given)."""
    spec = svc.tools.get(task.tool)
    if position is None and task.status == lc.QUEUE:
        position = lc.queue_positions(svc.store, [task]).get(task.id)
    return lc.task_view(task, svc.store.outputs(task.id) if outputs is None else outputs,
                        lambda t, o: svc.storage.url(t.file_accesskey, o.name, key=f"files/{o.path}"),
                        spec.categories if spec else [], queueposition=position,
                        modeldescription=spec.description if spec else "",
                        modelid=toolinfo.tool_id(svc.tools, spec) if spec else "0",
                        retention_seconds=svc.settings.storage.output_retention_seconds)


def task_object(svc: Services, task_id: int) -> dict | None:
    """The Task/Detail item of ``task_id`` (webhook bodies); None if the task is gone."""
    task = svc.store.get_task(task_id)
    return task_view(svc, task) if task else None


def output_list(svc: Services, task: Task) -> list:
    """The task's ``outputs`` as Task/Detail lists them (the WebSocket's last frame)."""
    return task_view(svc, task)["outputs"]


def tasklist(svc: Services, task: Task, total: bool = True) -> dict:
    """Detail's answer (``total`` "1"); Kill and Cancel answer without ``total``, as the seeds show."""
    head = {"total": "1"} if total else {}
    return {**head, "errors": [], "tasklist": [task_view(svc, task)], "result": True}


def run_answer(task: Task) -> dict:
    """Run's answer: ``{errors, taskid, socketaccesstoken, result}`` (values as Wiro types them)."""
    return compat.run_data({"errors": [], "taskid": str(task.id), "socketaccesstoken": task.socketaccesstoken,
                            "result": True})


def find_task(svc: Services, project: Project, fields: dict, not_found: WiroError | None = None) -> Task:
    """The project's task named by ``taskid``, ``tasktoken`` or ``socketaccesstoken``.

    Raises ``not_found`` (default: Wiro's code 1 "There is no task yet." for an unknown task,
    code 0 "You don't have any permission for this action." for another project's), or code 0
    when neither field is given or ``taskid`` is not an id."""
    task_id = str(fields.get("taskid", "") or "").strip()
    token = str(fields.get("tasktoken", "") or fields.get("socketaccesstoken", "") or "").strip()
    if not task_id and not token:
        raise WiroError(0, "taskid or socketaccesstoken is required")
    if task_id:
        try:
            task = svc.store.get_task(task_id=strict.parse_id(task_id, "taskid"))
        except strict.StrictError as exc:
            raise WiroError(0, exc.message) from None
    else:
        task = svc.store.get_task(token=token)
        if task is None and token.isascii() and token.isdigit() and len(token) <= strict.MAX_ID_DIGITS:
            task = svc.store.get_task(task_id=int(token))  # code-examples.md sends the task id here
    if task is None:
        raise not_found or WiroError(1, E.NO_TASK)
    if task.project_id != project.id:
        raise not_found or WiroError(0, E.NO_PERMISSION)
    return task


def delete_files(svc: Services, task: Task) -> None:
    """Remove a finished task's outputs, uploads and pending webhooks (InputOutputDelete and
    the retention sweeper); the task record stays."""
    svc.store.drop_deliveries(task.id)
    for out in svc.store.delete_outputs(task.id):
        try:
            svc.storage.delete(output_key(out.path))
        except ValueError:  # a path no Easel wrote: nothing of ours to delete
            log.warning("task %s: output path %r is not a storage key", task.id, out.path)
    svc.storage.delete_prefix(f"files/{task.uuid}/")
    svc.storage.delete_prefix(f"uploads/{task.uuid}/")


async def wait_for_end(svc: Services, task_id: int, seconds: float, poll: float | None = None) -> Task:
    """The task once it is terminal or ``seconds`` (>= 0) have passed, whichever comes first,
    holding no thread while asleep (many ``Prefer: wait`` requests must not exhaust the thread pool).

    Woken by the task's event wake-ups (:mod:`easel.store.notify`) when they are pushed, reading
    the store again every ``Settings.live.live_fallback_poll_interval`` besides (a lost wake-up only
    delays). Without push it polls: every ``poll`` seconds when given (Kill), else as the socket
    does (backing off to 0.25 s while the task is queued, up to 1 s while it runs with an ETA).
    """
    deadline = time.monotonic() + seconds
    delay = svc.settings.live.live_poll_interval
    with svc.wakeups.watch(task_id) as watch:
        while True:
            watch.clear()
            task = await run_in_threadpool(svc.store.get_task, task_id)
            if task.status in lc.TERMINAL or time.monotonic() >= deadline:
                return task
            if svc.wakeups.pushing:
                delay = svc.settings.live.live_fallback_poll_interval
            elif poll is not None:
                delay = poll
            elif task.status == lc.QUEUE:  # nothing ends before a worker claims it: back off to 0.25 s
                delay = min(0.25, delay * 1.5)  # (200 queued waiters polling every 20 ms starved the worker)
            else:
                delay = lc.poll_delay(task, svc.settings.live.live_poll_interval, cap=1.0)
            await watch.wait(min(delay, max(0.0, deadline - time.monotonic())))
