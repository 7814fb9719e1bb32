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
import logging
import time
from typing import Callable

from easel import metrics, strict
from easel.store import Output, Store, Task

log = logging.getLogger("easel.lifecycle")

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
NOT_STARTED = (ACCEPT, PREPROCESS_START, PREPROCESS_END, ASSIGN)  # no inference has run yet

# Every legal status change: current status -> statuses it may move to. Forward along Wiro's
# order; a failure jumps to the end (task_output_full ... task_postprocess_end, or straight to
# task_postprocess_end when another process ends it); a kill ends at task_cancel; a task that
# never started may go back to the queue (lease-expiry policy). task_output -> task_output is
# the per-step progress write. Terminal statuses have no way out: a task that ended never changes.
_FAIL = {OUTPUT_FULL, POSTPROCESS_END, CANCEL}
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUE: frozenset({ACCEPT, CANCEL}),
    ACCEPT: frozenset({PREPROCESS_START, QUEUE, *_FAIL}),
    PREPROCESS_START: frozenset({PREPROCESS_END, QUEUE, *_FAIL}),
    PREPROCESS_END: frozenset({ASSIGN, QUEUE, *_FAIL}),
    ASSIGN: frozenset({START, QUEUE, *_FAIL}),
    START: frozenset({OUTPUT, *_FAIL}),
    OUTPUT: frozenset({OUTPUT, *_FAIL}),
    OUTPUT_FULL: frozenset({ERROR_FULL, POSTPROCESS_END, CANCEL}),
    ERROR_FULL: frozenset({END, POSTPROCESS_END, CANCEL}),
    END: frozenset({POSTPROCESS_START, POSTPROCESS_END, CANCEL}),
    POSTPROCESS_START: frozenset({POSTPROCESS_END, CANCEL}),
    POSTPROCESS_END: frozenset(),
    CANCEL: frozenset(),
}


def allowed_from(status: str) -> tuple[str, ...]:
    """The statuses from which a task may move to ``status`` (the guard of every write)."""
    return tuple(s for s, nexts in TRANSITIONS.items() if status in nexts)


def _rejected(store: Store, task_id: int, status: str, owner: str | None) -> None:
    task = store.get_task(task_id)
    log.warning("task %s: transition to %s rejected (status %s, held by %r, writer %r)", task_id, status,
                task.status if task else "missing", task.worker_id if task else "", owner)


KILLED_PEXIT = "-1"
INTERRUPTED_MESSAGE = ("The server stopped while this task was running; it was not restarted because a "
                       "task that was mid-run may be what stopped the worker. Submit it again.")
# The same message ends a task that a worker abandons at a denoising step because the server is
# shutting down (SIGTERM) or its process is gone (SIGKILL): one outcome, whichever way it stopped.
LEASE_EXPIRED_MESSAGE = ("The worker running this task stopped renewing its lease for {seconds:.0f} s (its process "
                         "or machine stopped, or it hung), so another Easel process ended the task. Submit it again.")
TIMEOUT_MESSAGE = ("The task ran longer than this server's limit of {seconds:.0f} s (EASEL_TASK_TIMEOUT_SECONDS) "
                   "and was stopped.")


def submit(store: Store, *, project_id: int, tool: str, parameters: dict, inputs: dict,
           callbackurl: str, cost_per_second: float, uuid: str | None = None,
           idempotency_key: str | None = None, max_unfinished: int = 0) -> tuple[Task, bool]:
    """Store a new queued task (durable before the caller acknowledges it).

    With ``max_unfinished`` > 0 the project may have at most that many unfinished (queued or
    running) tasks; the count and the insert are one atomic step in the store, so concurrent Runs
    on any number of API processes cannot overshoot it.

    Returns:
        ``(task, created)``; ``created`` is False when ``idempotency_key`` was already used by the
        project, and ``task`` is then the first task submitted with it.

    Raises:
        easel.store.LimitReached: the project is at ``max_unfinished``.
    """
    return store.create_task(project_id=project_id, tool=tool, status=QUEUE, parameters=parameters, inputs=inputs,
                             callbackurl=callbackurl, cost_per_second=cost_per_second, first_event=QUEUE, uuid=uuid,
                             idempotency_key=idempotency_key, max_unfinished=max_unfinished,
                             unfinished=(QUEUE, *RUNNING))


def claim(store: Store, worker_id: str, lease_seconds: float = 60.0, task_id: int | None = None, *,
          preprocess: bool = False) -> int | None:
    """Take the oldest queued task for ``worker_id`` (``task_accept``) with a lease of
    ``lease_seconds``; None when the queue is empty.

    With ``task_id`` (an executor delivered that id), take that task only, and only if it is
    still queued: None when it was already claimed, cancelled or ended, or does not exist, so a
    message delivered twice (a broker's redelivery, a re-publication) runs nothing twice.
    
    With ``preprocess``, the claimed task also enters ``task_preprocess_start`` in the same
    transaction (a worker that prepares it at once: one commit, not two).
    """
    then = []
    if preprocess:
        then.append((PREPROCESS_START, allowed_from(PREPROCESS_START), "", False,
                     _stamped(PREPROCESS_START, time.time(), lease_seconds, {})))
    return store.claim_next(worker_id, QUEUE, ACCEPT, TIME_COLUMN[ACCEPT], lease_seconds=lease_seconds,
                            task_id=task_id, then=then)


