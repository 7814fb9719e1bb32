"""Submission: new tasks, inserted by group commit (several Runs, one transaction).

A task enters the store only here, queued, with its first event; a project's concurrency limit
and its ``Idempotency-Key`` are decided in the same transaction.
"""
from __future__ import annotations

import json
import threading
import uuid as uuidlib
from typing import Iterable

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from .db import Database, new_token
from .models import Counter, Event, Project, Task
from .rows import TASK_DEFAULTS, TaskRow
from .status import TaskStatus, statuses

QUEUE_SEQ = "task_queue_seq"  # the Counter row that numbers submissions
T = Task.__table__.c
_SELECT_TASK = select(*T)
_INSERT_EVENT = insert(Event)
_INSERT_TASK = insert(Task).returning(T.id)
# group commit (Submission.create_task): a batch of tasks in one statement each
_INSERT_TASKS = insert(Task).returning(T.id, sort_by_parameter_order=True)
_ADVANCE_QUEUE_SEQ = (update(Counter).where(Counter.name == QUEUE_SEQ).values(value=Counter.value + bindparam("n"))
                      .returning(Counter.value))
_COUNT_PROJECT_TASKS = (update(Project).where(Project.id == bindparam("pid"))
                        .values(task_count=Project.task_count + bindparam("n")))


class LimitReached(Exception):
    """:meth:`Submission.create_task` refused a task: the project already has ``limit`` unfinished tasks."""

    def __init__(self, limit: int):
        super().__init__(f"the project already has {limit} unfinished tasks")
        self.limit = limit


class _NewTask:
    """One :meth:`Submission.create_task` call waiting for its group's commit (see :class:`_GroupCommit`)."""

    __slots__ = ("values", "first_event", "max_unfinished", "unfinished", "done", "lead", "result", "error")

    def __init__(self, values: dict, first_event: str, max_unfinished: int, unfinished: tuple):
        self.values, self.first_event = values, first_event
        self.max_unfinished, self.unfinished = max_unfinished, unfinished
        self.done = threading.Event()
        self.lead = False  # set by the previous leader: this call commits the next group
        self.result: tuple | None = None
        self.error: BaseException | None = None

    def outcome(self) -> tuple:
        """This call's ``(task, created)``; raises the error its group gave it."""
        if self.error is not None:
            raise self.error
        return self.result


class _GroupCommit:
    """Group commit of new tasks: the ``create_task`` calls of this process that arrive while a
    write is in progress are inserted together, in one transaction with one statement per table.

    Leader/follower, no thread of its own: the first caller leads, takes the store's write turn,
    then every call queued by then, inserts them and commits; followers wait for their result.
    Calls that arrived meanwhile get a new leader (the oldest of them), so no caller serves others
    for longer than one group. Under concurrent Runs this replaces N commits, N write turns and 4N
    statements by one commit, one turn and about four statements (the server's own cost, issue 14;
    docs/design.md). Each call's result is exactly what inserting it alone would give, in order:
    a project's concurrency limit counts the tasks admitted earlier in the group, and an
    ``Idempotency-Key`` used earlier in the group returns that task."""

    def __init__(self):
        self.mutex = threading.Lock()
        self.queue: list[_NewTask] = []
        self.leading = False

    def join(self, job: _NewTask) -> bool:
        """Queue ``job``; True when the caller must lead (no group is being written)."""
        with self.mutex:
            self.queue.append(job)
            if self.leading:
                return False
            self.leading = True
            return True

    def take(self) -> list[_NewTask]:
        """The calls queued so far (the leader inserts them), leaving the queue empty."""
        with self.mutex:
            group, self.queue = self.queue, []
            return group

    def hand_over(self) -> None:
        """After a group: make the oldest waiting call the next leader, or stop leading."""
        with self.mutex:
            if not self.queue:
                self.leading = False
                return
            nxt = self.queue[0]
        nxt.lead = True
        nxt.done.set()


# first key of the PostgreSQL advisory lock that serialises one project's task creation when a
# concurrency limit is set ("EASL"); the second key is the project id
_PROJECT_LOCK = 0x4541534C


