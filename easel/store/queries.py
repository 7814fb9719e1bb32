"""Reads of tasks: one task, listings, counts, queue positions, events and previews, and the
tasks other processes look for (stale leases, due publications). Nothing here writes."""
from __future__ import annotations

import base64
import bisect
from functools import lru_cache
from typing import Iterable

from sqlalchemy import bindparam, case, func, literal, null, select

from .db import Database, one_of
from .models import Event, Preview, Project, Task
from .rows import EventRow, TaskRow
from .status import TaskStatus, statuses

T = Task.__table__.c
_SELECT_TASK = select(*T)
_TASK_BY_ID = _SELECT_TASK.where(T.id == bindparam("task_id"))
_TASK_BY_TOKEN = _SELECT_TASK.where(T.socketaccesstoken == bindparam("token"))
_KILL_REQUESTED = select(T.kill_requested).where(T.id == bindparam("task_id"))
_EVENTS = (select(Event.id, Event.task_id, Event.type, Event.message, Event.created_at, Event.seq,
                  null().label("preview"))
           .where(Event.task_id == bindparam("task_id"), Event.seq > bindparam("after")).order_by(Event.seq))
_EVENTS_WITH_PREVIEWS = (select(Event.id, Event.task_id, Event.type, Event.message, Event.created_at, Event.seq,
                                Preview.data.label("preview"))
                         .outerjoin(Preview, (Preview.task_id == Event.task_id) & (Preview.seq == Event.seq))
                         .where(Event.task_id == bindparam("task_id"), Event.seq > bindparam("after"))
                         .order_by(Event.seq))



@lru_cache(maxsize=None)
def _queue_statements(queue_status: str, others: tuple[str, ...]):
    """The statements of :meth:`Store.queue_positions` (each a walk of the ``(status, queue_seq)`` index)."""
    queued = T.status == literal(queue_status)
    head = select(func.min(T.queue_seq)).where(queued)
    departed = select(func.count()).select_from(
        select(literal(1)).where(one_of(T.status, others), T.queue_seq > bindparam("head"),
                                 T.queue_seq < bindparam("seq")).limit(bindparam("cap")).subquery())
    ahead = select(func.count()).where(queued, T.queue_seq < bindparam("seq"))
    between = (select(T.queue_seq).where(queued, T.queue_seq >= bindparam("lo"), T.queue_seq <= bindparam("hi"))
               .order_by(T.queue_seq))
    return head, departed, ahead, between