def _stamped(status: str, now: float, lease_seconds: float | None, values: dict) -> dict:
    """``values`` with the stage's time column and the lease a write to ``status`` sets."""
    values = dict(values)
    if status in TIME_COLUMN:
        values.setdefault(TIME_COLUMN[status], now)
    if lease_seconds is not None:
        values["lease_expires_at"] = now + lease_seconds
    if status in TERMINAL:
        values["lease_expires_at"] = None
    return values


def advance(store: Store, task_id: int, status: str, message: str = "", *, owner: str | None = None,
            lease_seconds: float | None = None, **values) -> bool:
    """Move a task to ``status`` if :data:`TRANSITIONS` allows it from its current status (and,
    with ``owner``, only while that worker holds it), stamping that stage's time column and
    renewing the lease by ``lease_seconds``. A terminal status also queues the webhook.

    Returns:
        False when the transition was rejected (logged, nothing written).
    """
    return advance_through(store, task_id, [(status, message, values)], owner=owner, lease_seconds=lease_seconds)


def advance_through(store: Store, task_id: int, steps: list[tuple[str, str, dict]], *, owner: str | None = None,
                    lease_seconds: float | None = None, outputs: list[dict] = ()) -> bool:
    """Several :func:`advance` s in a row, ``(status, message, values)`` each, written in one
    transaction: all of them (each checked against :data:`TRANSITIONS` from the one before), or
    none. For stages with no work between them (``task_output_full`` ... ``task_postprocess_start``),
    so that they cost one commit instead of one each; watchers see the same events in the same order.
    ``outputs`` (rows of :meth:`Store.add_outputs`) are stored in the same transaction, so a task
    is never ended with some of its outputs, nor are outputs kept for a rejected step.

    Returns:
        False when a step was rejected (logged, nothing written).
    """
    now = time.time()
    plan = [(status, allowed_from(status), message, status in TERMINAL, _stamped(status, now, lease_seconds, values))
            for status, message, values in steps]
    ok = store.transitions(task_id, plan, owner=owner, outputs=outputs) if len(plan) > 1 or outputs else \
        store.transition(task_id, plan[0][0], only_from=plan[0][1], owner=owner, event_message=plan[0][2],
                         webhook=plan[0][3], **plan[0][4])
    if not ok:
        _rejected(store, task_id, " then ".join(s for s, *_ in steps), owner)
    elif any(status in TERMINAL for status, *_ in steps):
        metrics.task_ended(store.get_task(task_id))
    return ok


def progress(store: Store, task_id: int, message: str, info: dict, *, owner: str | None = None,
             lease_seconds: float | None = None, preview: bytes | None = None) -> bool | None:
    """Record one denoising step (``task_output`` event, status ``task_output``, latest progress,
    ``preview``: the latent preview's JPEG bytes, if any), renewing the worker's lease, guarded
    like every other write. One transaction of two reused statements (about 0.1-0.2 ms on SQLite).

    Returns:
        The task's kill flag, or None when the write was rejected: the task already ended
        (killed, timed out, its lease expired) or another worker holds it. The caller must stop.
    """
    values = {"progress": json.dumps(info), "status": OUTPUT}
    if lease_seconds is not None:
        values["lease_expires_at"] = time.time() + lease_seconds
    kill = store.add_event(task_id, OUTPUT, message, preview=preview, only_from=allowed_from(OUTPUT), owner=owner,
                           **values)
    if kill is None:
        _rejected(store, task_id, OUTPUT, owner)
    return kill


def preprocess_progress(store: Store, task_id: int, message: str, info: dict, *, owner: str | None = None,
                        lease_seconds: float | None = None) -> bool | None:
    """Record progress of the preprocess phase (weights downloading: ``info["task"]``
    "Downloading"): a ``task_output`` event and the latest progress, the status staying
    ``task_preprocess_start``, renewing the worker's lease. Returns as :func:`progress`."""
    values = {"progress": json.dumps(info)}
    if lease_seconds is not None:
        values["lease_expires_at"] = time.time() + lease_seconds
    kill = store.add_event(task_id, OUTPUT, message, only_from=(PREPROCESS_START,), owner=owner, **values)
    if kill is None:
        _rejected(store, task_id, OUTPUT, owner)
    return kill


def log_event(store: Store, task_id: int, type_: str, message: str, owner: str | None = None) -> bool:
    """Append a log event (``task_error``) to a running task; False (not written) once it ended."""
    return store.add_event(task_id, type_, message, only_from=RUNNING, owner=owner) is not None