class Submission:
    """New tasks of the database ``db`` (one :class:`_GroupCommit` per process and database object)."""

    def __init__(self, db: Database):
        self.db = db
        self._group = _GroupCommit()

    def create_task(self, *, project_id: int, tool: str, status: str, parameters: dict, inputs: dict,
                    callbackurl: str, cost_per_second: float, first_event: str, uuid: str | None = None,
                    idempotency_key: str | None = None, max_unfinished: int = 0,
                    unfinished: Iterable[str] = ()) -> tuple[TaskRow, bool]:
        """Insert a task and its first event (the task as a :class:`TaskRow`).

        Concurrent calls in this process are committed together (:class:`_GroupCommit`); the task
        is durable when this returns, as if inserted alone. Not to be called by a thread that holds
        this store's write turn (it could wait for a leader that waits for that turn).

        With ``max_unfinished`` > 0, the project's tasks in ``unfinished`` statuses are counted
        and the task inserted in one transaction that holds the project's lock (a PostgreSQL
        advisory lock on PostgreSQL, the database's write lock on SQLite), so concurrent Runs,
        from any number of API processes, never exceed the limit together.

        Returns:
            ``(task, created)``. With an ``idempotency_key`` already used by the project, the
            existing task and ``False`` (also when two requests race: the unique constraint, or
            with a limit the project's lock, decides; a retry is never refused for the limit).

        Raises:
            LimitReached: the project already has ``max_unfinished`` unfinished tasks.
        """
        now = self.db.clock.now()
        values = dict(uuid=uuid or str(uuidlib.uuid4()), project_id=project_id, tool=tool,
                      socketaccesstoken=new_token(), file_accesskey=new_token(), status=TaskStatus(status).value,
                      parameters=json.dumps(parameters), inputs=json.dumps(inputs), callbackurl=callbackurl,
                      debugoutput="", debugerror="", pexit=None, progress="", cost_per_second=cost_per_second,
                      kill_requested=False, worker_id="", createtime=now, idempotency_key=idempotency_key or None,
                      event_seq=1, lease_expires_at=None)
        job = _NewTask(values, first_event, max_unfinished, statuses(unfinished))
        if not self._group.join(job):
            job.done.wait()
            if not job.lead:
                return job.outcome()
        self._commit_group()
        # no wake-up: nobody can be waiting on a task before this call returns its id and token
        return job.outcome()

    def _commit_group(self) -> None:
        """Lead one group of :meth:`create_task` calls: insert, commit, settle, hand over."""
        group: list[_NewTask] = []
        try:
            with self.db.write() as conn:
                group = self._group.take()  # every call queued while this one waited for the write turn
                self._insert_group(conn, group)
        except IntegrityError:
            # an Idempotency-Key raced another process's transaction (PostgreSQL): each call
            # alone, where the unique constraint decides which task is the first
            for job in group:
                try:
                    job.result, job.error = self._create_alone(job), None
                except BaseException as exc:  # noqa: BLE001 - raised in that call's own thread
                    job.result, job.error = None, exc
        except BaseException as exc:  # the write failed (or never began): the whole group fails with it
            group = group or self._group.take()
            for job in group:
                job.result, job.error = None, exc
        finally:
            for job in group:
                job.done.set()
            self._group.hand_over()

    def _insert_group(self, conn: Connection, group: list[_NewTask]) -> None:
        """Insert ``group`` (in order) in the transaction of ``conn``, setting each call's result
        or error (:class:`LimitReached`); raises what the database raises."""
        admitted: list[_NewTask] = []
        first_of_key: dict[tuple, _NewTask] = {}
        unfinished_now: dict[int, int] = {}  # limited projects: unfinished tasks, with this group's
        retries: list[tuple[_NewTask, _NewTask]] = []
        # the limited projects' locks first, in one order in every process: two groups (two API
        # processes on PostgreSQL) never wait for each other's locks in a circle
        for pid in sorted({job.values["project_id"] for job in group if job.max_unfinished > 0}):
            self._lock_project(conn, pid)
        for job in group:
            v = job.values
            pid, key = v["project_id"], v["idempotency_key"]
            job.result, job.error = None, None
            if key:
                same = first_of_key.get((pid, key))
                if same is not None:  # a retry within the group: the first call's task (once inserted)
                    retries.append((job, same))
                    continue
                first = conn.execute(_SELECT_TASK.where(T.project_id == pid, T.idempotency_key == key)).first()
                if first is not None:
                    job.result = (TaskRow(*first), False)
                    continue
            if job.max_unfinished > 0:
                if pid not in unfinished_now:
                    n = conn.execute(select(func.count()).select_from(Task).where(
                        T.project_id == pid, T.status.in_(list(job.unfinished)))).scalar()
                    unfinished_now[pid] = int(n or 0) + sum(1 for a in admitted if a.values["project_id"] == pid)
                if unfinished_now[pid] >= job.max_unfinished:
                    job.error = LimitReached(job.max_unfinished)
                    continue
            if pid in unfinished_now:
                unfinished_now[pid] += 1
            if key:
                first_of_key[(pid, key)] = job
            admitted.append(job)
        if not admitted:
            return
        last = conn.execute(_ADVANCE_QUEUE_SEQ, {"n": len(admitted)}).scalar_one()
        for i, job in enumerate(admitted):
            job.values["queue_seq"] = last - len(admitted) + 1 + i
        if len(admitted) == 1:
            ids = [conn.execute(_INSERT_TASK, admitted[0].values).scalar_one()]
        else:
            ids = conn.execute(_INSERT_TASKS, [job.values for job in admitted]).scalars().all()
        per_project: dict[int, int] = {}
        for job, task_id in zip(admitted, ids, strict=True):
            job.values["id"] = task_id
            job.result = (TaskRow(**{**TASK_DEFAULTS, **job.values}), True)
            per_project[job.values["project_id"]] = per_project.get(job.values["project_id"], 0) + 1
        conn.execute(_INSERT_EVENT, [{"task_id": job.values["id"], "type": job.first_event, "message": "",
                                      "created_at": job.values["createtime"], "seq": 1} for job in admitted])
        conn.execute(_COUNT_PROJECT_TASKS, [{"pid": pid, "n": n} for pid, n in sorted(per_project.items())])
        for job, first in retries:
            job.result = (first.result[0], False)

    def _create_alone(self, job: _NewTask) -> tuple:
        """One call in a transaction of its own (the fallback of a group that hit a unique key)."""
        try:
            with self.db.write() as conn:
                self._insert_group(conn, [job])
        except IntegrityError:
            key = job.values["idempotency_key"]
            existing = self.task_by_idempotency(job.values["project_id"], key) if key else None
            if existing is None:
                raise
            return existing, False
        return job.outcome()

    @staticmethod
    def _lock_project(conn: Connection, project_id: int) -> None:
        """Serialise the rest of this transaction with every other one that locks the project."""
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(_PROJECT_LOCK, project_id)))
        else:  # SQLite: a write as the transaction's first statement takes the database's write lock
            conn.execute(update(Project).where(Project.id == project_id).values(id=Project.id))

    def task_by_idempotency(self, project_id: int, key: str) -> TaskRow | None:
        """The project's task submitted with ``Idempotency-Key`` ``key``, or None."""
        rows = self.db.rows(_SELECT_TASK.where(T.project_id == project_id, T.idempotency_key == key), {})
        return TaskRow(*rows[0]) if rows else None
