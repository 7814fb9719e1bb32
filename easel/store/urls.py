"""What a database URL (SQLAlchemy's form) names: the backend, and a SQLite database's file.

One parser for every module that needs it (the store's write lock and schema, the live-push
backend choice and its wake-up registry), so they cannot disagree about which file is meant.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url


def _dialect(database_url: str) -> str:
    """The dialect of a SQLAlchemy URL, its driver left out (``postgresql+psycopg://`` gives ``postgresql``)."""
    return database_url.split(":", 1)[0].split("+", 1)[0]


def is_postgres(database_url: str) -> bool:
    """Whether a SQLAlchemy URL names PostgreSQL (any driver, e.g. ``postgresql+psycopg://``)."""
    return _dialect(database_url) in ("postgresql", "postgres")


def is_sqlite(database_url: str) -> bool:
    """Whether a SQLAlchemy URL names SQLite (any driver, file or in-memory)."""
    return _dialect(database_url) == "sqlite"


def sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite URL (``sqlite:////abs/easel.db`` gives ``/abs/easel.db``; a relative
    ``sqlite:///rel.db`` is relative to the working directory, as SQLite opens it); None for any
    other database and for an in-memory one (``sqlite://``, ``:memory:``, ``file::memory:``), which
    no other process can share. Query parameters (``?timeout=3``) are not part of the path.

    Raises:
        sqlalchemy.exc.ArgumentError: the URL cannot be parsed at all.
    """
    if not is_sqlite(database_url):
        return None
    database = make_url(database_url).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return Path(database)