def queue_positions(store: Store, tasks: list) -> dict[int, int]:
    """Task id -> queue position (1 = next to run) of the queued ones among ``tasks`` (O(log n)
    each, see :meth:`Store.queue_positions`); a task claimed meanwhile is left out."""
    queued = {t.queue_seq: t.id for t in tasks if t.status == QUEUE and getattr(t, "queue_seq", None) is not None}
    if not queued:
        return {}
    others = tuple(s for s in TRANSITIONS if s != QUEUE)
    return {queued[seq]: pos for seq, pos in store.queue_positions(QUEUE, others, list(queued)).items()}


def cancel(store: Store, task_id: int) -> bool:
    """Cancel a queued task; False if it is no longer queued (Wiro: not in a cancellable state)."""
    if not store.transition(task_id, CANCEL, only_from=(QUEUE,), canceltime=time.time(), webhook=True):
        return False
    metrics.task_ended(store.get_task(task_id))
    return True


def request_kill(store: Store, task_id: int) -> bool:
    """Ask the worker running ``task_id`` to stop at its next step; False if it is not running."""
    return store.request_kill(task_id, RUNNING)


def finish_killed(store: Store, task_id: int, owner: str | None = None) -> None:
    advance(store, task_id, CANCEL, owner=owner, pexit=KILLED_PEXIT, debugerror="Task was killed by request.")


def fail(store: Store, task: Task, reason: str, owner: str | None = None) -> bool:
    """End a running task as failed in one step (``task_postprocess_end``, ``pexit`` "1",
    ``reason`` appended to ``debugerror``): used by a process other than the one running it."""
    now = time.time()
    ok = store.transition(task.id, POSTPROCESS_END, only_from=allowed_from(POSTPROCESS_END), owner=owner,
                          pexit="1", webhook=True, lease_expires_at=None,
                          debugerror=(task.debugerror + "\n" if task.debugerror else "") + reason,
                          endtime=task.endtime or now, postprocessendtime=now)
    if not ok:
        _rejected(store, task.id, POSTPROCESS_END, owner)
    else:
        metrics.task_ended(store.get_task(task.id))
    return ok


def requeue(store: Store, task: Task) -> bool:
    """Put a task that never started back in the queue (its worker is gone). Its publication is
    forgotten (``dispatched_at``), so a broker executor delivers its id again."""
    return store.transition(task.id, QUEUE, only_from=tuple(s for s in NOT_STARTED if s in allowed_from(QUEUE)),
                            owner=task.worker_id, worker_id="", lease_expires_at=None, accepttime=None,
                            preprocessstarttime=None, preprocessendtime=None, assigntime=None,
                            dispatched_at=None)


def expire_leases(store: Store, lease_seconds: float, task_timeout: float = 0.0,
                  requeue_unstarted: bool = False) -> dict[int, str]:
    """End the running tasks nobody is running any more; safe to call from any process, any time.

    A task whose worker's lease has expired is failed with :data:`LEASE_EXPIRED_MESSAGE` (or, if
    it never reached ``task_start`` and ``requeue_unstarted``, queued again). With
    ``task_timeout`` > 0, a task accepted more than ``task_timeout`` + ``lease_seconds`` seconds
    ago is failed with :data:`TIMEOUT_MESSAGE` (its worker normally stops it at the limit itself).
    Each write is conditional on the task's status and worker, so a task that its worker is
    still finishing, or that another process just ended, is left alone.

    Returns:
        task id -> "failed", "timed out" or "requeued", for the tasks this call changed.
    """
    now = time.time()
    started_before = now - task_timeout - lease_seconds if task_timeout > 0 else None
    done: dict[int, str] = {}
    for task in store.stale_tasks(RUNNING, now, started_before):
        over_time = started_before is not None and task.accepttime is not None and task.accepttime < started_before
        if over_time:
            if fail(store, task, TIMEOUT_MESSAGE.format(seconds=task_timeout), owner=task.worker_id):
                done[task.id] = "timed out"
        elif requeue_unstarted and task.status in NOT_STARTED and requeue(store, task):
            done[task.id] = "requeued"
        elif fail(store, task, LEASE_EXPIRED_MESSAGE.format(seconds=lease_seconds), owner=task.worker_id):
            done[task.id] = "failed"
    return done


def recover_interrupted(store: Store, lease_seconds: float = 60.0, **kw) -> list[int]:
    """Start-up recovery: :func:`expire_leases` (tasks of other live servers keep running)."""
    return list(expire_leases(store, lease_seconds, **kw))


def fail_worker_tasks(store: Store, worker_id: str, reason: str) -> list[int]:
    """End as failed (``pexit`` "1", ``reason`` in ``debugerror``) every task that ``worker_id``
    was running: its process died, so nothing else will finish them. Returns their ids."""
    return [task.id for task in store.tasks_in(RUNNING)
            if task.worker_id == worker_id and fail(store, task, reason, owner=worker_id)]


def _t(value: float | None) -> str:
    return str(int(value)) if value else "0"


def elapsed_seconds(task: Task) -> float:
    """Run time from ``task_start`` (or accept) to the end (or now, while running)."""
    begin = task.starttime or task.accepttime
    if not begin:
        return 0.0
    end = task.endtime or task.canceltime or (None if task.status not in TERMINAL else task.postprocessendtime)
    return max(0.0, (end or time.time()) - begin)


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
