"""Files: the outputs tasks produced and the projects' own folders and files (Files API).

Rows only: the bytes live in ``easel.storage`` under the paths these rows hold.
"""
from __future__ import annotations

import secrets
from typing import Iterable

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.engine import Connection

from .db import Database, new_token
from .models import Output, Task, UserFile
from .rows import OutputRow

_OUTPUTS = select(*Output.__table__.c).where(Output.task_id == bindparam("task_id")).order_by(Output.name)
_OUTPUTS_OF = (select(*Output.__table__.c).where(Output.task_id.in_(bindparam("ids", expanding=True)))
               .order_by(Output.task_id, Output.name))


def output_rows(task_id: int, outputs: list[dict], now: float) -> list[dict]:
    """The rows to insert for ``outputs`` (``name``, ``contenttype``, ``size``, ``path`` each)
    of ``task_id``, added at ``now`` (Unix s)."""
    return [{"id": secrets.token_hex(16), "task_id": task_id, "addedtime": now, **o} for o in outputs]


def insert_outputs(conn: Connection, task_id: int, outputs: list[dict], now: float) -> None:
    """Insert :func:`output_rows` in the transaction of ``conn``."""
    conn.execute(insert(Output), output_rows(task_id, outputs, now))


class Files:
    """Outputs and user files of the database ``db``."""

    def __init__(self, db: Database):
        self.db = db

    def delete_outputs(self, task_id: int) -> list[OutputRow]:
        """Remove the task's output rows; return them (the caller removes the files)."""
        with self.db.write() as conn:
            rows = [OutputRow(*r) for r in conn.execute(_OUTPUTS, {"task_id": task_id})]
            conn.execute(delete(Output).where(Output.task_id == task_id))
            return rows

    # -- outputs ------------------------------------------------------------------------------

    def add_outputs(self, task_id: int, outputs: list[dict]) -> None:
        """Store a task's outputs (``name``, ``contenttype``, ``size``, ``path`` each)."""
        if outputs:
            with self.db.write() as conn:
                insert_outputs(conn, task_id, outputs, self.db.clock.now())


    def outputs(self, task_id: int) -> list[OutputRow]:
        """The task's outputs by name."""
        return [OutputRow(*r) for r in self.db.rows(_OUTPUTS, {"task_id": task_id})]

    def outputs_of(self, task_ids: Iterable[int]) -> dict[int, list[OutputRow]]:
        """:meth:`outputs` of several tasks in one query: task id -> its outputs by name."""
        ids = list(task_ids)
        out: dict[int, list[OutputRow]] = {tid: [] for tid in ids}
        if ids:
            for row in self.db.rows(_OUTPUTS_OF, {"ids": ids}):
                out[row.task_id].append(OutputRow(*row))
        return out

    def output_by_key(self, accesskey: str, name: str) -> Output | None:
        """The output ``name`` of the task whose file access key is ``accesskey``, or None."""
        with self.db.read() as s:
            return s.scalar(select(Output).join(Task, Task.id == Output.task_id)
                            .where(Task.file_accesskey == accesskey, Output.name == name))

    # -- Files API ----------------------------------------------------------------------------

    def root_folder(self, project_id: int) -> UserFile:
        """The project's default folder (created on first use)."""
        with self.db.session() as s:
            root = s.scalar(select(UserFile).where(UserFile.project_id == project_id, UserFile.is_folder.is_(True),
                                                   UserFile.parent_id == "", UserFile.name == "root"))
            if root is None:
                root = UserFile(id=secrets.token_hex(16), project_id=project_id, parent_id="", is_folder=True,
                                name="root", contenttype="", size=0, path="", accesskey="", addedtime=self.db.clock.now())
                s.add(root)
            return root

    def add_user_file(self, **values) -> UserFile:
        """Insert a folder or file row (``id``, ``addedtime`` and ``accesskey`` filled in when absent)."""
        values.setdefault("id", secrets.token_hex(16))
        values.setdefault("addedtime", self.db.clock.now())
        values.setdefault("accesskey", "" if values.get("is_folder") else new_token())
        row = UserFile(**values)
        with self.db.session() as s:
            s.add(row)
        return row

    def user_file(self, project_id: int, file_id: str) -> UserFile | None:
        """A project's folder or file by id (None if it belongs to another project)."""
        with self.db.read() as s:
            return s.scalar(select(UserFile).where(UserFile.id == file_id, UserFile.project_id == project_id))

    def user_file_by_name(self, project_id: int, name: str) -> UserFile | None:
        """The project's most recently uploaded file called ``name`` (any folder)."""
        with self.db.read() as s:
            return s.scalar(select(UserFile).where(UserFile.project_id == project_id, UserFile.name == name,
                                                   UserFile.is_folder.is_(False))
                            .order_by(UserFile.addedtime.desc()).limit(1))

    def user_file_by_key(self, accesskey: str, name: str) -> UserFile | None:
        """The file ``name`` whose access key is ``accesskey`` (no folders), or None."""
        with self.db.read() as s:
            return s.scalar(select(UserFile).where(UserFile.accesskey == accesskey, UserFile.name == name,
                                                   UserFile.is_folder.is_(False)))
