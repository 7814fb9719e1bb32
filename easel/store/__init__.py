"""The task store: engine set-up, Alembic migrations and every query Easel makes.

The store knows tables, not meanings: status names and which transitions are legal live in
``easel.tasks.lifecycle``, which passes them in. Every write commits before it returns, so a task
is durable before the API acknowledges it.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import uuid as uuidlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from sqlalchemy import case, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import Event, Nonce, Output, Project, Task, UserFile, WebhookDelivery
from .notify import Publisher

__all__ = ["Store", "Project", "Task", "Output", "Event", "WebhookDelivery", "UserFile", "new_token", "hash_apikey",
           "LimitReached"]

HERE = Path(__file__).parent


def hash_apikey(apikey: str) -> str:
    """How an API key is stored: ``sha256:<hex>`` (a key is 128 random bits, so no salt or slow
    hash is needed). The API secret is not hashed: Wiro's signature is an HMAC keyed with it."""
    return "sha256:" + hashlib.sha256(apikey.encode("utf-8", "surrogatepass")).hexdigest()


def _protect(path: Path) -> None:
    """Owner-only permissions (0600 files, 0700 folders); ignored where the OS refuses."""
    try:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    except OSError:
        pass


def new_token(n: int = 30) -> str:
    """A random alphanumeric token of ``n`` characters (Wiro's socketaccesstoken shape)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


class LimitReached(Exception):
    """:meth:`Store.create_task` refused a task: the project already has ``limit`` unfinished tasks."""

    def __init__(self, limit: int):
        super().__init__(f"the project already has {limit} unfinished tasks")
        self.limit = limit


# first key of the PostgreSQL advisory lock that serialises one project's task creation when a
# concurrency limit is set ("EASL"); the second key is the project id
_PROJECT_LOCK = 0x4541534C


class Store:
    """Access to the database at ``url`` (SQLite by default; PostgreSQL works with the same schema).

    ``wakeups`` is told about every event this store inserts (:mod:`easel.store.notify`): in the
    transaction (``pg_notify``) and after its commit (Redis, in-process waiters); default
    :meth:`Publisher.default_for` the URL (``LISTEN/NOTIFY`` on PostgreSQL, else nothing).
    """

    def __init__(self, url: str, wakeups: Publisher | None = None):
        self.url = url
        self.wakeups = wakeups or Publisher.default_for(url)
        kwargs: dict = {}
        db_file = None
        if url.startswith("sqlite"):
            db_file = Path(url.split("///", 1)[1])
            db_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _protect(db_file.parent)  # the database holds API secrets (needed for HMAC): owner only
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL: API and workers read while one writes
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
                for suffix in ("", "-wal", "-shm"):
                    f = Path(f"{db_file}{suffix}")
                    if f.exists():
                        _protect(f)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent). On PostgreSQL the upgrade
        holds a transaction-scoped advisory lock, so the processes of a fleet starting together
        migrate one after the other (the others then find the schema current)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config(str(HERE / "alembic.ini"))
        cfg.set_main_option("script_location", str(HERE / "migrations"))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7345021)"))  # any fixed key: "easel migrations"
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s:
            with s.begin():
                yield s

    # -- projects and nonces ---------------------------------------------------------------

    def create_project(self, name: str, auth_mode: str = "signature", nonce_policy: str = "lenient") -> Project:
        """Create a project. The API key is stored only as its hash (:func:`hash_apikey`); the
        returned (detached) object carries the plaintext key, the only time it is available.

        Raises:
            ValueError: ``auth_mode`` not ``signature``/``apikey`` or ``nonce_policy`` not ``lenient``/``strict``.
        """
        if auth_mode not in ("signature", "apikey"):
            raise ValueError("auth_mode must be 'signature' or 'apikey'")
        if nonce_policy not in ("lenient", "strict"):
            raise ValueError("nonce_policy must be 'lenient' or 'strict'")
        apikey = secrets.token_hex(16)
        p = Project(name=name, apikey=hash_apikey(apikey), apisecret=secrets.token_hex(24),
                    auth_mode=auth_mode, nonce_policy=nonce_policy, created_at=time.time())
        with self.session() as s:
            s.add(p)
        p.apikey = apikey  # detached: not written back
        return p

    def set_nonce_policy(self, apikey: str, nonce_policy: str) -> Project | None:
        """Change the nonce policy of the project with ``apikey``; None if there is none."""
        if nonce_policy not in ("lenient", "strict"):
            raise ValueError("nonce_policy must be 'lenient' or 'strict'")
        with self.session() as s:
            s.execute(update(Project).where(Project.apikey == hash_apikey(apikey)).values(nonce_policy=nonce_policy))
        return self.project_by_key(apikey)

    def project_by_key(self, apikey: str) -> Project | None:
        """The project whose API key is ``apikey`` (looked up by hash), or None."""
        with self.session() as s:
            return s.scalar(select(Project).where(Project.apikey == hash_apikey(apikey)))

    def project_by_id(self, project_id: int) -> Project | None:
        with self.session() as s:
            return s.get(Project, project_id)

    def use_nonce(self, project_id: int, nonce: str, retention_seconds: float) -> bool:
        """Record ``nonce`` for the project; False if it was already used (a replay)."""
        now = time.time()
        try:
            with self.session() as s:
                s.execute(delete(Nonce).where(Nonce.created_at < now - retention_seconds))
                s.add(Nonce(project_id=project_id, nonce=nonce, created_at=now))
            return True
        except IntegrityError:
            return False

    # -- tasks --------------------------------------------------------------------------------

    def create_task(self, *, project_id: int, tool: str, status: str, parameters: dict, inputs: dict,
                    callbackurl: str, cost_per_second: float, first_event: str, uuid: str | None = None,
                    idempotency_key: str | None = None, max_unfinished: int = 0,
                    unfinished: Iterable[str] = ()) -> tuple[Task, bool]:
        """Insert a task and its first event.

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
        now = time.time()
        t = Task(uuid=uuid or str(uuidlib.uuid4()), project_id=project_id, tool=tool,
                 socketaccesstoken=new_token(), file_accesskey=new_token(), status=status,
                 parameters=json.dumps(parameters), inputs=json.dumps(inputs), callbackurl=callbackurl,
                 debugoutput="", debugerror="", pexit=None, progress="", cost_per_second=cost_per_second,
                 kill_requested=False, worker_id="", createtime=now, idempotency_key=idempotency_key or None,
                 event_seq=1)
        try:
            with self.session() as s:
                if max_unfinished > 0:
                    self._lock_project(s, project_id)
                    if idempotency_key:  # a retry that raced its first attempt is that task, not over the limit
                        first = s.scalar(select(Task).where(Task.project_id == project_id,
                                                            Task.idempotency_key == idempotency_key))
                        if first is not None:
                            return first, False
                    n = s.scalar(select(func.count(Task.id)).where(Task.project_id == project_id,
                                                                    Task.status.in_(list(unfinished))))
                    if int(n or 0) >= max_unfinished:
                        raise LimitReached(max_unfinished)
                s.add(t)
                s.flush()
                s.add(Event(task_id=t.id, type=first_event, message="", created_at=now, seq=1))
        except IntegrityError:
            existing = self.task_by_idempotency(project_id, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return existing, False
        # no wake-up: nobody can be waiting on a task before this call returns its id and token
        return t, True

    @staticmethod
    def _lock_project(s: Session, project_id: int) -> None:
        """Serialise the rest of this transaction with every other one that locks the project."""
        if s.get_bind().dialect.name == "postgresql":
            s.execute(select(func.pg_advisory_xact_lock(_PROJECT_LOCK, project_id)))
        else:  # SQLite: a write as the transaction's first statement takes the database's write lock
            s.execute(update(Project).where(Project.id == project_id).values(id=Project.id)
                      .execution_options(synchronize_session=False))

    def task_by_idempotency(self, project_id: int, key: str) -> Task | None:
        with self.session() as s:
            return s.scalar(select(Task).where(Task.project_id == project_id, Task.idempotency_key == key))

    def tasks_of(self, project_id: int, limit: int = 20, start: int = 0, status: str | None = None,
                 tool: str | None = None) -> list[Task]:
        """A project's tasks, newest first (only ``status`` / ``tool`` ones, if given)."""
        with self.session() as s:
            q = select(Task).where(*self._task_filter(project_id, status, tool))
            return list(s.scalars(q.order_by(Task.id.desc()).offset(start).limit(limit)))

    def count_tasks(self, project_id: int, status: str | None = None, tool: str | None = None) -> int:
        """How many tasks :meth:`tasks_of` would list without ``start``/``limit``."""
        with self.session() as s:
            return int(s.scalar(select(func.count(Task.id)).where(*self._task_filter(project_id, status, tool))) or 0)

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
        with self.session() as s:
            ok = (Task.status == ok_status) & (Task.pexit == "0")
            rows = s.execute(select(
                Task.tool, func.count(Task.id), func.sum(case((ok, 1), else_=0)),
                func.sum(case(((Task.status == ok_status) & (Task.pexit != "0"), 1), else_=0)),
                func.max(Task.createtime), func.avg(case((ok, Task.endtime - Task.starttime), else_=None)),
            ).group_by(Task.tool))
            return {r[0]: (int(r[1]), int(r[2] or 0), int(r[3] or 0), float(r[4] or 0), float(r[5] or 0))
                    for r in rows}

    def count_in(self, statuses: Iterable[str], project_id: int | None = None, before_id: int | None = None) -> int:
        """Number of tasks in ``statuses`` (of one project / with a smaller id, if given)."""
        with self.session() as s:
            q = select(func.count(Task.id)).where(Task.status.in_(list(statuses)))
            if project_id is not None:
                q = q.where(Task.project_id == project_id)
            if before_id is not None:
                q = q.where(Task.id < before_id)
            return int(s.scalar(q) or 0)

    def count_by_tool(self, statuses: Iterable[str]) -> dict[tuple[str, str], int]:
        """Tasks in ``statuses`` counted per ``(tool, status)`` (one grouped query on the status index)."""
        with self.session() as s:
            rows = s.execute(select(Task.tool, Task.status, func.count(Task.id))
                             .where(Task.status.in_(list(statuses))).group_by(Task.tool, Task.status))
            return {(tool, status): int(n) for tool, status, n in rows}

    def get_task(self, task_id: int | None = None, token: str | None = None) -> Task | None:
        with self.session() as s:
            if task_id is not None:
                return s.get(Task, task_id)
            return s.scalar(select(Task).where(Task.socketaccesstoken == token))

    def claim_next(self, worker_id: str, from_status: str, to_status: str, time_column: str,
                   lease_seconds: float = 60.0, task_id: int | None = None) -> int | None:
        """Atomically move the oldest task in ``from_status`` (with ``task_id``: that task only)
        to ``to_status`` for ``worker_id`` with a lease until now + ``lease_seconds``; return its
        id (None when none is waiting, or ``task_id`` is not in ``from_status`` any more).

        One conditional UPDATE: two workers racing for the same row cannot both win. On
        PostgreSQL the candidate row is selected ``FOR UPDATE SKIP LOCKED``, so a worker that
        would lose the race takes the next queued task instead of coming back empty.
        """
        now = time.time()
        with self.engine.begin() as conn:
            if task_id is not None:
                target = Task.id == task_id
            else:
                oldest = select(Task.id).where(Task.status == from_status).order_by(Task.id).limit(1)
                if conn.dialect.name == "postgresql":
                    oldest = oldest.with_for_update(skip_locked=True)
                target = Task.id == oldest.scalar_subquery()
            row = conn.execute(
                update(Task).where(target, Task.status == from_status)
                .values(status=to_status, worker_id=worker_id, lease_expires_at=now + lease_seconds,
                        event_seq=Task.event_seq + 1, **{time_column: now})
                .returning(Task.id, Task.event_seq)
            ).first()
            if row is None:
                return None
            conn.execute(insert(Event).values(task_id=row[0], type=to_status, message="", created_at=now, seq=row[1]))
            self.wakeups.in_transaction(conn, row[0])
        self.wakeups.committed(row[0])
        return row[0]

    @staticmethod
    def _guarded(q, only_from: Iterable[str] | None, owner: str | None):
        if only_from is not None:
            q = q.where(Task.status.in_(list(only_from)))
        if owner is not None:
            q = q.where(Task.worker_id == owner)
        return q

    def transition(self, task_id: int, status: str, *, only_from: Iterable[str] | None = None,
                   owner: str | None = None, event_message: str = "", webhook: bool = False, **values) -> bool:
        """Set ``status`` (and other columns) and append the event; False (nothing written) if the
        task's status is not in ``only_from`` or, with ``owner``, another worker holds it.

        With ``webhook``, a pending :class:`WebhookDelivery` to the task's ``callbackurl`` (if any)
        is inserted in the same transaction, so a terminal task never loses its webhook. (SQL
        Core, not the ORM: this and :meth:`add_event` run on every step, and Core halves their cost.)
        """
        now = time.time()
        with self.engine.begin() as conn:
            q = self._guarded(update(Task).where(Task.id == task_id), only_from, owner)
            row = conn.execute(q.values(status=status, event_seq=Task.event_seq + 1, **values)
                               .returning(Task.callbackurl, Task.event_seq)).first()
            if row is None:
                return False
            url, seq = row
            conn.execute(insert(Event).values(task_id=task_id, type=status, message=event_message, created_at=now,
                                              seq=seq))
            if webhook and url:
                conn.execute(insert(WebhookDelivery).values(
                    id="msg_" + secrets.token_hex(16), task_id=task_id, url=url, status="pending", attempts=0,
                    next_attempt_at=now, created_at=now, last_error=""))
            self.wakeups.in_transaction(conn, task_id)
        self.wakeups.committed(task_id)
        return True

    def add_event(self, task_id: int, type_: str, message: str = "", preview: str | None = None, *,
                  only_from: Iterable[str] | None = None, owner: str | None = None, **values) -> bool | None:
        """Append an event (e.g. ``task_output`` progress, ``task_error``); may update columns.

        Returns the task's ``kill_requested`` flag, read in the same transaction (one round trip
        per step), or None when nothing was written because the guard (``only_from`` statuses,
        ``owner`` worker) did not match.
        """
        with self.engine.begin() as conn:
            q = self._guarded(update(Task).where(Task.id == task_id), only_from, owner)
            row = conn.execute(q.values(event_seq=Task.event_seq + 1, **values)
                               .returning(Task.kill_requested, Task.event_seq)).first()
            if row is None:
                return None
            conn.execute(insert(Event).values(task_id=task_id, type=type_, message=message, created_at=time.time(),
                                              preview=preview, seq=row[1]))
            self.wakeups.in_transaction(conn, task_id)
        self.wakeups.committed(task_id)
        return bool(row[0])

    def mark_dispatched(self, task_id: int, status: str, now: float, due_before: float | None = None) -> bool:
        """Record that ``task_id`` is being published now, if it is still in ``status`` and (with
        ``due_before``) was last published before that time or never; False (nothing written)
        otherwise. The conditional UPDATE makes exactly one of several processes the publisher."""
        with self.engine.begin() as conn:
            q = update(Task).where(Task.id == task_id, Task.status == status)
            if due_before is not None:
                q = q.where((Task.dispatched_at.is_(None)) | (Task.dispatched_at < due_before))
            return conn.execute(q.values(dispatched_at=now)).rowcount == 1

    def clear_dispatched(self, task_id: int, status: str) -> None:
        """Forget a publication that failed (the task is published again at the next pass)."""
        with self.engine.begin() as conn:
            conn.execute(update(Task).where(Task.id == task_id, Task.status == status).values(dispatched_at=None))

    def due_for_dispatch(self, status: str, never_before: float, again_before: float | None,
                         limit: int = 500) -> list[Task]:
        """Tasks in ``status`` never published and created before ``never_before``, or (with
        ``again_before``) last published before ``again_before``; oldest first."""
        due = Task.dispatched_at.is_(None) & (Task.createtime < never_before)
        if again_before is not None:
            due = due | (Task.dispatched_at < again_before)
        with self.session() as s:
            return list(s.scalars(select(Task).where(Task.status == status, due).order_by(Task.id).limit(limit)))

    def renew_lease(self, task_id: int, owner: str, until: float, running: Iterable[str]) -> bool:
        """Extend ``owner``'s lease on a running task to ``until``; False if it no longer holds it."""
        with self.engine.begin() as conn:
            q = update(Task).where(Task.id == task_id, Task.worker_id == owner, Task.status.in_(list(running)))
            return conn.execute(q.values(lease_expires_at=until)).rowcount == 1

    def stale_tasks(self, running: Iterable[str], now: float, started_before: float | None = None) -> list[Task]:
        """Running tasks whose lease has expired (or was never set), and, with ``started_before``,
        those accepted before that time (over their run-time limit)."""
        cond = (Task.lease_expires_at.is_(None)) | (Task.lease_expires_at < now)
        if started_before is not None:
            cond = cond | (Task.accepttime < started_before)
        with self.session() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(list(running)), cond).order_by(Task.id)))

    def request_kill(self, task_id: int, running: Iterable[str]) -> bool:
        with self.session() as s:
            res = s.execute(update(Task).where(Task.id == task_id, Task.status.in_(list(running)))
                            .values(kill_requested=True))
            return res.rowcount == 1

    def kill_requested(self, task_id: int) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(Task.kill_requested).where(Task.id == task_id)))

    def task_by_uuid(self, uuid: str) -> Task | None:
        with self.session() as s:
            return s.scalar(select(Task).where(Task.uuid == uuid))

    def ended_before(self, statuses: Iterable[str], before: float, limit: int = 500) -> list[Task]:
        """Tasks in (terminal) ``statuses`` that ended before ``before`` (epoch seconds), oldest first."""
        ended = func.coalesce(Task.postprocessendtime, Task.canceltime, Task.createtime)
        with self.session() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(list(statuses)), ended < before)
                                  .order_by(Task.id).limit(limit)))

    def thin_events(self, statuses: Iterable[str], before: float, types: Iterable[str]) -> int:
        """Delete the events of ``types`` of tasks in (terminal) ``statuses`` that ended before
        ``before`` (epoch seconds), in one statement; returns how many were deleted."""
        ended = func.coalesce(Task.postprocessendtime, Task.canceltime, Task.createtime)
        old = select(Task.id).where(Task.status.in_(list(statuses)), ended < before)
        with self.session() as s:
            return s.execute(delete(Event).where(Event.type.in_(list(types)), Event.task_id.in_(old))).rowcount or 0

    def tasks_in(self, statuses: Iterable[str]) -> list[Task]:
        with self.session() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(list(statuses))).order_by(Task.id)))

    def events(self, task_id: int, after_seq: int = 0) -> list[Event]:
        """The task's events in order, those with ``seq > after_seq`` only (a cursor that cannot
        skip an event: see :attr:`Event.seq`)."""
        with self.session() as s:
            return list(s.scalars(select(Event).where(Event.task_id == task_id, Event.seq > after_seq)
                                  .order_by(Event.seq)))

    # -- webhooks -----------------------------------------------------------------------------

    def lease_due_deliveries(self, now: float, lease_seconds: float, limit: int = 20) -> list[WebhookDelivery]:
        """Pending deliveries whose time has come, each leased (``next_attempt_at`` pushed by
        ``lease_seconds``) with a conditional UPDATE so two dispatchers never send the same attempt."""
        with self.session() as s:
            due = list(s.scalars(select(WebhookDelivery).where(
                WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at).limit(limit)))
        leased = []
        for d in due:
            with self.session() as s:
                res = s.execute(update(WebhookDelivery).where(
                    WebhookDelivery.id == d.id, WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at == d.next_attempt_at).values(next_attempt_at=now + lease_seconds))
                if res.rowcount == 1:
                    leased.append(d)
        return leased

    def update_delivery(self, delivery_id: str, only_pending: bool = True, **values) -> bool:
        with self.session() as s:
            q = update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
            if only_pending:
                q = q.where(WebhookDelivery.status == "pending")
            return s.execute(q.values(**values)).rowcount == 1

    def deliveries(self, task_id: int) -> list[WebhookDelivery]:
        with self.session() as s:
            return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.task_id == task_id)))

    def drop_deliveries(self, task_id: int) -> int:
        """Mark the task's pending deliveries ``dropped``; returns how many."""
        with self.session() as s:
            return s.execute(update(WebhookDelivery).where(
                WebhookDelivery.task_id == task_id, WebhookDelivery.status == "pending")
                .values(status="dropped", last_error="task inputs and outputs were deleted")).rowcount

    def delete_outputs(self, task_id: int) -> list[Output]:
        """Remove the task's output rows; return them (the caller removes the files)."""
        with self.session() as s:
            rows = list(s.scalars(select(Output).where(Output.task_id == task_id)))
            s.execute(delete(Output).where(Output.task_id == task_id))
            return rows

    # -- outputs ------------------------------------------------------------------------------

    def add_outputs(self, task_id: int, outputs: list[dict]) -> None:
        with self.session() as s:
            for o in outputs:
                s.add(Output(id=secrets.token_hex(16), task_id=task_id, addedtime=time.time(), **o))

    def outputs(self, task_id: int) -> list[Output]:
        with self.session() as s:
            return list(s.scalars(select(Output).where(Output.task_id == task_id).order_by(Output.name)))

    def output_by_key(self, accesskey: str, name: str) -> Output | None:
        with self.session() as s:
            return s.scalar(select(Output).join(Task, Task.id == Output.task_id)
                            .where(Task.file_accesskey == accesskey, Output.name == name))

    # -- Files API ----------------------------------------------------------------------------

    def root_folder(self, project_id: int) -> UserFile:
        """The project's default folder (created on first use)."""
        with self.session() as s:
            root = s.scalar(select(UserFile).where(UserFile.project_id == project_id, UserFile.is_folder.is_(True),
                                                   UserFile.parent_id == "", UserFile.name == "root"))
            if root is None:
                root = UserFile(id=secrets.token_hex(16), project_id=project_id, parent_id="", is_folder=True,
                                name="root", contenttype="", size=0, path="", accesskey="", addedtime=time.time())
                s.add(root)
            return root

    def add_user_file(self, **values) -> UserFile:
        """Insert a folder or file row (``id``, ``addedtime`` and ``accesskey`` filled in when absent)."""
        values.setdefault("id", secrets.token_hex(16))
        values.setdefault("addedtime", time.time())
        values.setdefault("accesskey", "" if values.get("is_folder") else new_token())
        row = UserFile(**values)
        with self.session() as s:
            s.add(row)
        return row

    def user_file(self, project_id: int, file_id: str) -> UserFile | None:
        """A project's folder or file by id (None if it belongs to another project)."""
        with self.session() as s:
            return s.scalar(select(UserFile).where(UserFile.id == file_id, UserFile.project_id == project_id))

    def user_file_by_name(self, project_id: int, name: str) -> UserFile | None:
        """The project's most recently uploaded file called ``name`` (any folder)."""
        with self.session() as s:
            return s.scalar(select(UserFile).where(UserFile.project_id == project_id, UserFile.name == name,
                                                   UserFile.is_folder.is_(False))
                            .order_by(UserFile.addedtime.desc()).limit(1))

    def user_file_by_key(self, accesskey: str, name: str) -> UserFile | None:
        with self.session() as s:
            return s.scalar(select(UserFile).where(UserFile.accesskey == accesskey, UserFile.name == name,
                                                   UserFile.is_folder.is_(False)))
