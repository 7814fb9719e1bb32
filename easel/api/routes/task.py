"""Wiro's Task endpoints: ``POST /v1/Task/Detail``, ``Cancel``, ``Kill``, ``InputOutputDelete``
and, beyond Wiro, ``List`` (the project's tasks, newest first).

Each takes the task by ``taskid``, ``tasktoken`` or ``socketaccesstoken`` (:func:`views.find_task`)
and answers Wiro's envelope. Kill asks the worker to stop and then waits, on the task's pushed
wake-ups (a poll where there are none), up to :data:`KILL_WAIT_SECONDS` for the task to end, so
that its answer usually shows the final ``task_cancel`` state.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from easel import strict
from easel.store import Project, Task
from easel.tasks import lifecycle as lc

from .. import compat, deps, toolinfo, views
from .. import errors as E
from ..deps import WiroCall
from ..errors import WiroError
from ..parsing import Body
from ..services import Services

router = APIRouter()
KILL_WAIT_SECONDS = 10.0  # Kill answers with the final state when the worker acknowledges within this
KILL_POLL_SECONDS = 0.1  # how often Kill reads the task where no wake-up is pushed (SQLite)


@router.post("/v1/Task/Detail", summary="Task status, times, logs and outputs")
async def detail(wiro: WiroCall = Depends(deps.wiro)):
    svc, project, body = wiro.svc, wiro.project, wiro.body
    return deps.respond(await deps.call(svc, lambda: compat.detail_data(
        views.tasklist(svc, views.find_task(svc, project, body.fields))), reads=True))


@router.post("/v1/Task/Cancel", summary="Cancel a queued task")
async def cancel(wiro: WiroCall = Depends(deps.wiro)):
    svc, project, body = wiro.svc, wiro.project, wiro.body
    return deps.respond(await deps.call(svc, cancel_task, svc, project, body))


@router.post("/v1/Task/Kill", summary="Kill a running task (it stops within one denoising step)")
async def kill(wiro: WiroCall = Depends(deps.wiro)):
    svc, project, body = wiro.svc, wiro.project, wiro.body
    task = await deps.call(svc, kill_request, svc, project, body)
    current = await views.wait_for_end(svc, task.id, KILL_WAIT_SECONDS, poll=KILL_POLL_SECONDS)
    return deps.respond(await run_in_threadpool(views.tasklist, svc, current, False))


@router.post("/v1/Task/InputOutputDelete", summary="Delete a finished task's input and output files")
async def input_output_delete(wiro: WiroCall = Depends(deps.wiro)):
    svc, project, body = wiro.svc, wiro.project, wiro.body
    return deps.respond(await deps.call(svc, delete_io, svc, project, body))


@router.post("/v1/Task/List", summary="The project's tasks, newest first (beyond Wiro)")
async def task_list(wiro: WiroCall = Depends(deps.wiro)):
    svc, project, body = wiro.svc, wiro.project, wiro.body
    return deps.respond(await deps.call(svc, list_tasks, svc, project, body.fields, reads=True))


def cancel_task(svc: Services, project: Project, body: Body) -> dict:
    """Task/Cancel: cancel a queued task; its tasklist answer (without ``total``).

    Raises:
        WiroError: code 1 "Task is not in a cancellable state." unless it is queued.
    """
    task = views.find_task(svc, project, body.fields)
    if not lc.cancel(svc.store, task.id):
        raise WiroError(1, E.NOT_CANCELLABLE)
    return views.tasklist(svc, svc.store.get_task(task.id), total=False)


def kill_request(svc: Services, project: Project, body: Body) -> Task:
    """Task/Kill's request: a queued task is cancelled, a running one is asked to stop at its
    next step. Returns the task as it was found.

    Raises:
        WiroError: code 1 when the task is neither queued nor running.
    """
    task = views.find_task(svc, project, body.fields)
    if task.status == lc.QUEUE and lc.cancel(svc.store, task.id):
        return task
    if not lc.request_kill(svc.store, task.id):
        current = svc.store.get_task(task.id)
        raise WiroError(1, f"Task could not be killed: it is not running (status {current.status}).")
    return task


def delete_io(svc: Services, project: Project, body: Body) -> dict:
    """Task/InputOutputDelete: remove a finished task's uploaded inputs and output files (idempotent).

    Raises:
        WiroError: code 1 for an unknown task or one that has not ended.
    """
    task = views.find_task(svc, project, body.fields, not_found=WiroError(1, E.TASK_NOT_EXIST))
    if task.status not in lc.TERMINAL:
        raise WiroError(1, E.NOT_DELETABLE, detail=f"The task is {task.status}.")
    views.delete_files(svc, task)
    return {"result": True, "errors": []}


def list_tasks(svc: Services, project: Project, fields: dict) -> dict:
    """Task/List: the project's tasks, newest first; ``start``, ``limit`` (1-200, default 20),
    ``status`` and the Wiro MCP's ``modelName`` (``owner/slug``, any case or clean form).
    ``total`` counts every match.

    Raises:
        WiroError: code 0 naming ``start`` or ``limit`` when it is not an integer.
    """
    start, limit = int_field(fields, "start", 0, 0, 10**9), int_field(fields, "limit", 20, 1, 200)
    status = str(fields.get("status", "") or "") or None
    tool = None
    model = str(fields.get("modelName", "") or "").strip()
    if model:
        owner, _, slug = model.partition("/")
        spec = toolinfo.find_tool(svc.tools, owner, slug)
        tool = spec.name if spec else model
    tasks = svc.store.tasks_of(project.id, limit=limit, start=start, status=status, tool=tool)
    total = svc.store.count_tasks(project.id, status=status, tool=tool)
    outputs = svc.store.outputs_of(t.id for t in tasks)  # one query for the page, and one per queued task
    positions = lc.queue_positions(svc.store, tasks)
    return {"result": True, "errors": [], "total": str(total),
            "tasklist": [views.task_view(svc, t, outputs[t.id], positions.get(t.id)) for t in tasks]}


def int_field(fields: dict, name: str, default: int, lo: int, hi: int) -> int:
    """``fields[name]`` as an integer clamped to ``[lo, hi]``; ``default`` when absent or blank.

    Raises:
        WiroError: code 0 naming the field when it is not an integer.
    """
    raw = fields.get(name, "")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        return min(hi, max(lo, strict.parse_int(raw, name)))
    except strict.StrictError as exc:
        raise WiroError(0, exc.message) from None
