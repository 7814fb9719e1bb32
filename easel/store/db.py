"""The shared database object of the store's aggregates: engine, migrations, write turns, sessions.

Every aggregate (:mod:`.projects`, :mod:`.submission`, :mod:`.taskstate`, :mod:`.queries`,
:mod:`.deliveries`, :mod:`.files`, :mod:`.retention`) is given one :class:`Database` and reaches
the database only through it, in one of three ways: ORM sessions (:meth:`Database.session`,
:meth:`Database.read`) for rare reads and writes, Core statements built once and reused
(:meth:`Database.write`, :meth:`Database.rows`), and, for the worker's per-step writes, the
DBAPI cursor (:class:`Direct`).

Cost. The statements that run per request or per denoising step (task reads, claims, transitions,
progress events, outputs) are built once with bound parameters and reused, so SQLAlchemy compiles
each once per process and a call costs what the database does plus ~0.1 ms (building a
statement per call cost 4× that); the worker's per-task and per-step writes (claims,
transitions, progress events) and its kill check run their compiled SQL on the DBAPI cursor
(:class:`Direct`), about half that again. Their reads return typed read-only rows
(:mod:`.rows`) instead of ORM objects. On SQLite, writes of one process take turns on one lock
(:class:`WriteLock`: one writer at a time, as SQLite allows anyway) instead of racing for the
database lock, whose busy handler sleeps up to 100 ms per retry; the connection pool holds as
many connections as the process has threads that use it, so no connection is opened per request.
"""
from __future__ import annotations

import os
import secrets
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock (see WriteLock)
    fcntl = None

from sqlalchemy import create_engine, event, literal, text
from sqlalchemy.engine import Connection, Row
from sqlalchemy.orm import Session, sessionmaker

from easel.clock import SYSTEM, Clock

from .notify import Publisher
from .urls import is_sqlite, sqlite_file
from .secretbox import SecretBox, SecretKeyError, rotate_all, seal_and_check

WAL_AUTOCHECKPOINT_PAGES = 10_000
HERE = Path(__file__).parent

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


def one_of(column, values: Iterable[str]):
    """``column IN (...)`` over constants, each its own bound value: unlike an "expanding" list
    parameter, the statement compiles once and is reused from SQLAlchemy's cache."""
    return column.in_([literal(v) for v in values])



class Direct:
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
        """Run ``stmt`` with ``params`` on ``conn``'s DBAPI cursor; its rows as tuples ([] for none)."""
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



class Database:
    """The database at ``url`` (SQLite by default; PostgreSQL works with the same schema), shared
    by the store's aggregates.

    ``pool_size``: connections kept open, at least the number of threads of this process that use
    the store at the same time (the API passes its thread pool's size; a worker needs 2).

    ``wakeups`` is told about every event the store inserts (:mod:`easel.store.notify`): in the
    transaction (``pg_notify``) and after its commit (Redis, in-process waiters); default
    :meth:`Publisher.default_for` the URL (``LISTEN/NOTIFY`` on PostgreSQL, else nothing).

    ``secrets`` seals and opens the projects' API secrets (:mod:`.secretbox`); default
    :meth:`SecretBox.default_for` the URL (``EASEL_SECRET_KEY``, else for SQLite the ``secret.key``
    next to the database), looked up when a secret is first needed (a worker needs none).

    ``clock``: where the store reads the time it stamps rows with (:mod:`easel.clock`).
    """

    def __init__(self, url: str, pool_size: int = 5, wakeups: Publisher | None = None,
                 secrets: SecretBox | None = None, clock: Clock = SYSTEM):
        self.url = url
        self.clock = clock
        self._secrets = secrets
        self.wakeups = wakeups or Publisher.default_for(url)
        kwargs: dict = {"pool_size": pool_size, "max_overflow": max(10, pool_size)}
        self.sqlite = is_sqlite(url)
        db_file = sqlite_file(url)
        if self.sqlite and db_file is None:
            raise ValueError(f"EASEL_DATABASE_URL={url!r}: an in-memory SQLite database cannot be shared by "
                             "the API and its workers; name a file, e.g. sqlite:////var/lib/easel/easel.db")
        if db_file is not None:
            db_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _protect(db_file.parent)  # the database holds API secrets (needed for HMAC): owner only
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = create_engine(url, **kwargs)
        # SQLite takes one writer at a time: writers queue on this lock (threads of this process,
        # then processes) rather than in SQLite's busy handler, which polls with sleeps of up to 100 ms
        self.write_lock = WriteLock.of(Path(f"{db_file}.writelock")) if self.sqlite else None
        if self.sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL: API and workers read while one writes
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA synchronous=NORMAL")
                # a writer that fills the WAL past this copies it into the database and fsyncs it,
                # 10-25 ms with every other writer waiting; API processes checkpoint in the
                # background instead (Database.checkpoint), this is the safety net (~40 MB of WAL)
                cur.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
                cur.close()
                for suffix in ("", "-wal", "-shm"):
                    f = Path(f"{db_file}{suffix}")
                    if f.exists():
                        _protect(f)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.skip_locked = self.engine.dialect.name == "postgresql"
        self.direct = Direct(self.engine.dialect)

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
        """This database's :class:`SecretBox` (see the class doc); None if there is no key and not ``create``.

        Raises:
            SecretKeyError: a key is malformed."""
        if self._secrets is None:
            self._secrets = SecretBox.default_for(self.url, create=create)
        return self._secrets

    def box(self) -> SecretBox:
        """:meth:`secret_box`, which must exist.

        Raises:
            SecretKeyError: this process has no key (or it is malformed)."""
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
        box = self.box()
        with self.write() as conn:
            return rotate_all(conn, box)

    def _locked(self):
        return self.write_lock if self.write_lock is not None else nullcontext()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session in a transaction that may write (committed at the end)."""
        with self._locked(), self._sessions() as s:
            with s.begin():
                yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """An ORM session for reads only (takes no write turn)."""
        with self._sessions() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A Core connection in a transaction that writes, committed at the end."""
        with self._locked(), self.engine.begin() as conn:
            yield conn

    def rows(self, stmt, params: dict) -> list[Row]:
        """Run a Core read ``stmt`` with ``params`` outside any write turn; its rows."""
        with self.engine.connect() as conn:
            return list(conn.execute(stmt, params))
