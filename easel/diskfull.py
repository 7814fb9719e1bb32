"""A full disk, recognised wherever it surfaces, and what ``/healthz`` says about it.

A full data disk shows up as ``OSError`` ENOSPC/EDQUOT (files), SQLite's ``database or disk is
full`` (``SQLITE_FULL``, inside SQLAlchemy's ``OperationalError``), PostgreSQL's SQLSTATE 53100
(``disk_full``; its own disk filling is out of scope, docs/operations.md) or a library's error
whose text carries the OS's ``No space left on device`` (safetensors, Rust I/O). The API answers
such a failure with HTTP 507 in Wiro's envelope (``easel.api.app``) and :class:`DiskWatch` makes
``/healthz`` say why the server is unhealthy until space returns.
"""
from __future__ import annotations

import errno
import shutil
import sqlite3
import time
from pathlib import Path

_NOSPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
SQLITE_FULL = 13
PG_DISK_FULL = "53100"
MIN_FREE_BYTES = 16 * 1024 * 1024  # /healthz: below this the data directory's disk counts as full
RECENT_SECONDS = 5.0  # /healthz: a write that failed for lack of space this recently counts too
MESSAGE = "The server's disk is full: the request was not stored. Try again later."


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it wraps: SQLAlchemy's ``orig``, ``__cause__``,
    ``__context__``) says that a disk or quota is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NOSPACE:
            return True
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL
                                               or "database or disk is full" in str(exc)):
            return True
        if getattr(exc, "sqlstate", None) == PG_DISK_FULL or "No space left on device" in str(exc):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


class DiskWatch:
    """The data directory's disk, as ``/healthz`` reports it: full when it has less than
    ``min_free`` bytes free, or when a write failed for lack of space (:meth:`noticed`) within the
    last :data:`RECENT_SECONDS` (a quota, or a database on another disk)."""

    def __init__(self, folder: Path, min_free: int = MIN_FREE_BYTES):
        self.folder = Path(folder)
        self.min_free = min_free
        self._failed_at = float("-inf")

    def noticed(self, exc: BaseException) -> bool:
        """Record ``exc`` if it is a full disk (:func:`is_disk_full`); True if it was."""
        if not is_disk_full(exc):
            return False
        self._failed_at = time.monotonic()
        return True

    def full_within(self, seconds: float) -> bool:
        """Whether the disk is full now or a write failed for lack of space in the last ``seconds``."""
        return self._free_problem() is not None or time.monotonic() - self._failed_at < seconds

    def _free_problem(self) -> str | None:
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return None
        if free >= self.min_free:
            return None
        return (f"the data directory's disk is full ({free // 1024} KiB free, under {self.min_free >> 20} MiB): "
                "new tasks are refused with HTTP 507 until space is freed")

    def problem(self) -> str | None:
        """Why the disk is a problem now (for ``/healthz``), or None."""
        full = self._free_problem()
        if full:
            return full
        ago = time.monotonic() - self._failed_at
        if ago < RECENT_SECONDS:
            return (f"a write failed for lack of disk space {ago:.0f} s ago (database or data directory): "
                    "new tasks are refused with HTTP 507 until space is freed")
        return None
