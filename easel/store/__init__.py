"""The task store: one database object and one module per aggregate, composed by :class:`Store`.

The store knows tables, not meanings: which status changes are legal lives in
``easel.tasks.lifecycle``, which builds them (:class:`Step`, :class:`Note`) and passes them in;
the store only applies them, each conditional on the task's current status. Every write commits
before it returns, so a task is durable before the API acknowledges it.

Rooms (each a class given the one :class:`Database`):

=====================  ==================================================================
:mod:`.db`             engine, migrations, the SQLite write turn, sessions, the DBAPI fast path
:mod:`.projects`       projects (API key hash, sealed secret) and signature nonces
:mod:`.submission`     new tasks, by group commit (concurrency limit, ``Idempotency-Key``)
:mod:`.taskstate`      claims, steps, events, leases, kill flags, dispatch bookkeeping
:mod:`.queries`        one task, listings, counts, queue positions, events, previews
:mod:`.deliveries`     the webhook queue and its state machine
:mod:`.files`          task outputs and the Files API's folders and files
:mod:`.retention`      old tasks and the events the sweeper thins
=====================  ==================================================================

:mod:`.status` holds the values (:class:`TaskStatus`, :class:`DeliveryStatus`) and the write
types; :mod:`.rows` the typed rows the fast reads return.
"""
from __future__ import annotations

from easel.clock import SYSTEM, Clock

from .db import HERE, Database, WriteLock, new_token
from .deliveries import Deliveries
from .files import Files
from .models import Event, Output, Preview, Project, Task, UserFile, WebhookDelivery
from .notify import Publisher
from .projects import Projects, hash_apikey
from .queries import Queries
from .retention import Retention
from .rows import EventRow, OutputRow, ProjectRow, TaskRow
from .secretbox import SecretBox, SecretKeyError
from .status import DeliveryStatus, Note, Step, TaskStatus
from .submission import LimitReached, Submission
from .taskstate import TaskState

__all__ = ["Store", "Database", "Project", "Task", "Output", "Event", "Preview", "WebhookDelivery", "UserFile",
           "TaskRow", "OutputRow", "ProjectRow", "EventRow", "TaskStatus", "DeliveryStatus", "Step", "Note",
           "new_token", "hash_apikey", "LimitReached", "SecretBox", "SecretKeyError", "WriteLock", "HERE"]


class _Via:
    """A :class:`Store` attribute that is an aggregate's (``room``) attribute ``name``."""

    def __init__(self, room: str, name: str | None = None):
        self.room, self.name = room, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, store: "Store | None", owner: type | None = None):
        if store is None:
            return self
        return getattr(getattr(store, self.room), self.name)


class Store:
    """Access to the database at ``url``: the aggregates over one :class:`Database`, as
    attributes (``store.tasks.apply(...)``) and, for the callers' convenience, their public
    methods under the names they had when the store was one class (``store.get_task(...)``).

    Arguments as :class:`Database` (``pool_size``, ``wakeups``, ``secrets``, ``clock``).
    """

    def __init__(self, url: str, pool_size: int = 5, wakeups: Publisher | None = None,
                 secrets: SecretBox | None = None, clock: Clock = SYSTEM):
        self.db = Database(url, pool_size=pool_size, wakeups=wakeups, secrets=secrets, clock=clock)
        self.projects = Projects(self.db)
        self.submission = Submission(self.db)
        self.tasks = TaskState(self.db)
        self.queries = Queries(self.db)
        self.webhooks = Deliveries(self.db)
        self.files = Files(self.db)
        self.retention = Retention(self.db)

    # the database
    url = _Via("db")
    engine = _Via("db")
    sqlite = _Via("db")
    wakeups = _Via("db")
    clock = _Via("db")
    _write_lock = _Via("db", "write_lock")
    checkpoint = _Via("db")
    migrate = _Via("db")
    secret_box = _Via("db")
    rotate_secrets = _Via("db")
    session = _Via("db")
    # projects and nonces
    create_project = _Via("projects")
    set_nonce_policy = _Via("projects")
    project_by_key = _Via("projects")
    project_by_id = _Via("projects")
    use_nonce = _Via("projects")
    # submission
    create_task = _Via("submission")
    task_by_idempotency = _Via("submission")
    _group = _Via("submission")
    # task state (written only with the lifecycle's steps)
    claim_next = _Via("tasks")
    apply = _Via("tasks")
    record = _Via("tasks")
    renew_lease = _Via("tasks")
    request_kill = _Via("tasks")
    mark_dispatched = _Via("tasks")
    clear_dispatched = _Via("tasks")
    # reads
    get_task = _Via("queries")
    tasks_of = _Via("queries")
    count_tasks = _Via("queries")
    tool_stats = _Via("queries")
    count_in = _Via("queries")
    queue_positions = _Via("queries")
    count_by_tool = _Via("queries")
    kill_requested = _Via("queries")
    task_by_uuid = _Via("queries")
    tasks_in = _Via("queries")
    events = _Via("queries")
    previews = _Via("queries")
    due_for_dispatch = _Via("queries")
    stale_tasks = _Via("queries")
    # webhook deliveries
    lease_due_deliveries = _Via("webhooks")
    settle_delivery = _Via("webhooks", "settle")
    deliveries = _Via("webhooks")
    drop_deliveries = _Via("webhooks")
    # files
    add_outputs = _Via("files")
    outputs = _Via("files")
    outputs_of = _Via("files")
    output_by_key = _Via("files")
    delete_outputs = _Via("files")
    root_folder = _Via("files")
    add_user_file = _Via("files")
    user_file = _Via("files")
    user_file_by_name = _Via("files")
    user_file_by_key = _Via("files")
    # retention
    ended_before = _Via("retention")
    thin_events = _Via("retention")
