"""The task store: engine set-up, Alembic migrations and every query Easel makes.

The store knows tables, not meanings: status names and which transitions are legal live in
``easel.tasks.lifecycle``, which passes them in. Every write commits before it returns, so a task
is durable before the API acknowledges it.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid as uuidlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from sqlalchemy import create_engine, delete, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import Event, Nonce, Output, Project, Task, WebhookDelivery

__all__ = ["Store", "Project", "Task", "Output", "Event", "WebhookDelivery", "new_token"]

HERE = Path(__file__).parent


def new_token(n: int = 30) -> str:
    """A random alphanumeric token of ``n`` characters (Wiro's socketaccesstoken shape)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


class Store:
    """Access to the database at ``url`` (SQLite by default; PostgreSQL works with the same schema)."""

    def __init__(self, url: str):
        self.url = url
        kwargs: dict = {}
        if url.startswith("sqlite"):
            Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
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
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config(str(HERE / "alembic.ini"))
        cfg.set_main_option("script_location", str(HERE / "migrations"))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s:
            with s.begin():
                yield s

    # -- projects and nonces ---------------------------------------------------------------

    def create_project(self, name: str, auth_mode: str = "signature") -> Project:
        if auth_mode not in ("signature", "apikey"):
            raise ValueError("auth_mode must be 'signature' or 'apikey'")
        p = Project(name=name, apikey=secrets.token_hex(16), apisecret=secrets.token_hex(24),
                    auth_mode=auth_mode, created_at=time.time())
        with self.session() as s:
            s.add(p)
        return p

    def project_by_key(self, apikey: str) -> Project | None:
        with self.session() as s:
            return s.scalar(select(Project).where(Project.apikey == apikey))

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
                    idempotency_key: str | None = None) -> tuple[Task, bool]:
        """Insert a task and its first event.

        Returns:
            ``(task, created)``. With an ``idempotency_key`` already used by the project, the
            existing task and ``False`` (also when two requests race: the unique constraint decides).
        """
        now = time.time()
        t = Task(uuid=uuid or str(uuidlib.uuid4()), project_id=project_id, tool=tool,
                 socketaccesstoken=new_token(), file_accesskey=new_token(), status=status,
                 parameters=json.dumps(parameters), inputs=json.dumps(inputs), callbackurl=callbackurl,
                 debugoutput="", debugerror="", pexit=None, progress="", cost_per_second=cost_per_second,
                 kill_requested=False, worker_id="", createtime=now, idempotency_key=idempotency_key or None)
        try:
            with self.session() as s:
                s.add(t)
                s.flush()
                s.add(Event(task_id=t.id, type=first_event, message="", created_at=now))
        except IntegrityError:
            existing = self.task_by_idempotency(project_id, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return existing, False
        return t, True

    def task_by_idempotency(self, project_id: int, key: str) -> Task | None:
        with self.session() as s:
            return s.scalar(select(Task).where(Task.project_id == project_id, Task.idempotency_key == key))

    def tasks_of(self, project_id: int, limit: int = 20, start: int = 0, status: str | None = None) -> list[Task]:
        """A project's tasks, newest first."""
        with self.session() as s:
            q = select(Task).where(Task.project_id == project_id)
            if status:
                q = q.where(Task.status == status)
            return list(s.scalars(q.order_by(Task.id.desc()).offset(start).limit(limit)))

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

    def claim_next(self, worker_id: str, from_status: str, to_status: str, time_column: str) -> int | None:
        """Atomically move the oldest task in ``from_status`` to ``to_status``; return its id.

        One conditional UPDATE: two workers racing for the same row cannot both win, on SQLite
        (single writer) or PostgreSQL (row lock, then the WHERE is re-checked).
        """
        now = time.time()
        with self.session() as s:
            oldest = select(Task.id).where(Task.status == from_status).order_by(Task.id).limit(1).scalar_subquery()
            row = s.execute(
                update(Task).where(Task.id == oldest, Task.status == from_status)
                .values(status=to_status, worker_id=worker_id, **{time_column: now})
                .returning(Task.id)
            ).first()
            if row is None:
                return None
            s.add(Event(task_id=row[0], type=to_status, message="", created_at=now))
            return row[0]

    def transition(self, task_id: int, status: str, *, only_from: Iterable[str] | None = None,
                   event_message: str = "", webhook: bool = False, **values) -> bool:
        """Set ``status`` (and other columns) and append the event; False if ``only_from`` did not match.

        With ``webhook``, a pending :class:`WebhookDelivery` to the task's ``callbackurl`` (if any)
        is inserted in the same transaction, so a terminal task never loses its webhook. (SQL
        Core, not the ORM: this and :meth:`add_event` run on every step, and Core halves their cost.)
        """
        now = time.time()
        with self.engine.begin() as conn:
            q = update(Task).where(Task.id == task_id)
            if only_from is not None:
                q = q.where(Task.status.in_(list(only_from)))
            url = conn.execute(q.values(status=status, **values).returning(Task.callbackurl)).scalar_one_or_none()
            if url is None:
                return False
            conn.execute(insert(Event).values(task_id=task_id, type=status, message=event_message, created_at=now))
            if webhook and url:
                conn.execute(insert(WebhookDelivery).values(
                    id="msg_" + secrets.token_hex(16), task_id=task_id, url=url, status="pending", attempts=0,
                    next_attempt_at=now, created_at=now, last_error=""))
            return True

    def add_event(self, task_id: int, type_: str, message: str = "", preview: str | None = None, **values) -> bool:
        """Append an event without changing status (e.g. ``task_output`` progress); may update columns.

        Returns the task's ``kill_requested`` flag, read in the same transaction (one round trip per step).
        """
        with self.engine.begin() as conn:
            if values:
                kill = conn.execute(update(Task).where(Task.id == task_id).values(**values)
                                    .returning(Task.kill_requested)).scalar_one_or_none()
            else:
                kill = conn.execute(select(Task.kill_requested).where(Task.id == task_id)).scalar_one_or_none()
            conn.execute(insert(Event).values(task_id=task_id, type=type_, message=message, created_at=time.time(),
                                              preview=preview))
            return bool(kill)

    def update_task(self, task_id: int, **values) -> None:
        with self.session() as s:
            s.execute(update(Task).where(Task.id == task_id).values(**values))

    def request_kill(self, task_id: int, running: Iterable[str]) -> bool:
        with self.session() as s:
            res = s.execute(update(Task).where(Task.id == task_id, Task.status.in_(list(running)))
                            .values(kill_requested=True))
            return res.rowcount == 1

    def kill_requested(self, task_id: int) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(Task.kill_requested).where(Task.id == task_id)))

    def tasks_in(self, statuses: Iterable[str]) -> list[Task]:
        with self.session() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(list(statuses))).order_by(Task.id)))

    def events(self, task_id: int, after_id: int = 0) -> list[Event]:
        """The task's events in order, those with ``id > after_id`` only."""
        with self.session() as s:
            return list(s.scalars(select(Event).where(Event.task_id == task_id, Event.id > after_id)
                                  .order_by(Event.id)))

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
