"""Retention: finding the tasks that ended long ago and thinning what they keep (the sweeper,
``easel.api.maintenance``, deletes their files and rows through :mod:`.files` and :mod:`.deliveries`)."""
from __future__ import annotations

from typing import Iterable

from sqlalchemy import delete, func, select

from .db import Database
from .models import Event, Preview, Task
from .status import statuses as _statuses


class Retention:
    """Reads and deletes of the retention sweeper in the database ``db``."""

    def __init__(self, db: Database):
        self.db = db

    def ended_before(self, statuses: Iterable[str], before: float, limit: int = 500) -> list[Task]:
        """Tasks in (terminal) ``statuses`` that ended before ``before`` (epoch seconds), oldest first."""
        ended = func.coalesce(Task.postprocessendtime, Task.canceltime, Task.createtime)
        with self.db.read() as s:
            return list(s.scalars(select(Task).where(Task.status.in_(_statuses(statuses)), ended < before)
                                  .order_by(Task.id).limit(limit)))

    def thin_events(self, statuses: Iterable[str], before: float, types: Iterable[str]) -> int:
        """Delete the events of ``types`` of tasks in (terminal) ``statuses`` that ended before
        ``before`` (epoch seconds), and all those tasks' previews, one statement each; returns how
        many events were deleted."""
        ended = func.coalesce(Task.postprocessendtime, Task.canceltime, Task.createtime)
        old = select(Task.id).where(Task.status.in_(_statuses(statuses)), ended < before)
        with self.db.session() as s:
            s.execute(delete(Preview).where(Preview.task_id.in_(old)))
            return s.execute(delete(Event).where(Event.type.in_(list(types)), Event.task_id.in_(old))).rowcount or 0

