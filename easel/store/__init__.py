"""The task store: engine set-up, Alembic migrations and every query Easel makes.

The store knows tables, not meanings: status names and which transitions are legal live in
``easel.tasks.lifecycle``, which passes them in. Every write commits before it returns, so a task
is durable before the API acknowledges it.

Cost. The statements that run per request or per denoising step (task reads, claims, transitions,
progress events, outputs) are built once with bound parameters and reused, so SQLAlchemy compiles
each once per process and a call costs what the database does plus ~0.1 ms (building a
statement per call cost 4× that); the worker's per-task and per-step writes (claims,
transitions, progress events) and its kill check run their compiled SQL on the DBAPI cursor
(:class:`_Direct`), about half that again. Their reads return read-only rows (``sqlalchemy.Row``: the
same attribute names as the ORM class) instead of ORM objects. On SQLite, writes of one process
take turns on one lock (one writer at a time, as SQLite allows anyway) instead of racing for the
database lock, whose busy handler sleeps up to 100 ms per retry; the connection pool holds as
many connections as the process has threads that use it, so no connection is opened per request.
"""
from __future__ import annotations

import base64
import bisect
import hashlib
import json
import os
import secrets
import threading
import time
import uuid as uuidlib
from collections import namedtuple
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock (see WriteLock)
    fcntl = None

from sqlalchemy import bindparam, case, create_engine, delete, event, func, insert, literal, null, select, text, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import Counter, Event, Nonce, Output, Preview, Project, Task, UserFile, WebhookDelivery
from .notify import Publisher
from .secretbox import SecretBox, SecretKeyError, rotate_all, seal_and_check

__all__ = ["Store", "Project", "Task", "Output", "Event", "Preview", "WebhookDelivery", "UserFile", "new_token",
           "hash_apikey", "LimitReached", "SecretBox", "SecretKeyError"]

_EventRow = namedtuple("_EventRow", "id task_id type message created_at seq preview")
# a task just written, with Task's attributes (a detached ORM object costs 0.1 ms more to build)
TaskRecord = namedtuple("TaskRecord", [c.key for c in Task.__table__.c], defaults=[None] * len(Task.__table__.c))
# a project as read, with Project's attributes and its API secret opened (secretbox)
ProjectRecord = namedtuple("ProjectRecord", [c.key for c in Project.__table__.c])
QUEUE_SEQ = "task_queue_seq"  # the Counter row that numbers submissions
T = Task.__table__.c
NONCE_SWEEP_SECONDS = 60.0  # how often a strict-nonce check also deletes the expired nonces
WAL_AUTOCHECKPOINT_PAGES = 10_000

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


_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def new_token(n: int = 30) -> str:
    """A random alphanumeric token of ``n`` characters (Wiro's socketaccesstoken shape), from the
    OS's CSPRNG: bytes below 248 (4 × 62) map uniformly onto the 62 characters, others are dropped
    (one ``token_bytes`` call instead of ``n`` ``secrets.choice`` calls: 20× cheaper)."""
    out = ""
    while len(out) < n:
        out += "".join(_ALPHABET[b % 62] for b in secrets.token_bytes(n + 8) if b < 248)
    return out[:n]


def _one_of(column, values: Iterable[str]):
    """``column IN (...)`` over constants, each its own bound value: unlike an "expanding" list
    parameter, the statement compiles once and is reused from SQLAlchemy's cache."""
    return column.in_([literal(v) for v in values])


# Statements built once per shape (the statuses, the columns written) and reused: see the module doc.

@lru_cache(maxsize=None)
def _task_update(only_from: tuple[str, ...] | None, owned: bool, columns: tuple[str, ...],
                 returning: tuple[str, ...], bump_seq: bool = True):
    q = update(Task).where(T.id == bindparam("task_id"))
    if only_from is not None:
        q = q.where(_one_of(T.status, only_from))
    if owned:
        q = q.where(T.worker_id == bindparam("owner"))
    values: dict[str, Any] = {c: bindparam("v_" + c) for c in columns}
    if bump_seq:
        values["event_seq"] = T.event_seq + 1
    return q.values(**values).returning(*[T[c] for c in returning])


_SELECT_TASK = select(*T)
_TASK_BY_ID = _SELECT_TASK.where(T.id == bindparam("task_id"))
_TASK_BY_TOKEN = _SELECT_TASK.where(T.socketaccesstoken == bindparam("token"))
_INSERT_EVENT = insert(Event)
_INSERT_PREVIEW = insert(Preview)
_INSERT_TASK = insert(Task).returning(T.id)
# group commit (Store.create_task): a batch of tasks in one statement each
_INSERT_TASKS = insert(Task).returning(T.id, sort_by_parameter_order=True)
_ADVANCE_QUEUE_SEQ = (update(Counter).where(Counter.name == QUEUE_SEQ).values(value=Counter.value + bindparam("n"))
                      .returning(Counter.value))
