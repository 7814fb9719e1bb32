"""Task statuses, legal transitions, stage times, exit codes and leases: the one writer of task state.

Order of a successful run (Wiro's documented lifecycle)::

    task_queue → task_accept → task_preprocess_start → task_preprocess_end → task_assign
    → task_start → task_output (per step) → task_output_full → task_end
    → task_postprocess_start → task_postprocess_end (pexit "0")

A tool error ends at ``task_postprocess_end`` with ``pexit`` "1" and the message in
``debugerror``. Cancel (queued) and Kill (running) end at ``task_cancel`` (``pexit`` "-1" for a
killed run). Only successful tasks are billed: ``totalcost`` = elapsed seconds × cost per second.

This module is the one writer of a task's status: every change, cancel, requeue and kill
included, is built here as a :class:`~easel.store.Step` whose guard comes from
:data:`TRANSITIONS`, and the store only applies it. Times come from a :class:`~easel.clock.Clock`
(``clock``, default :data:`easel.clock.SYSTEM`), so tests move a ``ManualClock`` instead of sleeping.
"""
from __future__ import annotations

import json
import logging
from functools import cache
from types import MappingProxyType
from typing import Iterable, Mapping, NamedTuple, Sequence

from easel import metrics
from easel.clock import SYSTEM, Clock
from easel.store import Note, Step, Store, Task, TaskStatus
# Wiro's task view (reads only), where callers have always found it: lifecycle.task_view, ...
from easel.tasks.view import LOADING, WAITING, elapsed_seconds, eta_seconds, phase, poll_delay, task_view  # noqa: F401

log = logging.getLogger("easel.lifecycle")

QUEUE = TaskStatus.QUEUE
ACCEPT = TaskStatus.ACCEPT
PREPROCESS_START = TaskStatus.PREPROCESS_START
PREPROCESS_END = TaskStatus.PREPROCESS_END
ASSIGN = TaskStatus.ASSIGN
START = TaskStatus.START
OUTPUT = TaskStatus.OUTPUT
ERROR = "task_error"  # an event type (a log line of a running task), not a status
OUTPUT_FULL = TaskStatus.OUTPUT_FULL
ERROR_FULL = TaskStatus.ERROR_FULL
END = TaskStatus.END
POSTPROCESS_START = TaskStatus.POSTPROCESS_START
POSTPROCESS_END = TaskStatus.POSTPROCESS_END
CANCEL = TaskStatus.CANCEL

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
# a claimed task that has not ended: every status with a way out but the queue's
RUNNING = tuple(s for s, nexts in TRANSITIONS.items() if nexts and s != QUEUE)
KILLABLE = tuple(s for s in RUNNING if CANCEL in TRANSITIONS[s])  # a kill ends at task_cancel
# the table names every status once, and the claim (queue -> accept) and the ends are where they belong
assert set(TRANSITIONS) == set(TaskStatus) and ACCEPT in TRANSITIONS[QUEUE]
assert set(TERMINAL) == {s for s, n in TRANSITIONS.items() if not n}


@cache
def allowed_from(status: str) -> tuple[str, ...]:
    """The statuses from which a task may move to ``status`` (the guard of every write)."""
    return tuple(s for s, nexts in TRANSITIONS.items() if status in nexts)


