"""Typed, read-only rows: what the store's fast reads return instead of ``sqlalchemy.Row``.

Each is a typed named tuple with exactly the attributes of its ORM class (:mod:`.models`), in
column order, so a row read with ``select(*Table.c)`` becomes one with ``Row(*row)`` (about a
microsecond: a frozen dataclass costs 8× that, a detached ORM object 0.1 ms more). Immutable;
times are Unix seconds (float), JSON columns are text.
"""
from __future__ import annotations

from typing import NamedTuple

from .models import Event, Output, Project, Task


class TaskRow(NamedTuple):
    """A task as read (:class:`.models.Task`'s columns)."""

    id: int
    uuid: str
    project_id: int
    tool: str
    socketaccesstoken: str
    file_accesskey: str
    status: str
    parameters: str
    inputs: str
    callbackurl: str
    debugoutput: str
    debugerror: str
    pexit: str | None
    progress: str
    cost_per_second: float
    kill_requested: bool
    worker_id: str
    createtime: float
    accepttime: float | None
    preprocessstarttime: float | None
    preprocessendtime: float | None
    assigntime: float | None
    starttime: float | None
    endtime: float | None
    postprocessstarttime: float | None
    postprocessendtime: float | None
    canceltime: float | None
    idempotency_key: str | None
    lease_expires_at: float | None
    event_seq: int
    dispatched_at: float | None
    queue_seq: int | None


class OutputRow(NamedTuple):
    """A task's output file as read (:class:`.models.Output`'s columns)."""

    id: str
    task_id: int
    name: str
    contenttype: str
    size: int
    path: str
    addedtime: float


class ProjectRow(NamedTuple):
    """A project as read (:class:`.models.Project`'s columns); ``apikey`` is the stored hash and
    ``apisecret`` the secret, opened (``Projects.project_by_key``)."""

    id: int
    name: str
    apikey: str
    apisecret: str
    auth_mode: str
    nonce_policy: str
    created_at: float
    task_count: int


class EventRow(NamedTuple):
    """A task's event as read (:class:`.models.Event`'s columns) and ``preview``: its latent
    preview as base64 text when asked for (``Queries.events(previews=True)``), else None."""

    id: int
    task_id: int
    type: str
    message: str
    created_at: float
    seq: int
    preview: str | None = None


def _same_columns(row: type, model: type, extra: tuple[str, ...] = ()) -> None:
    names = row._fields
    columns = tuple(c.key for c in model.__table__.c) + extra
    if names != columns:  # a column was added to the model: add it here, in the same place
        raise ImportError(f"{row.__name__} fields {names} differ from {model.__name__} columns {columns}")


for _row, _model, _extra in ((TaskRow, Task, ()), (OutputRow, Output, ()), (ProjectRow, Project, ()),
                             (EventRow, Event, ("preview",))):
    _same_columns(_row, _model, _extra)
TASK_DEFAULTS = dict.fromkeys(TaskRow._fields)  # a new task's columns that start empty