_COUNT_PROJECT_TASKS = (update(Project).where(Project.id == bindparam("pid"))
                        .values(task_count=Project.task_count + bindparam("n")))
_OUTPUTS = select(*Output.__table__.c).where(Output.task_id == bindparam("task_id")).order_by(Output.name)
_OUTPUTS_OF = (select(*Output.__table__.c).where(Output.task_id.in_(bindparam("ids", expanding=True)))
               .order_by(Output.task_id, Output.name))
_KILL_REQUESTED = select(T.kill_requested).where(T.id == bindparam("task_id"))
_PROJECT_BY_KEY = select(*Project.__table__.c).where(Project.apikey == bindparam("key"))
_PROJECT_BY_ID = select(*Project.__table__.c).where(Project.id == bindparam("id"))
_EVENTS = (select(Event.id, Event.task_id, Event.type, Event.message, Event.created_at, Event.seq,
                  null().label("preview"))
           .where(Event.task_id == bindparam("task_id"), Event.seq > bindparam("after")).order_by(Event.seq))
_EVENTS_WITH_PREVIEWS = (select(Event.id, Event.task_id, Event.type, Event.message, Event.created_at, Event.seq,
                                Preview.data.label("preview"))
                         .outerjoin(Preview, (Preview.task_id == Event.task_id) & (Preview.seq == Event.seq))
                         .where(Event.task_id == bindparam("task_id"), Event.seq > bindparam("after"))
                         .order_by(Event.seq))


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


@lru_cache(maxsize=None)
def _queue_statements(queue_status: str, others: tuple[str, ...]):
    """The statements of :meth:`Store.queue_positions` (each a walk of the ``(status, queue_seq)`` index)."""
    queued = T.status == literal(queue_status)
    head = select(func.min(T.queue_seq)).where(queued)
    departed = select(func.count()).select_from(
        select(literal(1)).where(_one_of(T.status, others), T.queue_seq > bindparam("head"),
                                 T.queue_seq < bindparam("seq")).limit(bindparam("cap")).subquery())
    ahead = select(func.count()).where(queued, T.queue_seq < bindparam("seq"))
    between = (select(T.queue_seq).where(queued, T.queue_seq >= bindparam("lo"), T.queue_seq <= bindparam("hi"))
               .order_by(T.queue_seq))
    return head, departed, ahead, between


class _Direct:
    """Core statements executed on the DBAPI cursor of a SQLAlchemy connection, inside its
    transaction: each statement is compiled once for the engine's dialect (with the columns the
    call sets, for an INSERT), and a call only orders its parameters and runs the SQL. That skips
    SQLAlchemy's per-execution context and result set-up, about half of a short statement's CPU
    (0.107 → 0.058 ms for a progress step's UPDATE + INSERT on SQLite). For the worker's
    statements that run per task and per step; no expanding parameters, no type processing (the
    columns are integers, floats, strings, booleans and bytes, which both drivers take as they
    are), rows are plain tuples."""

    def __init__(self, dialect):
        self.dialect = dialect
        self._compiled: dict[tuple, tuple] = {}

    def rows(self, conn: Connection, stmt, params: dict) -> list[tuple]:
        key = (stmt, tuple(params) if stmt.is_insert else None)
        entry = self._compiled.get(key)
        if entry is None:
            compiled = stmt.compile(dialect=self.dialect, column_keys=list(params) if stmt.is_insert else None)
            entry = self._compiled[key] = (compiled, compiled.string,
                                           compiled.positiontup if compiled.positional else None)
        compiled, sql, order = entry
        values = compiled.construct_params(params)
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(sql, [values[k] for k in order] if order is not None else values)
            # all rows (the statement runs to its end); none where it returns none (DBAPI: no description)
            return cursor.fetchall() if cursor.description is not None else []
        finally:
            cursor.close()


