"""Task state: claims, the steps the lifecycle builds, events, leases, kill flags, dispatch bookkeeping.

The store applies the :class:`.status.Step` s and :class:`.status.Note` s it is given, each as
one conditional UPDATE (the task's status must be in the step's ``only_from``; with an ``owner``,
that worker must hold it) and the event it appends; which changes are legal is the lifecycle's
(``easel.tasks.lifecycle``). There is no other write of ``tasks.status``. The worker's statements
run on the DBAPI cursor (:class:`.db.Direct`); see :mod:`.db` for the cost.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

from sqlalchemy import bindparam, insert, literal, select, update
from sqlalchemy.engine import Connection

from .db import Database, one_of
from .deliveries import enqueue
from .files import insert_outputs
from .models import Event, Preview, Task
from .status import Note, Step, TaskStatus, statuses

T = Task.__table__.c
_INSERT_EVENT = insert(Event)
_INSERT_PREVIEW = insert(Preview)


# Statements built once per shape (the statuses, the columns written) and reused: see :mod:`.db`.

@lru_cache(maxsize=None)
def _task_update(only_from: tuple[str, ...], owned: bool, columns: tuple[str, ...],
                 returning: tuple[str, ...], bump_seq: bool = True):
    q = update(Task).where(T.id == bindparam("task_id"), one_of(T.status, only_from))
    if owned:
        q = q.where(T.worker_id == bindparam("owner"))
    values: dict = {c: bindparam("v_" + c) for c in columns}
    if bump_seq:
        values["event_seq"] = T.event_seq + 1
    return q.values(**values).returning(*[T[c] for c in returning])


@lru_cache(maxsize=None)
def _claim(from_status: str, to_status: str, time_column: str, skip_locked: bool, by_id: bool = False):
    if by_id:  # the task a broker delivered
        target = T.id == bindparam("task_id")
    else:  # the oldest waiting
        oldest = select(T.id).where(T.status == literal(from_status)).order_by(T.queue_seq, T.id).limit(1)
        if skip_locked:
            oldest = oldest.with_for_update(skip_locked=True)
        target = T.id == oldest.scalar_subquery()
    return (update(Task).where(target, T.status == literal(from_status))
            .values(status=literal(to_status), worker_id=bindparam("owner"), lease_expires_at=bindparam("lease"),
                    event_seq=T.event_seq + 1, **{time_column: bindparam("now")})
            .returning(T.id, T.event_seq))


def _params(task_id: int, owner: str | None, values: dict) -> dict:
    return {"task_id": task_id, "owner": owner, **{"v_" + k: v for k, v in values.items()}}


class TaskState:
    """The writes of a task's state in the database ``db`` (and the kill flag's read)."""

    def __init__(self, db: Database):
        self.db = db

    def claim_next(self, worker_id: str, from_status: str, to_status: str, time_column: str, *, now: float,
                   lease_seconds: float = 60.0, task_id: int | None = None, then: Sequence[Step] = ()) -> int | None:
        """Atomically move the oldest task in ``from_status`` (with ``task_id``: that task only)
        to ``to_status`` for ``worker_id``, stamping ``time_column`` with ``now`` (Unix s), with a
        lease until ``now + lease_seconds``; return its id (None when none is waiting, or
        ``task_id`` is not in ``from_status`` any more). ``then``: further steps of the claimed
        task in the same transaction (the claim and the worker's first stage: one commit).

        One conditional UPDATE: two workers racing for the same row cannot both win. On
        PostgreSQL the candidate row is selected ``FOR UPDATE SKIP LOCKED``, so a worker that
        would lose the race takes the next queued task instead of coming back empty.

        Raises:
            ValueError: a status is not a :class:`TaskStatus`; a step of ``then`` was rejected
                (nothing is written).
        """
        from_status, to_status = TaskStatus(from_status).value, TaskStatus(to_status).value
        stmt = _claim(from_status, to_status, time_column, self.db.skip_locked, task_id is not None)
        params = {"owner": worker_id, "lease": now + lease_seconds, "now": now}
        if task_id is not None:
            params["task_id"] = task_id
        with self.db.write() as conn:
            rows = self.db.direct.rows(conn, stmt, params)
            if not rows:
                return None
            row = rows[0]
            self.db.direct.rows(conn, _INSERT_EVENT, {"task_id": row[0], "type": to_status, "message": "",
                                                      "created_at": now, "seq": row[1]})
            for step in then:
                if not self._step(conn, row[0], step, worker_id, now):
                    raise ValueError(f"the claimed task {row[0]} cannot go on to {step.status}")  # rolled back
            self.db.wakeups.in_transaction(conn, row[0])
        self.db.wakeups.committed(row[0])
        return row[0]

    def _step(self, conn: Connection, task_id: int, step: Step, owner: str | None, now: float) -> bool:
        """One guarded step on ``conn`` (see :meth:`apply`)."""
        values = {"status": step.status, **step.values}
        stmt = _task_update(step.only_from, owner is not None, tuple(sorted(values)), ("callbackurl", "event_seq"))
        rows = self.db.direct.rows(conn, stmt, _params(task_id, owner, values))
        if not rows:
            return False
        url, seq = rows[0]
        self.db.direct.rows(conn, _INSERT_EVENT, {"task_id": task_id, "type": step.status, "message": step.message,
                                                  "created_at": now, "seq": seq})
        if step.webhook and url:
            enqueue(conn, task_id, url, now)
        return True

    def apply(self, task_id: int, steps: Sequence[Step], *, now: float, owner: str | None = None,
              outputs: list[dict] = ()) -> bool:
        """Apply ``steps`` to one task in one transaction, in order, all or none: each sets its
        status and values and appends its event (a step with ``webhook`` also queues a pending
        webhook delivery to the task's ``callbackurl``, if any). False (nothing written) as soon
        as one is rejected: the task's status is not in its ``only_from`` or, with ``owner``,
        another worker holds it. ``outputs`` (:meth:`Files.add_outputs` rows) are inserted in the
        same transaction: stored with the steps, or not at all. ``now`` (Unix s) stamps the events.
        """

        class _Rejected(Exception):
            pass

        try:
            with self.db.write() as conn:
                for step in steps:
                    if not self._step(conn, task_id, step, owner, now):
                        raise _Rejected()
                if outputs:
                    insert_outputs(conn, task_id, outputs, now)
                self.db.wakeups.in_transaction(conn, task_id)
        except _Rejected:
            return False
        self.db.wakeups.committed(task_id)
        return True

    def record(self, task_id: int, change: Step | Note, *, now: float, owner: str | None = None,
               preview: bytes | None = None) -> bool | None:
        """Append one event, a denoising step's (a :class:`Step` to ``task_output``) or one that
        changes no status (a :class:`Note`), with its values; one transaction of two reused
        statements. ``preview``: JPEG bytes stored as the event's :class:`Preview`.

        Returns:
            The task's ``kill_requested`` flag, read in the same transaction (one round trip per
            step), or None when nothing was written because the guard (``only_from`` statuses,
            ``owner`` worker) did not match.
        """
        if isinstance(change, Step):
            type_, values = change.status, {"status": change.status, **change.values}
        else:
            type_, values = change.type, dict(change.values)
        stmt = _task_update(change.only_from, owner is not None, tuple(sorted(values)), ("kill_requested", "event_seq"))
        with self.db.write() as conn:
            rows = self.db.direct.rows(conn, stmt, _params(task_id, owner, values))
            if not rows:
                return None
            row = rows[0]
            self.db.direct.rows(conn, _INSERT_EVENT, {"task_id": task_id, "type": type_, "message": change.message,
                                                      "created_at": now, "seq": row[1]})
            if preview:
                self.db.direct.rows(conn, _INSERT_PREVIEW, {"task_id": task_id, "seq": row[1], "data": bytes(preview)})
            self.db.wakeups.in_transaction(conn, task_id)
        self.db.wakeups.committed(task_id)
        return bool(row[0])

    def renew_lease(self, task_id: int, owner: str, until: float, running: Iterable[str]) -> bool:
        """Extend ``owner``'s lease on a task in ``running`` statuses to ``until`` (Unix s);
        False if it no longer holds it."""
        stmt = _task_update(statuses(running), True, ("lease_expires_at",), ("id",), bump_seq=False)
        with self.db.write() as conn:
            return conn.execute(stmt, {"task_id": task_id, "owner": owner, "v_lease_expires_at": until}).first() \
                is not None

    def request_kill(self, task_id: int, only_from: Iterable[str]) -> bool:
        """Set the task's kill flag if its status is in ``only_from`` (the lifecycle's: the
        running statuses); False (nothing written) otherwise. The status does not change: the
        worker ends the task at its next step."""
        with self.db.write() as conn:
            return conn.execute(update(Task).where(T.id == task_id, one_of(T.status, statuses(only_from)))
                                .values(kill_requested=True)).rowcount == 1

    def mark_dispatched(self, task_id: int, status: str, now: float, due_before: float | None = None) -> bool:
        """Record that ``task_id`` is being published now, if it is still in ``status`` and (with
        ``due_before``) was last published before that time or never; False (nothing written)
        otherwise. The conditional UPDATE makes exactly one of several processes the publisher."""
        with self.db.write() as conn:
            q = update(Task).where(T.id == task_id, T.status == TaskStatus(status).value)
            if due_before is not None:
                q = q.where((T.dispatched_at.is_(None)) | (T.dispatched_at < due_before))
            return conn.execute(q.values(dispatched_at=now)).rowcount == 1

    def clear_dispatched(self, task_id: int, status: str) -> None:
        """Forget a publication that failed (the task is published again at the next pass)."""
        with self.db.write() as conn:
            conn.execute(update(Task).where(T.id == task_id, T.status == TaskStatus(status).value)
                         .values(dispatched_at=None))
