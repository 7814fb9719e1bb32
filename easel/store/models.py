"""SQLAlchemy 2 table definitions: the single source of truth for projects, tasks and outputs.

Portable by construction: plain Integer/String/Text/Float/Boolean columns, JSON kept as Text, no
SQLite- or PostgreSQL-only types, so the same Alembic migrations run on both.
Times are Unix epoch seconds as floats (Wiro answers them as integer strings).
"""
from __future__ import annotations

from sqlalchemy import Boolean, CheckConstraint, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .status import TaskStatus


class Base(DeclarativeBase):
    pass


class Project(Base):
    """A tenant: its API key/secret, auth mode (``signature`` or ``apikey``) and, for signature
    projects, nonce policy (``lenient``: any nonce, reusable; ``strict``: each nonce once)."""

    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    apikey: Mapped[str] = mapped_column(String(80), unique=True, index=True)  # "sha256:<hex>" of the key
    # "fernet:<token>": sealed with the operator key (easel.store.secretbox; in clear before 0008)
    apisecret: Mapped[str] = mapped_column(String(512))
    auth_mode: Mapped[str] = mapped_column(String(16), default="signature")
    nonce_policy: Mapped[str] = mapped_column(String(16), default="lenient", server_default="lenient")
    created_at: Mapped[float] = mapped_column(Float)
    # how many tasks the project has (kept by ``Store.create_task``): Task/List's unfiltered total
    # without counting the project's rows
    task_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Nonce(Base):
    """A signature nonce already accepted for a project (refused if seen again)."""

    __tablename__ = "nonces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    nonce: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, index=True)
    __table_args__ = (UniqueConstraint("project_id", "nonce", name="uq_nonce_project"),)


class Task(Base):
    """One Run: inputs, lifecycle status and every stage's time, logs, exit code."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    tool: Mapped[str] = mapped_column(String(200))
    socketaccesstoken: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    file_accesskey: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    status: Mapped[str] = mapped_column(String(40))
    parameters: Mapped[str] = mapped_column(Text, default="{}")  # as the client sent them (JSON)
    inputs: Mapped[str] = mapped_column(Text, default="{}")  # validated, typed (JSON)
    callbackurl: Mapped[str] = mapped_column(Text, default="")
    debugoutput: Mapped[str] = mapped_column(Text, default="")
    debugerror: Mapped[str] = mapped_column(Text, default="")
    pexit: Mapped[str | None] = mapped_column(String(16), nullable=True)
    progress: Mapped[str] = mapped_column(Text, default="")  # latest progressGenerate (JSON)
    cost_per_second: Mapped[float] = mapped_column(Float, default=0.0)
    kill_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str] = mapped_column(String(64), default="")
    createtime: Mapped[float] = mapped_column(Float)
    accepttime: Mapped[float | None] = mapped_column(Float, nullable=True)
    preprocessstarttime: Mapped[float | None] = mapped_column(Float, nullable=True)
    preprocessendtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    assigntime: Mapped[float | None] = mapped_column(Float, nullable=True)
    starttime: Mapped[float | None] = mapped_column(Float, nullable=True)
    endtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    postprocessstarttime: Mapped[float | None] = mapped_column(Float, nullable=True)
    postprocessendtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    canceltime: Mapped[float | None] = mapped_column(Float, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # the claiming worker's lease (epoch seconds), renewed at every write and by its heartbeat;
    # a running task whose lease has passed is ended by whichever process notices (lifecycle)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the last event's per-task sequence number (assigned under this row's lock: see Event.seq)
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # when an executor last published this task's id to a broker (epoch seconds; None = not yet,
    # or queued again since): a queued task whose publication is missing or old is published again
    dispatched_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the task's place in the order of submission: 1, 2, 3, ... with no gaps, taken from the
    # ``counters`` row ``task_queue_seq`` in the transaction that inserts the task. Workers claim
    # in this order, and a queued task's position is computed from it in O(log n) (see
    # ``Store.queue_positions``) instead of counting the tasks ahead of it.
    queue_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    __table_args__ = (Index("ix_tasks_status_queue_seq", "status", "queue_seq"),
                      Index("ix_tasks_project_tool_id", "project_id", "tool", "id"),
                      UniqueConstraint("project_id", "idempotency_key", name="uq_task_idempotency"),
                      # one of easel.store.status.TaskStatus (migration 0009)
                      CheckConstraint("status IN (" + ", ".join(f"'{s.value}'" for s in TaskStatus) + ")",
                                      name="ck_tasks_status"))


class Output(Base):
    """A file a task produced, stored under the storage key ``files/<path>`` (``easel.storage``)."""

    __tablename__ = "outputs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    contenttype: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    addedtime: Mapped[float] = mapped_column(Float)


class Event(Base):
    """Every lifecycle event of a task in order (what the WebSocket replays). A progress event's
    latent preview, if it has one, is a :class:`Preview` row with the same ``(task_id, seq)``."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    type: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text, default="")  # JSON
    created_at: Mapped[float] = mapped_column(Float)
    # 1, 2, 3, ... per task, taken from ``Task.event_seq`` in the same transaction that inserts the
    # event, under the task row's lock: events of one task commit in ``seq`` order even on
    # PostgreSQL, where ``id`` (a sequence) may commit out of order. The WebSocket's cursor.
    seq: Mapped[int] = mapped_column(Integer, default=0)
    __table_args__ = (Index("ix_events_task_seq", "task_id", "seq"),)


class Preview(Base):
    """The latent preview (JPEG bytes, ``easel.tools.previews``) of the progress event
    ``(task_id, seq)``. Kept out of ``events`` so that reading a task's events (every WebSocket
    poll, most without previews) never reads the images; deleted by the retention sweeper with
    the progress events."""

    __tablename__ = "previews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    seq: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    __table_args__ = (Index("ix_previews_task_seq", "task_id", "seq", unique=True),)


class Counter(Base):
    """A named counter (``task_queue_seq``: the last ``Task.queue_seq`` given), incremented with
    ``UPDATE ... RETURNING`` inside the writing transaction, so values have no gaps."""

    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class WebhookDelivery(Base):
    """One webhook message for a terminal task, retried until delivered or given up.

    ``id`` is the Standard Webhooks ``webhook-id`` (stable across attempts); ``payload`` is the
    exact body, frozen at the first attempt so every attempt signs and sends the same bytes.
    ``status``: ``pending``, ``delivered``, ``failed`` (gave up / refused URL) or ``dropped``
    (the task's inputs and outputs were deleted before delivery).
    """

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    payload: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (Index("ix_webhook_due", "status", "next_attempt_at"),)


class UserFile(Base):
    """A folder or a file of a project's Files API (``/v1/File/FolderCreate``, ``/v1/File/Upload``).

    ``parent_id`` is the folder holding it (every project has a default ``root`` folder, made on
    first use). Files are stored under the storage key ``userfiles/<path>`` (``easel.storage``) and served
    at ``/v1/File/{accesskey}/{name}``, like outputs.
    """

    __tablename__ = "user_files"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    parent_id: Mapped[str] = mapped_column(String(32), default="")
    is_folder: Mapped[bool] = mapped_column(Boolean, default=False)
    name: Mapped[str] = mapped_column(String(255))
    contenttype: Mapped[str] = mapped_column(String(100), default="")
    size: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(Text, default="")
    accesskey: Mapped[str] = mapped_column(String(64), default="", index=True)
    addedtime: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_user_files_project_name", "project_id", "name"),)