class WriteLock:
    """One writer at a time for a SQLite database, across threads and processes, woken at once.

    SQLite allows one write transaction at a time; a writer that finds the database locked sleeps
    in its busy handler (1, 2, 5, ... up to 100 ms per retry), so under concurrent writes most of
    a request's time is spent asleep while the lock is free. Here a writer waits for a thread lock,
    then for an exclusive ``flock`` on ``path`` (next to the database): the kernel wakes the next
    waiter the moment the lock is released. Re-entrant within a thread. Where ``fcntl`` does not
    exist (Windows), only the threads of one process are ordered; SQLite's busy handler still
    keeps writes correct across processes.
    """

    _registry: dict[str, "WriteLock"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def of(cls, path: Path) -> "WriteLock":
        """The one lock of this process for ``path`` (every :class:`Store` on the same database in
        a process shares it, so a thread's nested writes through two stores cannot deadlock)."""
        key = str(path.resolve())
        with cls._registry_lock:
            lock = cls._registry.get(key)
            if lock is None:
                lock = cls._registry[key] = cls(path)
            return lock

    def __init__(self, path: Path):
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._path = path
        self._pid = os.getpid()

    def _file(self) -> int | None:
        if fcntl is None:
            return None
        if self._fd is None or self._pid != os.getpid():  # a forked child needs its own open file
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def __enter__(self) -> "WriteLock":
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                fd = self._file()
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


class LimitReached(Exception):
    """:meth:`Store.create_task` refused a task: the project already has ``limit`` unfinished tasks."""

    def __init__(self, limit: int):
        super().__init__(f"the project already has {limit} unfinished tasks")
        self.limit = limit


class _NewTask:
    """One :meth:`Store.create_task` call waiting for its group's commit (see :class:`_GroupCommit`)."""

    __slots__ = ("values", "first_event", "max_unfinished", "unfinished", "done", "lead", "result", "error")

    def __init__(self, values: dict, first_event: str, max_unfinished: int, unfinished: tuple):
        self.values, self.first_event = values, first_event
        self.max_unfinished, self.unfinished = max_unfinished, unfinished
        self.done = threading.Event()
        self.lead = False  # set by the previous leader: this call commits the next group
        self.result: tuple | None = None
        self.error: BaseException | None = None

    def outcome(self) -> tuple:
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


class Store:
    """Access to the database at ``url`` (SQLite by default; PostgreSQL works with the same schema).

    ``pool_size``: connections kept open, at least the number of threads of this process that use
    the store at the same time (the API passes its thread pool's size; a worker needs 2).

    ``wakeups`` is told about every event this store inserts (:mod:`easel.store.notify`): in the
    transaction (``pg_notify``) and after its commit (Redis, in-process waiters); default
    :meth:`Publisher.default_for` the URL (``LISTEN/NOTIFY`` on PostgreSQL, else nothing).

    ``secrets`` seals and opens the projects' API secrets (:mod:`.secretbox`); default
    :meth:`SecretBox.default_for` the URL (``EASEL_SECRET_KEY``, else for SQLite the ``secret.key``
    next to the database), looked up when a secret is first needed (a worker needs none).
    """

    def __init__(self, url: str, pool_size: int = 5, wakeups: Publisher | None = None,
                 secrets: SecretBox | None = None):
        self.url = url
        self._secrets = secrets
        self.wakeups = wakeups or Publisher.default_for(url)
        kwargs: dict = {"pool_size": pool_size, "max_overflow": max(10, pool_size)}
        db_file = None
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            db_file = Path(url.split("///", 1)[1])
            db_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _protect(db_file.parent)  # the database holds API secrets (needed for HMAC): owner only
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = create_engine(url, **kwargs)
        # SQLite takes one writer at a time: writers queue on this lock (threads of this process,
        # then processes) rather than in SQLite's busy handler, which polls with sleeps of up to 100 ms
        self._write_lock = WriteLock.of(Path(f"{db_file}.writelock")) if self.sqlite else None
        self._nonces_swept = 0.0
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL: API and workers read while one writes
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA synchronous=NORMAL")
                # a writer that fills the WAL past this copies it into the database and fsyncs it,
                # 10-25 ms with every other writer waiting; API processes checkpoint in the
                # background instead (Store.checkpoint), this is the safety net (~40 MB of WAL)
                cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
                cur.close()
                for suffix in ("", "-wal", "-shm"):
                    f = Path(f"{db_file}{suffix}")
                    if f.exists():
                        _protect(f)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._skip_locked = self.engine.dialect.name == "postgresql"
        self._group = _GroupCommit()
        self._direct = _Direct(self.engine.dialect)

    def checkpoint(self) -> None:
        """SQLite: copy the write-ahead log into the database file without blocking anyone
        (``wal_checkpoint(PASSIVE)``), so that writers never have to (see the connect pragmas).
        Nothing on other databases."""
        if self.sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent). On PostgreSQL the upgrade
        holds a transaction-scoped advisory lock, so the processes of a fleet starting together
        migrate one after the other (the others then find the schema current)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config(str(HERE / "alembic.ini"))
        cfg.set_main_option("script_location", str(HERE / "migrations"))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        box = self.secret_box(create=self.sqlite)  # SQLite: this machine's data directory; else if configured
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7345021)"))  # any fixed key: "easel migrations"
            cfg.attributes["connection"] = conn
            cfg.attributes["secret_box"] = box  # 0008 seals the secrets stored in clear
            command.upgrade(cfg, "head")
            if box is not None:
                seal_and_check(conn, box)

    def secret_box(self, create: bool = False) -> SecretBox | None:
        """This store's :class:`SecretBox` (see the class doc); None if there is no key and not ``create``.

        Raises:
            SecretKeyError: a key is malformed."""
        if self._secrets is None:
            self._secrets = SecretBox.default_for(self.url, create=create)
        return self._secrets

    def _box(self) -> SecretBox:
        box = self.secret_box(create=self.sqlite)
        if box is None:
            raise SecretKeyError("the API secrets are encrypted and this process has no key: set EASEL_SECRET_KEY "
                                 "(docs/configuration.md)")
        return box

    def rotate_secrets(self) -> int:
        """Re-encrypt every project's API secret with the first key (after a new key was put
        first: :func:`SecretBox` decrypts with any of them); returns how many. One transaction.

        Raises:
            SecretKeyError: a secret opens with none of the keys (nothing is changed)."""
        box = self._box()
        with self._write() as conn:
            return rotate_all(conn, box)

    def _locked(self):
        return self._write_lock if self._write_lock is not None else nullcontext()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session in a transaction that may write (committed at the end)."""
        with self._locked(), self._sessions() as s:
            with s.begin():
                yield s

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """An ORM session for reads only (takes no write turn)."""
        with self._sessions() as s:
            yield s

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A Core connection in a transaction that writes, committed at the end."""
        with self._locked(), self.engine.begin() as conn:
            yield conn

    def _rows(self, stmt, params: dict) -> list[Row]:
        with self.engine.connect() as conn:
            return list(conn.execute(stmt, params))

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
        apikey, apisecret = secrets.token_hex(16), secrets.token_hex(24)
        p = Project(name=name, apikey=hash_apikey(apikey), apisecret=self._box().seal(apisecret),
                    auth_mode=auth_mode, nonce_policy=nonce_policy, created_at=time.time())
        with self.session() as s:
            s.add(p)
        p.apikey, p.apisecret = apikey, apisecret  # detached: not written back
        return p

    def set_nonce_policy(self, apikey: str, nonce_policy: str) -> Project | None:
        """Change the nonce policy of the project with ``apikey``; None if there is none."""
        if nonce_policy not in ("lenient", "strict"):
            raise ValueError("nonce_policy must be 'lenient' or 'strict'")
        with self.session() as s:
            s.execute(update(Project).where(Project.apikey == hash_apikey(apikey)).values(nonce_policy=nonce_policy))
        return self.project_by_key(apikey)

    def project_by_key(self, apikey: str) -> ProjectRecord | None:
        """The project whose API key is ``apikey`` (looked up by hash), or None (a read-only
        record with :class:`Project`'s attributes; ``apikey`` is the stored hash, ``apisecret``
        the secret, opened).

        Raises:
            SecretKeyError: the secret does not open with this store's key."""
        rows = self._rows(_PROJECT_BY_KEY, {"key": hash_apikey(apikey)})
        return self._opened(rows[0]) if rows else None

    def project_by_id(self, project_id: int) -> ProjectRecord | None:
        """The project with this id, or None (as :meth:`project_by_key` returns it)."""
        rows = self._rows(_PROJECT_BY_ID, {"id": project_id})
        return self._opened(rows[0]) if rows else None

    def _opened(self, row: Row) -> ProjectRecord:
        stored = row.apisecret
        return ProjectRecord(**{**row._asdict(), "apisecret": self._box().open(stored) if SecretBox.sealed(stored)
                                else stored})

    def use_nonce(self, project_id: int, nonce: str, retention_seconds: float) -> bool:
        """Record ``nonce`` for the project; False if it was already used (a replay). Nonces older
        than ``retention_seconds`` are deleted at most once a minute (not on every check)."""
        now = time.time()
        try:
            with self._write() as conn:
                if now - self._nonces_swept > NONCE_SWEEP_SECONDS:
                    conn.execute(delete(Nonce).where(Nonce.created_at < now - retention_seconds))
                    self._nonces_swept = now
                conn.execute(insert(Nonce), {"project_id": project_id, "nonce": nonce, "created_at": now})
            return True
        except IntegrityError:
            return False

    # -- tasks --------------------------------------------------------------------------------

    def create_task(self, *, project_id: int, tool: str, status: str, parameters: dict, inputs: dict,
                    callbackurl: str, cost_per_second: float, first_event: str, uuid: str | None = None,
                    idempotency_key: str | None = None, max_unfinished: int = 0,
                    unfinished: Iterable[str] = ()) -> tuple[Task, bool]:
        """Insert a task and its first event (the task as a read-only :data:`TaskRecord`).

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
        now = time.time()
        values = dict(uuid=uuid or str(uuidlib.uuid4()), project_id=project_id, tool=tool,
                      socketaccesstoken=new_token(), file_accesskey=new_token(), status=status,
                      parameters=json.dumps(parameters), inputs=json.dumps(inputs), callbackurl=callbackurl,
                      debugoutput="", debugerror="", pexit=None, progress="", cost_per_second=cost_per_second,
                      kill_requested=False, worker_id="", createtime=now, idempotency_key=idempotency_key or None,
                      event_seq=1, lease_expires_at=None)
        job = _NewTask(values, first_event, max_unfinished, tuple(unfinished))
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
            with self._write() as conn:
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
                    job.result = (first, False)
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
            job.result = (TaskRecord(**job.values), True)
            per_project[job.values["project_id"]] = per_project.get(job.values["project_id"], 0) + 1
        conn.execute(_INSERT_EVENT, [{"task_id": job.values["id"], "type": job.first_event, "message": "",
                                      "created_at": job.values["createtime"], "seq": 1} for job in admitted])
        conn.execute(_COUNT_PROJECT_TASKS, [{"pid": pid, "n": n} for pid, n in sorted(per_project.items())])
        for job, first in retries:
            job.result = (first.result[0], False)

    def _create_alone(self, job: _NewTask) -> tuple:
        """One call in a transaction of its own (the fallback of a group that hit a unique key)."""
        try:
            with self._write() as conn:
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

    def task_by_idempotency(self, project_id: int, key: str) -> Task | None:
        with self._read() as s:
            return s.scalar(select(Task).where(Task.project_id == project_id, Task.idempotency_key == key))

    def tasks_of(self, project_id: int, limit: int = 20, start: int = 0, status: str | None = None,
                 tool: str | None = None) -> list[Row]:
        """A project's tasks, newest first (only ``status`` / ``tool`` ones, if given), as
        read-only rows. Read through an index on ``project_id`` (``(project_id, tool, id)`` with a
        tool): the page costs O(``start`` + ``limit``), not O(the project's tasks)."""
        q = _SELECT_TASK.where(*self._task_filter(project_id, status, tool))
        return self._rows(q.order_by(T.id.desc()).offset(start).limit(limit), {})

    def count_tasks(self, project_id: int, status: str | None = None, tool: str | None = None) -> int:
        """How many tasks :meth:`tasks_of` would list without ``start``/``limit``: the project's
        kept count without filters (O(1)); with a filter, a count of the matching rows."""
        with self.engine.connect() as conn:
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
        with self._read() as s:
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
        with self._read() as s:
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
        with self.engine.connect() as conn:
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
        with self._read() as s:
            rows = s.execute(select(Task.tool, Task.status, func.count(Task.id))
                             .where(Task.status.in_(list(statuses))).group_by(Task.tool, Task.status))
            return {(tool, status): int(n) for tool, status, n in rows}

    def get_task(self, task_id: int | None = None, token: str | None = None) -> Row | None:
        """The task with ``task_id`` (or ``socketaccesstoken`` = ``token``) as a read-only row with
        :class:`Task`'s attributes, or None."""
        if task_id is not None:
            rows = self._rows(_TASK_BY_ID, {"task_id": task_id})
        else:
            rows = self._rows(_TASK_BY_TOKEN, {"token": token})
        return rows[0] if rows else None

    def claim_next(self, worker_id: str, from_status: str, to_status: str, time_column: str,
                   lease_seconds: float = 60.0, task_id: int | None = None,
                   then: list[tuple[str, Iterable[str] | None, str, bool, dict]] = ()) -> int | None:
        """Atomically move the oldest task in ``from_status`` (with ``task_id``: that task only)
        to ``to_status`` for ``worker_id`` with a lease until now + ``lease_seconds``; return its
        id (None when none is waiting, or ``task_id`` is not in ``from_status`` any more).
        ``then``: further steps of the claimed task, as :meth:`transitions` takes them, in the same
        transaction (the claim and the worker's first stage: one commit).

        One conditional UPDATE: two workers racing for the same row cannot both win. On
        PostgreSQL the candidate row is selected ``FOR UPDATE SKIP LOCKED``, so a worker that
        would lose the race takes the next queued task instead of coming back empty.
        """
        now = time.time()
        stmt = _claim(from_status, to_status, time_column, self._skip_locked, task_id is not None)
        params = {"owner": worker_id, "lease": now + lease_seconds, "now": now}
        if task_id is not None:
            params["task_id"] = task_id
        with self._write() as conn:
            rows = self._direct.rows(conn, stmt, params)
            if not rows:
                return None
            row = rows[0]
            self._direct.rows(conn, _INSERT_EVENT, {"task_id": row[0], "type": to_status, "message": "",
                                                    "created_at": now, "seq": row[1]})
            for status, only_from, message, webhook, values in then:
                if not self._step(conn, row[0], status, only_from, worker_id, message, webhook, now, values):
                    raise ValueError(f"the claimed task {row[0]} cannot go on to {status}")  # rolled back
            self.wakeups.in_transaction(conn, row[0])
        self.wakeups.committed(row[0])
        return row[0]

    def _step(self, conn: Connection, task_id: int, status: str, only_from: Iterable[str] | None, owner: str | None,
              message: str, webhook: bool, now: float, values: dict) -> bool:
        """One guarded transition on ``conn`` (see :meth:`transition`)."""
        values = {"status": status, **values}
        stmt = _task_update(tuple(only_from) if only_from is not None else None, owner is not None,
                            tuple(sorted(values)), ("callbackurl", "event_seq"))
        rows = self._direct.rows(conn, stmt, {"task_id": task_id, "owner": owner,
                                              **{"v_" + k: v for k, v in values.items()}})
        if not rows:
            return False
        url, seq = rows[0]
        self._direct.rows(conn, _INSERT_EVENT, {"task_id": task_id, "type": status, "message": message,
                                                "created_at": now, "seq": seq})
        if webhook and url:
            conn.execute(insert(WebhookDelivery), {
                "id": "msg_" + secrets.token_hex(16), "task_id": task_id, "url": url, "status": "pending",
                "attempts": 0, "next_attempt_at": now, "created_at": now, "last_error": ""})
        return True

    def transition(self, task_id: int, status: str, *, only_from: Iterable[str] | None = None,
                   owner: str | None = None, event_message: str = "", webhook: bool = False, **values) -> bool:
        """Set ``status`` (and other columns) and append the event; False (nothing written) if the
        task's status is not in ``only_from`` or, with ``owner``, another worker holds it.

        With ``webhook``, a pending :class:`WebhookDelivery` to the task's ``callbackurl`` (if any)
        is inserted in the same transaction, so a terminal task never loses its webhook. (SQL
        Core, not the ORM, with reused statements: see the module doc.)
        """
        with self._write() as conn:
            if not self._step(conn, task_id, status, only_from, owner, event_message, webhook, time.time(), values):
                return False
            self.wakeups.in_transaction(conn, task_id)
        self.wakeups.committed(task_id)
        return True

    def transitions(self, task_id: int, steps: list[tuple[str, Iterable[str] | None, str, bool, dict]], *,
                    owner: str | None = None, outputs: list[dict] = ()) -> bool:
        """Several :meth:`transition` s of one task in one transaction, all or none: ``steps`` are
        ``(status, only_from, event_message, webhook, values)``, applied in order. False (nothing
        written) as soon as one is rejected. One commit instead of one per step. ``outputs``
        (:meth:`add_outputs` rows) are inserted in the same transaction: stored with the steps, or
        not at all."""

        class _Rejected(Exception):
            pass

        now = time.time()
        try:
            with self._write() as conn:
                for status, only_from, message, webhook, values in steps:
                    if not self._step(conn, task_id, status, only_from, owner, message, webhook, now, values):
                        raise _Rejected()
                if outputs:
                    conn.execute(insert(Output), self._output_rows(task_id, outputs, now))
                self.wakeups.in_transaction(conn, task_id)
        except _Rejected:
            return False
        self.wakeups.committed(task_id)
        return True

    def add_event(self, task_id: int, type_: str, message: str = "", preview: bytes | None = None, *,
                  only_from: Iterable[str] | None = None, owner: str | None = None, **values) -> bool | None:
        """Append an event (e.g. ``task_output`` progress, ``task_error``); may update columns.

        ``preview``: JPEG bytes stored as the event's :class:`Preview`.

        Returns the task's ``kill_requested`` flag, read in the same transaction (one round trip
        per step), or None when nothing was written because the guard (``only_from`` statuses,
        ``owner`` worker) did not match.
        """
        stmt = _task_update(tuple(only_from) if only_from is not None else None, owner is not None,
                            tuple(sorted(values)), ("kill_requested", "event_seq"))
        with self._write() as conn:
            rows = self._direct.rows(conn, stmt, {"task_id": task_id, "owner": owner,
                                                  **{"v_" + k: v for k, v in values.items()}})
            if not rows:
                return None
            row = rows[0]
            self._direct.rows(conn, _INSERT_EVENT, {"task_id": task_id, "type": type_, "message": message,
                                                    "created_at": time.time(), "seq": row[1]})
            if preview:
                self._direct.rows(conn, _INSERT_PREVIEW, {"task_id": task_id, "seq": row[1], "data": bytes(preview)})
            self.wakeups.in_transaction(conn, task_id)
        self.wakeups.committed(task_id)
        return bool(row[0])

    def mark_dispatched(self, task_id: int, status: str, now: float, due_before: float | None = None) -> bool:
        """Record that ``task_id`` is being published now, if it is still in ``status`` and (with
        ``due_before``) was last published before that time or never; False (nothing written)
        otherwise. The conditional UPDATE makes exactly one of several processes the publisher."""
        with self._write() as conn:
            q = update(Task).where(Task.id == task_id, Task.status == status)
            if due_before is not None:
                q = q.where((Task.dispatched_at.is_(None)) | (Task.dispatched_at < due_before))
            return conn.execute(q.values(dispatched_at=now)).rowcount == 1

    def clear_dispatched(self, task_id: int, status: str) -> None:
        """Forget a publication that failed (the task is published again at the next pass)."""
        with self._write() as conn:
            conn.execute(update(Task).where(Task.id == task_id, Task.status == status).values(dispatched_at=None))

    def due_for_dispatch(self, status: str, never_before: float, again_before: float | None,
                         limit: int = 500) -> list[Task]:
        """Tasks in ``status`` never published and created before ``never_before``, or (with
        ``again_before``) last published before ``again_before``; oldest first."""
        due = Task.dispatched_at.is_(None) & (Task.createtime < never_before)
        if again_before is not None:
            due = due | (Task.dispatched_at < again_before)
        with self._read() as s:
            return list(s.scalars(select(Task).where(Task.status == status, due).order_by(Task.queue_seq, Task.id)
                                  .limit(limit)))

    def renew_lease(self, task_id: int, owner: str, until: float, running: Iterable[str]) -> bool:
        """Extend ``owner``'s lease on a running task to ``until``; False if it no longer holds it."""
        stmt = _task_update(tuple(running), True, ("lease_expires_at",), ("id",), bump_seq=False)
        with self._write() as conn:
            return conn.execute(stmt, {"task_id": task_id, "owner": owner, "v_lease_expires_at": until}).first() \
                is not None

    def stale_tasks(self, running: Iterable[str], now: float, started_before: float | None = None) -> list[Task]:
        """Running tasks whose lease has expired (or was never set), and, with ``started_before``,
        those accepted before that time (over their run-time limit)."""
        cond = (Task.lease_expires_at.is_(None)) | (Task.lease_expires_at < now)
        if started_before is not None:
            cond = cond | (Task.accepttime < started_before)
        with self._read() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(list(running)), cond).order_by(Task.id)))

    def request_kill(self, task_id: int, running: Iterable[str]) -> bool:
        with self.session() as s:
            res = s.execute(update(Task).where(Task.id == task_id, Task.status.in_(list(running)))
                            .values(kill_requested=True))
            return res.rowcount == 1

    def kill_requested(self, task_id: int) -> bool:
        with self.engine.connect() as conn:
            rows = self._direct.rows(conn, _KILL_REQUESTED, {"task_id": task_id})
        return bool(rows and rows[0][0])

    def task_by_uuid(self, uuid: str) -> Task | None:
        with self._read() as s:
            return s.scalar(select(Task).where(Task.uuid == uuid))

    def ended_before(self, statuses: Iterable[str], before: float, limit: int = 500) -> list[Task]:
        """Tasks in (terminal) ``statuses`` that ended before ``before`` (epoch seconds), oldest first."""
        ended = func.coalesce(Task.postprocessendtime, Task.canceltime, Task.createtime)
        with self._read() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(list(statuses)), ended < before)
                                  .order_by(Task.id).limit(limit)))

    def thin_events(self, statuses: Iterable[str], before: float, types: Iterable[str]) -> int:
        """Delete the events of ``types`` of tasks in (terminal) ``statuses`` that ended before
        ``before`` (epoch seconds), and all those tasks' previews, one statement each; returns how
        many events were deleted."""
        ended = func.coalesce(Task.postprocessendtime, Task.canceltime, Task.createtime)
        old = select(Task.id).where(Task.status.in_(list(statuses)), ended < before)
        with self.session() as s:
            s.execute(delete(Preview).where(Preview.task_id.in_(old)))
            return s.execute(delete(Event).where(Event.type.in_(list(types)), Event.task_id.in_(old))).rowcount or 0

    def tasks_in(self, statuses: Iterable[str]) -> list[Task]:
        with self._read() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(list(statuses))).order_by(Task.id)))

    def events(self, task_id: int, after_seq: int = 0, previews: bool = False) -> list[Row]:
        """The task's events in order, those with ``seq > after_seq`` only (a cursor that cannot
        skip an event: see :attr:`Event.seq`), as read-only rows with :class:`Event`'s attributes
        and ``preview``: the event's preview as base64 text with ``previews``, else None (the
        images are not read)."""
        rows = self._rows(_EVENTS_WITH_PREVIEWS if previews else _EVENTS, {"task_id": task_id, "after": after_seq})
        if not previews:
            return rows
        return [_EventRow(*r[:-1], base64.b64encode(r.preview).decode() if r.preview is not None else None)
                for r in rows]

    def previews(self, task_id: int) -> list[Preview]:
        """The task's stored previews, in step order."""
        with self._read() as s:
            return list(s.scalars(select(Preview).where(Preview.task_id == task_id).order_by(Preview.seq)))

    # -- webhooks -----------------------------------------------------------------------------

    def lease_due_deliveries(self, now: float, lease_seconds: float, limit: int = 20) -> list[WebhookDelivery]:
        """Pending deliveries whose time has come, each leased (``next_attempt_at`` pushed by
        ``lease_seconds``) with a conditional UPDATE so two dispatchers never send the same attempt."""
        with self._read() as s:
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
        with self._read() as s:
            return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.task_id == task_id)))

    def drop_deliveries(self, task_id: int) -> int:
        """Mark the task's pending deliveries ``dropped``; returns how many."""
        with self.session() as s:
            return s.execute(update(WebhookDelivery).where(
                WebhookDelivery.task_id == task_id, WebhookDelivery.status == "pending")
                .values(status="dropped", last_error="task inputs and outputs were deleted")).rowcount

    def delete_outputs(self, task_id: int) -> list[Row]:
        """Remove the task's output rows; return them (the caller removes the files)."""
        with self._write() as conn:
            rows = list(conn.execute(_OUTPUTS, {"task_id": task_id}))
            conn.execute(delete(Output).where(Output.task_id == task_id))
            return rows

    # -- outputs ------------------------------------------------------------------------------

    def add_outputs(self, task_id: int, outputs: list[dict]) -> None:
        """Store a task's outputs (``name``, ``contenttype``, ``size``, ``path`` each)."""
        if outputs:
            with self._write() as conn:
                conn.execute(insert(Output), self._output_rows(task_id, outputs, time.time()))

    @staticmethod
    def _output_rows(task_id: int, outputs: list[dict], now: float) -> list[dict]:
        return [{"id": secrets.token_hex(16), "task_id": task_id, "addedtime": now, **o} for o in outputs]

    def outputs(self, task_id: int) -> list[Row]:
        """The task's outputs by name, as read-only rows with :class:`Output`'s attributes."""
        return self._rows(_OUTPUTS, {"task_id": task_id})

    def outputs_of(self, task_ids: Iterable[int]) -> dict[int, list[Row]]:
        """:meth:`outputs` of several tasks in one query: task id -> its outputs by name."""
        ids = list(task_ids)
        out: dict[int, list[Row]] = {tid: [] for tid in ids}
        if ids:
            for row in self._rows(_OUTPUTS_OF, {"ids": ids}):
                out[row.task_id].append(row)
        return out

    def output_by_key(self, accesskey: str, name: str) -> Output | None:
        with self._read() as s:
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
        with self._read() as s:
            return s.scalar(select(UserFile).where(UserFile.id == file_id, UserFile.project_id == project_id))

    def user_file_by_name(self, project_id: int, name: str) -> UserFile | None:
        """The project's most recently uploaded file called ``name`` (any folder)."""
        with self._read() as s:
            return s.scalar(select(UserFile).where(UserFile.project_id == project_id, UserFile.name == name,
                                                   UserFile.is_folder.is_(False))
                            .order_by(UserFile.addedtime.desc()).limit(1))

    def user_file_by_key(self, accesskey: str, name: str) -> UserFile | None:
        with self._read() as s:
            return s.scalar(select(UserFile).where(UserFile.accesskey == accesskey, UserFile.name == name,
                                                   UserFile.is_folder.is_(False)))