class Queries:
    """Reads of the tasks of the database ``db``."""

    def __init__(self, db: Database):
        self.db = db

    def get_task(self, task_id: int | None = None, token: str | None = None) -> TaskRow | None:
        """The task with ``task_id`` (or ``socketaccesstoken`` = ``token``), or None."""
        if task_id is not None:
            rows = self.db.rows(_TASK_BY_ID, {"task_id": task_id})
        else:
            rows = self.db.rows(_TASK_BY_TOKEN, {"token": token})
        return TaskRow(*rows[0]) if rows else None

    def tasks_of(self, project_id: int, limit: int = 20, start: int = 0, status: str | None = None,
                 tool: str | None = None) -> list[TaskRow]:
        """A project's tasks, newest first (only ``status`` / ``tool`` ones, if given). Read through an index on ``project_id`` (``(project_id, tool, id)`` with a
        tool): the page costs O(``start`` + ``limit``), not O(the project's tasks)."""
        q = _SELECT_TASK.where(*self._task_filter(project_id, status, tool))
        return [TaskRow(*r) for r in self.db.rows(q.order_by(T.id.desc()).offset(start).limit(limit), {})]

    def count_tasks(self, project_id: int, status: str | None = None, tool: str | None = None) -> int:
        """How many tasks :meth:`tasks_of` would list without ``start``/``limit``: the project's
        kept count without filters (O(1)); with a filter, a count of the matching rows."""
        with self.db.engine.connect() as conn:
            if not status and not tool:
                n = conn.execute(select(Project.task_count).where(Project.id == project_id)).scalar()
            else:
                n = conn.execute(select(func.count()).select_from(Task)
                                 .where(*self._task_filter(project_id, status, tool))).scalar()
            return int(n or 0)

    @staticmethod
    def _task_filter(project_id: int, status: str | None, tool: str | None) -> list:
        where = [Task.project_id == project_id]
        if status:
            where.append(Task.status == status)
        if tool:
            where.append(Task.tool == tool)
        return where

    def tool_stats(self, ok_status: str) -> dict[str, tuple[int, int, int, float, float]]:
        """Per tool: (runs, successes, failures, last run time, mean run seconds of successes);
        a success ended in ``ok_status`` with ``pexit`` "0", a failure there with any other ``pexit``."""
        with self.db.read() as s:
            ok = (Task.status == ok_status) & (Task.pexit == "0")
            rows = s.execute(select(
                Task.tool, func.count(Task.id), func.sum(case((ok, 1), else_=0)),
                func.sum(case(((Task.status == ok_status) & (Task.pexit != "0"), 1), else_=0)),
                func.max(Task.createtime), func.avg(case((ok, Task.endtime - Task.starttime), else_=None)),
            ).group_by(Task.tool))
            return {r[0]: (int(r[1]), int(r[2] or 0), int(r[3] or 0), float(r[4] or 0), float(r[5] or 0))
                    for r in rows}

    def count_in(self, statuses: Iterable[str], project_id: int | None = None) -> int:
        """Number of tasks in ``statuses`` (of one project, if given)."""
        with self.db.read() as s:
            q = select(func.count(Task.id)).where(Task.status.in_(list(statuses)))
            if project_id is not None:
                q = q.where(Task.project_id == project_id)
            return int(s.scalar(q) or 0)

    def queue_positions(self, queue_status: str, other_statuses: Iterable[str], seqs: Iterable[int],
                        cap: int = 2000) -> dict[int, int]:
        """The queue position (1 = next to be claimed) of queued tasks, by their ``queue_seq``.

        ``queue_seq`` numbers submissions without gaps. For the smallest of ``seqs``, ``s``:
        between the queue's head (the smallest queued ``queue_seq``) and ``s`` every task is still
        queued except those that left the queue out of order, so ``position = s - head + 1 -
        departed``, where ``departed`` counts the tasks in ``other_statuses`` (every status but
        ``queue_status``) with ``head < queue_seq < s``: O(log n + departures out of order), the
        usual case of a first-in first-out queue (a cancelled task, a worker that claimed by id).
        When more than ``cap`` tasks left out of order (queues per model family, a task queued for
        a tool no worker serves), the queued tasks ahead of ``s`` are counted instead: O(queue
        ahead). Neither grows with the finished tasks in the table. The other seqs' positions add
        the queued tasks between (one range read).

        Returns:
            ``{seq: position}`` for each of ``seqs`` still queued when read (others are left out).
        """
        head_q, departed_q, ahead_q, between_q = _queue_statements(queue_status, tuple(other_statuses))
        wanted = sorted(s for s in set(seqs) if s is not None)
        if not wanted:
            return {}
        with self.db.engine.connect() as conn:
            head = conn.execute(head_q).scalar()
            if head is None:
                return {}
            wanted = [s for s in wanted if s >= head]
            if not wanted:
                return {}
            first = wanted[0]
            departed = conn.execute(departed_q, {"head": head, "seq": first, "cap": cap}).scalar() or 0
            if departed < cap:
                position = first - head + 1 - departed
            else:
                position = (conn.execute(ahead_q, {"seq": first}).scalar() or 0) + 1
            queued = [r[0] for r in conn.execute(between_q, {"lo": first, "hi": wanted[-1]})] \
                if len(wanted) > 1 else [first]
        out = {}
        for s in wanted:
            i = bisect.bisect_left(queued, s)
            if i < len(queued) and queued[i] == s:  # still queued
                out[s] = position + i
        return out

    def count_by_tool(self, statuses: Iterable[str]) -> dict[tuple[str, str], int]:
        """Tasks in ``statuses`` counted per ``(tool, status)`` (one grouped query on the status index)."""
        with self.db.read() as s:
            rows = s.execute(select(Task.tool, Task.status, func.count(Task.id))
                             .where(Task.status.in_(list(statuses))).group_by(Task.tool, Task.status))
            return {(tool, status): int(n) for tool, status, n in rows}

    def kill_requested(self, task_id: int) -> bool:
        """Whether a kill of the task was requested (False for no such task)."""
        with self.db.engine.connect() as conn:
            rows = self.db.direct.rows(conn, _KILL_REQUESTED, {"task_id": task_id})
        return bool(rows and rows[0][0])

    def task_by_uuid(self, uuid: str) -> Task | None:
        """The task with this UUID (Wiro's ``taskid`` may be either), or None."""
        with self.db.read() as s:
            return s.scalar(select(Task).where(Task.uuid == uuid))

    def tasks_in(self, wanted: Iterable[str]) -> list[Task]:
        """The tasks in ``wanted`` statuses, by id."""
        with self.db.read() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(statuses(wanted))).order_by(Task.id)))

    def events(self, task_id: int, after_seq: int = 0, previews: bool = False) -> list[EventRow]:
        """The task's events in order, those with ``seq > after_seq`` only (a cursor that cannot
        skip an event: see :attr:`Event.seq`), as :class:`EventRow` s whose ``preview`` is the
        event's preview as base64 text with ``previews``, else None (the images are not read)."""
        # every poll of every watcher: plain tuples off the DBAPI cursor (:class:`.db.Direct`)
        with self.db.engine.connect() as conn:
            rows = self.db.direct.rows(conn, _EVENTS_WITH_PREVIEWS if previews else _EVENTS,
                                       {"task_id": task_id, "after": after_seq})
        if not previews:
            return list(map(EventRow._make, rows))
        return [EventRow(*r[:-1], base64.b64encode(r[-1]).decode() if r[-1] is not None else None) for r in rows]

    def previews(self, task_id: int) -> list[Preview]:
        """The task's stored previews, in step order."""
        with self.db.read() as s:
            return list(s.scalars(select(Preview).where(Preview.task_id == task_id).order_by(Preview.seq)))

    def due_for_dispatch(self, status: str, never_before: float, again_before: float | None,
                         limit: int = 500) -> list[Task]:
        """Tasks in ``status`` never published and created before ``never_before``, or (with
        ``again_before``) last published before ``again_before``; oldest first."""
        due = Task.dispatched_at.is_(None) & (Task.createtime < never_before)
        if again_before is not None:
            due = due | (Task.dispatched_at < again_before)
        with self.db.read() as s:
            return list(s.scalars(select(Task).where(Task.status == TaskStatus(status).value, due).order_by(Task.queue_seq, Task.id)
                                  .limit(limit)))


    def stale_tasks(self, running: Iterable[str], now: float, started_before: float | None = None) -> list[Task]:
        """Running tasks whose lease has expired (or was never set), and, with ``started_before``,
        those accepted before that time (over their run-time limit)."""
        cond = (Task.lease_expires_at.is_(None)) | (Task.lease_expires_at < now)
        if started_before is not None:
            cond = cond | (Task.accepttime < started_before)
        with self.db.read() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(statuses(running)), cond).order_by(Task.id)))