def step(status: str, message: str = "", *, among: Iterable[str] | None = None, webhook: bool | None = None,
         **values) -> Step:
    """The :class:`~easel.store.Step` to ``status``: taken only from the statuses
    :data:`TRANSITIONS` allows (and, with ``among``, only from those of them: a policy such as
    "Cancel only a queued task"), setting ``values`` (never ``status``) and appending the event
    with ``message``. ``webhook`` (default: whether ``status`` is terminal) queues the webhook.

    Raises:
        ValueError: no status of ``among`` may move to ``status`` (a policy the table forbids),
            or ``values`` holds ``status``.
    """
    only_from = allowed_from(status)
    if among is not None:
        wanted = set(among)
        only_from = tuple(s for s in only_from if s in wanted)
        if not only_from:
            raise ValueError(f"no status of {sorted(wanted)} may move to {status}")
    return Step(status, only_from, message, status in TERMINAL if webhook is None else webhook, values)


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
          preprocess: bool = False, clock: Clock = SYSTEM) -> int | None:
    """Take the oldest queued task for ``worker_id`` (``task_accept``) with a lease of
    ``lease_seconds``; None when the queue is empty.

    With ``task_id`` (an executor delivered that id), take that task only, and only if it is
    still queued: None when it was already claimed, cancelled or ended, or does not exist, so a
    message delivered twice (a broker's redelivery, a re-publication) runs nothing twice.
    
    With ``preprocess``, the claimed task also enters ``task_preprocess_start`` in the same
    transaction (a worker that prepares it at once: one commit, not two).
    """
    now = clock.now()
    then = [step(PREPROCESS_START, **_stamped(PREPROCESS_START, now, lease_seconds, {}))] if preprocess else []
    return store.claim_next(worker_id, QUEUE, ACCEPT, TIME_COLUMN[ACCEPT], now=now, lease_seconds=lease_seconds,
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


class Stage(NamedTuple):
    """One transition of :func:`advance_through`: the new ``status``, the event's ``message``, and
    column ``values`` to write with it (e.g. ``{"pexit": "0"}``)."""

    status: str
    message: str = ""
    values: Mapping[str, object] = MappingProxyType({})


def advance(store: Store, task_id: int, status: str, message: str = "", *, owner: str | None = None,
            lease_seconds: float | None = None, clock: Clock = SYSTEM, **values) -> bool:
    """Move a task to ``status`` if :data:`TRANSITIONS` allows it from its current status (and,
    with ``owner``, only while that worker holds it), stamping that stage's time column and
    renewing the lease by ``lease_seconds``. A terminal status also queues the webhook.

    Returns:
        False when the transition was rejected (logged, nothing written).
    """
    return advance_through(store, task_id, [Stage(status, message, values)], owner=owner, lease_seconds=lease_seconds,
                           clock=clock)


def advance_through(store: Store, task_id: int, steps: Sequence[Stage], *, owner: str | None = None,
                    lease_seconds: float | None = None, outputs: list[dict] = (), clock: Clock = SYSTEM) -> bool:
    """Several :func:`advance` s in a row, a :class:`Stage` each, written in one
    transaction: all of them (each checked against :data:`TRANSITIONS` from the one before), or
    none. For stages with no work between them (``task_output_full`` ... ``task_postprocess_start``),
    so that they cost one commit instead of one each; watchers see the same events in the same order.
    ``outputs`` (rows of :meth:`Store.add_outputs`) are stored in the same transaction, so a task
    is never ended with some of its outputs, nor are outputs kept for a rejected step.

    Returns:
        False when a step was rejected (logged, nothing written).
    """
    now = clock.now()
    plan = [step(status, message, **_stamped(status, now, lease_seconds, values)) for status, message, values in steps]
    ok = store.apply(task_id, plan, now=now, owner=owner, outputs=outputs)
    if not ok:
        _rejected(store, task_id, " then ".join(s for s, *_ in steps), owner)
    elif any(status in TERMINAL for status, *_ in steps):
        metrics.task_ended(store.get_task(task_id))
    return ok


def progress(store: Store, task_id: int, message: str, info: dict, *, owner: str | None = None,
             lease_seconds: float | None = None, preview: bytes | None = None, clock: Clock = SYSTEM) -> bool | None:
    """Record one denoising step (``task_output`` event, status ``task_output``, latest progress,
    ``preview``: the latent preview's JPEG bytes, if any), renewing the worker's lease, guarded
    like every other write. One transaction of two reused statements (about 0.1-0.2 ms on SQLite).

    Returns:
        The task's kill flag, or None when the write was rejected: the task already ended
        (killed, timed out, its lease expired) or another worker holds it. The caller must stop.
    """
    now = clock.now()
    values = {"progress": json.dumps(info)}
    if lease_seconds is not None:
        values["lease_expires_at"] = now + lease_seconds
    kill = store.record(task_id, step(OUTPUT, message, **values), now=now, owner=owner, preview=preview)
    if kill is None:
        _rejected(store, task_id, OUTPUT, owner)
    return kill


def preprocess_progress(store: Store, task_id: int, message: str, info: dict, *, owner: str | None = None,
                        lease_seconds: float | None = None, clock: Clock = SYSTEM) -> bool | None:
    """Record progress of the preprocess phase (weights downloading: ``info["task"]``
    "Downloading"): a ``task_output`` event and the latest progress, the status staying
    ``task_preprocess_start``, renewing the worker's lease. Returns as :func:`progress`."""
    now = clock.now()
    values = {"progress": json.dumps(info)}
    if lease_seconds is not None:
        values["lease_expires_at"] = now + lease_seconds
    kill = store.record(task_id, Note(OUTPUT, (PREPROCESS_START,), message, values), now=now, owner=owner)
    if kill is None:
        _rejected(store, task_id, OUTPUT, owner)
    return kill


def log_event(store: Store, task_id: int, type_: str, message: str, owner: str | None = None, *,
              clock: Clock = SYSTEM) -> bool:
    """Append a log event (``task_error``) to a running task; False (not written) once it ended."""
    return store.record(task_id, Note(type_, RUNNING, message), now=clock.now(), owner=owner) is not None


def queue_positions(store: Store, tasks: list) -> dict[int, int]:
    """Task id -> queue position (1 = next to run) of the queued ones among ``tasks`` (O(log n)
    each, see :meth:`Store.queue_positions`); a task claimed meanwhile is left out."""
    queued = {t.queue_seq: t.id for t in tasks if t.status == QUEUE and getattr(t, "queue_seq", None) is not None}
    if not queued:
        return {}
    others = tuple(s for s in TRANSITIONS if s != QUEUE)
    return {queued[seq]: pos for seq, pos in store.queue_positions(QUEUE, others, list(queued)).items()}


def cancel(store: Store, task_id: int, *, clock: Clock = SYSTEM) -> bool:
    """Cancel a queued task; False if it is no longer queued (Wiro: not in a cancellable state)."""
    now = clock.now()
    if not store.apply(task_id, [step(CANCEL, among=(QUEUE,), canceltime=now)], now=now):
        return False
    metrics.task_ended(store.get_task(task_id))
    return True


def request_kill(store: Store, task_id: int) -> bool:
    """Ask the worker running ``task_id`` to stop at its next step; False if it is not running."""
    return store.request_kill(task_id, KILLABLE)


def finish_killed(store: Store, task_id: int, owner: str | None = None, *, clock: Clock = SYSTEM) -> None:
    """End a task whose kill was requested (``task_cancel``, ``pexit`` "-1"), by its worker."""
    advance(store, task_id, CANCEL, owner=owner, pexit=KILLED_PEXIT, debugerror="Task was killed by request.",
            clock=clock)


def fail(store: Store, task: Task, reason: str, owner: str | None = None, *, clock: Clock = SYSTEM) -> bool:
    """End a running task as failed in one step (``task_postprocess_end``, ``pexit`` "1",
    ``reason`` appended to ``debugerror``): used by a process other than the one running it."""
    now = clock.now()
    ok = store.apply(task.id, [step(POSTPROCESS_END, pexit="1", lease_expires_at=None,
                                    debugerror=(task.debugerror + "\n" if task.debugerror else "") + reason,
                                    endtime=task.endtime or now, postprocessendtime=now)], now=now, owner=owner)
    if not ok:
        _rejected(store, task.id, POSTPROCESS_END, owner)
    else:
        metrics.task_ended(store.get_task(task.id))
    return ok


def requeue(store: Store, task: Task, *, clock: Clock = SYSTEM) -> bool:
    """Put a task that never started back in the queue (its worker is gone). Its publication is
    forgotten (``dispatched_at``), so a broker executor delivers its id again."""
    back = step(QUEUE, among=NOT_STARTED, worker_id="", lease_expires_at=None, accepttime=None,
                preprocessstarttime=None, preprocessendtime=None, assigntime=None, dispatched_at=None)
    return store.apply(task.id, [back], now=clock.now(), owner=task.worker_id)


def expire_leases(store: Store, lease_seconds: float, task_timeout: float = 0.0,
                  requeue_unstarted: bool = False, clock: Clock = SYSTEM) -> dict[int, str]:
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
    now = clock.now()
    started_before = now - task_timeout - lease_seconds if task_timeout > 0 else None
    done: dict[int, str] = {}
    for task in store.stale_tasks(RUNNING, now, started_before):
        over_time = started_before is not None and task.accepttime is not None and task.accepttime < started_before
        if over_time:
            if fail(store, task, TIMEOUT_MESSAGE.format(seconds=task_timeout), owner=task.worker_id, clock=clock):
                done[task.id] = "timed out"
        elif requeue_unstarted and task.status in NOT_STARTED and requeue(store, task, clock=clock):
            done[task.id] = "requeued"
        elif fail(store, task, LEASE_EXPIRED_MESSAGE.format(seconds=lease_seconds), owner=task.worker_id,
                  clock=clock):
            done[task.id] = "failed"
    return done


def recover_interrupted(store: Store, lease_seconds: float = 60.0, **kw) -> list[int]:
    """Start-up recovery: :func:`expire_leases` (tasks of other live servers keep running)."""
    return list(expire_leases(store, lease_seconds, **kw))


def fail_worker_tasks(store: Store, worker_id: str, reason: str, *, clock: Clock = SYSTEM) -> list[int]:
    """End as failed (``pexit`` "1", ``reason`` in ``debugerror``) every task that ``worker_id``
    was running: its process died, so nothing else will finish them. Returns their ids."""
    return [task.id for task in store.tasks_in(RUNNING)
            if task.worker_id == worker_id and fail(store, task, reason, owner=worker_id, clock=clock)]
