"""API secrets at rest: encrypted with an operator key (``cryptography``'s Fernet, AES-128-CBC
with HMAC-SHA256; :class:`~cryptography.fernet.MultiFernet` for rotation).

Wiro's signature is an HMAC keyed with the API key over ``API_SECRET + NONCE``, so the server
needs each project's secret itself (the API key is only stored hashed). The column
``projects.apisecret`` holds ``fernet:<token>``; a value without the prefix is a secret stored in
clear by a version before 0.8, still read as such until it is sealed (by migration ``0008`` when the
migrating process has the key, else by the next :meth:`Store.migrate` that has it).

**The key.** ``EASEL_SECRET_KEY``: one or more Fernet keys (``Fernet.generate_key()``: 32 random
bytes, url-safe base64), comma-separated; the first encrypts, every one decrypts. Without it, the
file ``<data_dir>/secret.key`` (one key a line, same rule; on SQLite, in the database's folder),
created with mode 0600 at first start.
Every process that reads secrets (API processes, ``easel projects``) must have the same keys: on
PostgreSQL with several machines, set ``EASEL_SECRET_KEY`` on each (a fleet's ``easel worker`` never
reads secrets and needs no key). Rotation: ``easel projects rotate-key`` (docs/configuration.md).
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select, update

from .models import Project
from .urls import sqlite_file

PREFIX = "fernet:"
KEY_FILE = "secret.key"
ENV = "EASEL_SECRET_KEY"


class SecretKeyError(RuntimeError):
    """The operator key is malformed, missing, or does not open the stored secrets (the message
    says which and what to do)."""


def _parse(text: str, source: str) -> list[Fernet]:
    keys = [k.strip() for k in text.replace(",", "\n").splitlines() if k.strip() and not k.strip().startswith("#")]
    if not keys:
        raise SecretKeyError(f"{source} holds no key")
    fernets = []
    for i, key in enumerate(keys, 1):
        try:
            fernets.append(Fernet(key))
        except ValueError:
            raise SecretKeyError(f"{source}: key {i} is not a Fernet key (32 random bytes in url-safe base64, "
                                 "44 characters; `easel projects rotate-key --new` makes one)") from None
    return fernets


class SecretBox:
    """Seals and opens API secrets with the operator's keys (see the module doc).

    ``keys``: the key text (comma- or line-separated, first encrypts); ``key_file``: where it was
    read from (re-read when a secret does not open and the file changed, so a running API process
    follows ``easel projects rotate-key``); ``source``: how errors name it."""

    def __init__(self, keys: str, source: str, key_file: Path | None = None):
        self.source = source
        self.key_file = key_file
        self._stamp = self._file_stamp()
        self._fernet = MultiFernet(_parse(keys, source))

    @classmethod
    def for_settings(cls, core, create: bool = True) -> "SecretBox | None":
        """The box of ``core`` (the :class:`easel.config.CoreSettings`): ``core.secret_key`` (``EASEL_SECRET_KEY``; read from the
        environment also for settings built in code, as :meth:`default_for` reads it), else the
        ``secret.key`` file of the data directory (on SQLite: of the database's folder, the data
        directory unless ``EASEL_DATABASE_URL`` moves it, so that every process of that database
        finds it), created (0600) when missing and ``create``; None when there is no key and
        ``create`` is False.

        Raises:
            SecretKeyError: a key is malformed.
        """
        db_file = sqlite_file(core.database_url)
        folder = db_file.parent if db_file is not None else Path(core.data_dir)
        return cls.configured(core.secret_key or os.environ.get(ENV, ""), folder / KEY_FILE, create)

    @classmethod
    def default_for(cls, url: str, create: bool = False) -> "SecretBox | None":
        """The box of a store opened by URL alone: ``EASEL_SECRET_KEY``, else for SQLite the key
        file next to the database (``<data_dir>/secret.key`` of the default layout), else None."""
        db_file = sqlite_file(url)
        key_file = db_file.parent / KEY_FILE if db_file is not None else None
        return cls.configured(os.environ.get(ENV, ""), key_file, create)

    @classmethod
    def configured(cls, keys: str, key_file: Path | None, create: bool) -> "SecretBox | None":
        if keys.strip():
            return cls(keys, ENV)
        if key_file is None:
            return None
        if not key_file.exists():
            if not create:
                return None
            write_key_file(key_file, [Fernet.generate_key().decode()], new=True)
        return cls(key_file.read_text(), str(key_file), key_file)

    def _file_stamp(self) -> tuple | None:
        try:
            st = self.key_file.stat() if self.key_file else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None

    def _reload(self) -> bool:
        """Re-read the key file if it changed since it was read; True if it did."""
        stamp = self._file_stamp()
        if self.key_file is None or stamp is None or stamp == self._stamp:
            return False
        self._fernet = MultiFernet(_parse(self.key_file.read_text(), self.source))
        self._stamp = stamp
        return True

    @staticmethod
    def sealed(stored: str) -> bool:
        """Whether a stored value is encrypted (else it is a secret stored in clear)."""
        return stored.startswith(PREFIX)

    def seal(self, secret: str) -> str:
        """``secret`` encrypted with the first key, as stored (``fernet:<token>``)."""
        return PREFIX + self._fernet.encrypt(secret.encode("utf-8")).decode("ascii")

    def open(self, stored: str) -> str:
        """The secret of a stored value (a value in clear is returned as it is).

        Raises:
            SecretKeyError: no key opens it (a wrong or missing key)."""
        if not self.sealed(stored):
            return stored
        token = stored[len(PREFIX):].encode("ascii")
        try:
            return self._fernet.decrypt(token).decode("utf-8")
        except InvalidToken:
            if self._reload():
                return self.open(stored)
            raise SecretKeyError(f"an API secret in the database does not open with the key(s) of {self.source}: "
                                 "every process must use the key the secrets were sealed with (EASEL_SECRET_KEY, "
                                 "or the same secret.key file; docs/configuration.md)") from None

    def rotate(self, stored: str) -> str:
        """A stored value re-encrypted with the first key (a value in clear: sealed).

        Raises:
            SecretKeyError: no key opens it."""
        return self.seal(self.open(stored))


def seal_and_check(conn, box: SecretBox) -> None:
    """In the transaction of ``conn``: seal the secrets still in clear (a process without the key
    migrated) and open every sealed one, so that a wrong key stops a process at start
    (``Store.migrate``) instead of failing its requests.

    Raises:
        SecretKeyError: some secrets open with none of the keys (the transaction should roll back)."""
    wrong = 0
    for pid, stored in conn.execute(select(Project.id, Project.apisecret)).all():
        if not box.sealed(stored):
            conn.execute(update(Project).where(Project.id == pid).values(apisecret=box.seal(stored)))
            continue
        try:
            box.open(stored)
        except SecretKeyError:
            wrong += 1
    if wrong:
        raise SecretKeyError(f"{wrong} project(s)' API secrets do not open with the key(s) of {box.source}: "
                             "start every process with the key the secrets were sealed with (EASEL_SECRET_KEY, "
                             "or the same secret.key file; docs/configuration.md). Nothing was changed.")


def rotate_all(conn, box: SecretBox) -> int:
    """In the transaction of ``conn``: re-encrypt every project's secret with the first key;
    returns how many.

    Raises:
        SecretKeyError: a secret opens with none of the keys (the transaction should roll back)."""
    rows = conn.execute(select(Project.id, Project.apisecret)).all()
    for pid, stored in rows:
        conn.execute(update(Project).where(Project.id == pid).values(apisecret=box.rotate(stored)))
    return len(rows)


def write_key_file(path: Path, keys: list[str], new: bool = False) -> None:
    """Write ``keys`` (first encrypts) to ``path`` with mode 0600, atomically (``new``: fail if it
    exists, so two processes starting together never make two keys)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{k}\n" for k in keys))
        fh.flush()
        os.fsync(fh.fileno())
    if not new:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # complete or absent, never half-written
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        tmp.unlink()
