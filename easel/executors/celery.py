"""The Celery executor: a fleet of ``easel worker`` processes fed through a broker (Redis or RabbitMQ).

Two process kinds share the database (the single source of truth) and the broker:

- ``easel serve --executor celery --workers 0`` (any number, behind a load balancer): stores each
  task as always, then publishes **only its id** to the queue of its model family
  (``<queue_prefix>.<family>``, :data:`easel.catalog.FAMILIES`, chosen by
  :meth:`easel.catalog.ToolSpec.model_family`), so a worker serves what it keeps warm;
- ``easel worker`` (one per GPU): a Celery worker on the queues of the families it serves. For
  each delivered id it claims *that* task through the store (:func:`easel.tasks.lifecycle.claim`
  with ``task_id``: a conditional UPDATE from ``task_queue``) and runs it with the same
  :class:`easel.tasks.runner.Worker` as the local executor: leases, heartbeat, kill flag, lifecycle.
  A message delivered twice finds the task claimed already and runs nothing.

The broker only delivers ids; it holds no state the store does not also hold. So:

- **Kill** is the store's flag, read by the worker at every denoising step, on whichever machine
  it runs; never ``revoke(terminate=True)``, which would kill the warm process.
- **A worker that dies** (``kill -9``, OOM, a lost machine) stops renewing its task's lease; an
  API process's maintenance pass ends the task by the lease rules (failed, or queued again when
  ``requeue_unstarted`` and it never started). Its unacknowledged message is redelivered by the
  broker (RabbitMQ at once, Redis after the visibility timeout) and finds the task no longer
  queued: nothing runs twice.
- **Who publishes again** (one mechanism): every API process's maintenance pass
  (:meth:`CeleryExecutor.maintain`) publishes the id of each queued task that was never published
  (the API died between storing and publishing, or the broker was down: ``dispatched_at`` empty
  for 2 s), was queued again by the lease rules (:func:`lifecycle.requeue` empties
  ``dispatched_at``), or was last published ``broker_redeliver_seconds`` ago (a message lost with
  a broker that restarted without persistence). A conditional UPDATE of ``dispatched_at`` makes
  one process the publisher.

Celery settings, chosen for tasks that hold a GPU for seconds to an hour (``docs/deploy.md``):
late acknowledgement, reject on worker lost, prefetch 1, one task at a time per process, the
``threads`` pool (no fork after CUDA is initialised; the broker connection's heartbeats and the
store lease's heartbeat thread keep running while a task computes), and a broker visibility
timeout / RabbitMQ consumer timeout longer than the longest task (:func:`visibility_timeout`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading

from easel.catalog import FAMILIES, families
from easel.clock import SYSTEM, Clock
from easel.config import Settings

from . import Executor

log = logging.getLogger("easel.executor.celery")

TASK_NAME = "easel.run_task"
NEVER_PUBLISHED_GRACE = 2.0  # seconds between storing a task and its first publication by the API that stored it
HEALTH_INTERVAL = 5.0  # seconds between broker reachability checks of an API process
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}


def check_queues(fleet) -> tuple[str, ...]:
    """The families a worker of ``fleet`` (its :class:`easel.config.FleetSettings`) serves:
    ``fleet.queues``, or every family the registered tools declare when it is empty.

    Raises:
        ValueError: a name that is not such a family (the message names the setting and lists
            the accepted values), e.g. ``queues must be among sd15, sdxl, ..., not 'sd3'``.
    """
    known = families()
    unknown = [q for q in fleet.queues if q not in known]
    if unknown:
        raise ValueError(f"queues must be among {', '.join(known)}, not {', '.join(map(repr, unknown))}")
    return tuple(fleet.queues) or tuple(known)


def queue_name(settings: Settings, family: str) -> str:
    """The Celery queue of a model family: ``<queue_prefix>.<family>`` (e.g. ``easel.sdxl``)."""
    return f"{settings.fleet.queue_prefix}.{family}"


def visibility_timeout(settings: Settings) -> float:
    """Seconds a delivered message may stay unacknowledged: ``Settings.fleet.broker_visibility_timeout``,
    or when 0, ``task_timeout_seconds`` + ``lease_seconds`` + 300 (one day without a task timeout),
    so that the broker never hands a running task's message to another worker."""
    if settings.fleet.broker_visibility_timeout > 0:
        return settings.fleet.broker_visibility_timeout
    if settings.worker.task_timeout_seconds <= 0:
        return 86400.0
    return settings.worker.task_timeout_seconds + settings.worker.lease_seconds + 300.0


def is_amqp(url: str) -> bool:
    """Whether ``url`` names a RabbitMQ (AMQP 0-9-1) broker rather than Redis."""
    return url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def celery_config(settings: Settings) -> dict:
    """The Celery configuration shared by the API (publisher) and ``easel worker`` (consumer).

    Every key is a documented Celery setting; ``docs/deploy.md`` says why each value.

    Returns:
        A dict for ``Celery.conf.update``: the broker URL and its transport options (Redis:
        ``visibility_timeout`` in seconds and ``global_keyprefix`` ``<queue_prefix>:``), one
        durable queue per family (RabbitMQ: with ``x-consumer-timeout`` in milliseconds), late
        acks, reject on worker lost, prefetch 1, concurrency 1 on the ``threads`` pool, JSON only,
        no results, no remote control.
    """
    from kombu import Exchange, Queue

    timeout = visibility_timeout(settings)
    amqp = is_amqp(settings.fleet.broker_url)
    exchange = Exchange(settings.fleet.queue_prefix, type="direct", durable=True)
    arguments = {"x-consumer-timeout": int(timeout * 1000)} if amqp else None
    queues = [Queue(queue_name(settings, f), exchange, routing_key=queue_name(settings, f), durable=True,
                    queue_arguments=arguments) for f in FAMILIES]
    return {
        "broker_url": settings.fleet.broker_url,
        "broker_transport_options": {} if amqp else {"visibility_timeout": timeout,
                                                     "global_keyprefix": f"{settings.fleet.queue_prefix}:"},
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 4.0,
        "task_queues": queues,
        "task_default_queue": queue_name(settings, FAMILIES[0]),
        "task_default_exchange": settings.fleet.queue_prefix,
        "task_create_missing_queues": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_publish_retry_policy": PUBLISH_RETRY,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_pool": "threads",
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
    }


def make_app(settings: Settings):
    """A Celery application configured by :func:`celery_config` (not set as the current app).

    Raises:
        RuntimeError: Celery is not installed (the ``fleet`` extra).
    """
    try:
        from celery import Celery
    except ImportError:
        raise RuntimeError("the Celery executor needs the `fleet` extra: pip install 'easel-server[fleet]'") from None

    app = Celery("easel", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def sanitized(url: str) -> str:
    """``url`` with its password masked (for logs and ``/healthz``)."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


class CeleryExecutor(Executor):
    """The API side: publishes task ids to the family queues; runs no worker itself.

    ``clock``: where publication times are read (``dispatched_at``, the redelivery age; tests pass
    a ``ManualClock``).
    """

    def __init__(self, settings: Settings, clock: Clock = SYSTEM):
        from easel.catalog import ModelCatalog, load_tools
        from easel.store import Store

        self.clock = clock

        self.settings = settings
        self.app = make_app(settings)
        self.store = Store(settings.core.database_url)
        self.catalog = ModelCatalog.load(settings.core.catalog_override)
        self.tools = load_tools()
        self._health = (False, "the broker has not been checked yet")
        self._stop = threading.Event()
        self._checker: threading.Thread | None = None

    def queue_for(self, tool: str, inputs: dict) -> str:
        """The queue of a task of ``tool`` with validated ``inputs`` (its model family's)."""
        spec = self.tools.get(tool)
        return queue_name(self.settings, spec.model_family(inputs, self.catalog) if spec else FAMILIES[0])

    def start(self) -> None:
        self.check_broker()
        self._checker = threading.Thread(target=self._check_loop, name="easel-broker-check", daemon=True)
        self._checker.start()

    def _check_loop(self) -> None:
        while not self._stop.wait(HEALTH_INTERVAL):
            self.check_broker()

    def check_broker(self) -> tuple[bool, str]:
        """Connect to the broker once (at most a few seconds) and record the answer for :meth:`health`."""
        where = sanitized(self.settings.fleet.broker_url)
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=3)
            self._health = (True, f"broker {where} reachable; tasks run on `easel worker` processes")
        except Exception as exc:  # any transport error: unreachable, refused, authentication
            self._health = (False, f"the broker {where} is unreachable: {type(exc).__name__}: {exc}")
        return self._health

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)``: whether the broker answered the latest check (every 5 s)."""
        return self._health

    def submit(self, task_id: int) -> None:
        """Publish a newly stored task's id. A failure is logged, not raised: the task is stored
        and the next maintenance pass publishes it (see the module's "who publishes again")."""
        task = self.store.get_task(task_id)
        if task is not None:
            self.publish(task)

    def publish(self, task, due_before: float | None = None) -> bool:
        """Publish ``task``'s id to its family's queue if it is still queued (and, with
        ``due_before``, was never published or last published before that time); True if sent."""
        from easel.tasks import lifecycle as lc

        if not self.store.mark_dispatched(task.id, lc.QUEUE, self.clock.now(), due_before):
            return False
        queue = self.queue_for(task.tool, json.loads(task.inputs or "{}"))
        try:
            self.app.send_task(TASK_NAME, args=[task.id], queue=queue, routing_key=queue,
                               retry=True, retry_policy=PUBLISH_RETRY)
        except Exception as exc:  # broker down: the maintenance pass publishes it later
            log.warning("task %s: publishing to %s failed (%s: %s); it stays queued and is published again later",
                        task.id, queue, type(exc).__name__, exc)
            self.store.clear_dispatched(task.id, lc.QUEUE)
            return False
        return True

    def maintain(self) -> list[int]:
        """Publish the queued tasks whose publication is missing or old; returns their ids."""
        from easel.tasks import lifecycle as lc

        now = self.clock.now()
        again = now - self.settings.fleet.broker_redeliver_seconds if self.settings.fleet.broker_redeliver_seconds > 0 else None
        sent = [task.id for task in self.store.due_for_dispatch(lc.QUEUE, now - NEVER_PUBLISHED_GRACE, again)
                if self.publish(task, due_before=again if again is not None else 0.0)]
        if sent:
            log.info("published queued tasks again: %s", sent)
        return sent

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._checker is not None:
            self._checker.join(timeout)
        self.app.close()
        self.store.engine.dispose()


class FleetWorker:
    """What one ``easel worker`` process runs for each delivered id: a warm
    :class:`easel.tasks.runner.Worker` (models stay loaded between tasks) claiming that task."""

    def __init__(self, settings: Settings, worker_id: str):
        from easel.malloc import freeze_startup_objects, tune_allocator
        from easel.tasks.runner import Worker
        from easel.tasks.threads import apply_torch_threads

        # a fleet worker's machine runs no API: torch keeps its default unless EASEL_TORCH_THREADS is set
        apply_torch_threads(settings.worker, shares_cpu_with_api=False)
        tune_allocator()  # the denoising steps reuse their memory (easel.malloc)
        self.worker = Worker(settings, worker_id)
        freeze_startup_objects()  # a collection during a load walks only the load's objects (easel.malloc)
        self.stopping = threading.Event()
        # set when Celery begins its shutdown (SIGTERM): the running task stops at its next step
        # and ends as failed with the local executor's "server stopped" reason
        self.worker.should_stop = self.stopping.is_set

    def handle(self, task_id: int) -> str:
        """Claim and run ``task_id``; ``"ran"``, or ``"skipped"`` when it is no longer queued."""
        return "ran" if self.worker.run_task(task_id) else "skipped"


def default_worker_id() -> str:
    """``celery-<host>-<pid>``: the id a worker writes into the tasks it holds (at most 64 chars)."""
    return f"celery-{socket.gethostname()[:40]}-{os.getpid()}"


def run_worker(settings: Settings, worker_id: str | None = None, loglevel: str = "INFO") -> None:
    """Run a Celery worker on the queues of ``settings.fleet.queues`` (all families when empty) until
    it is stopped (SIGTERM: warm shutdown). Blocks.

    Raises:
        ValueError: an unknown family in ``settings.fleet.queues``.
    """
    served = check_queues(settings.fleet)
    from celery.signals import worker_shutting_down

    worker_id = worker_id or default_worker_id()
    app = make_app(settings)
    fleet = FleetWorker(settings, worker_id)

    @app.task(name=TASK_NAME, bind=True, max_retries=20)
    def run_task(self, task_id):
        try:
            outcome = fleet.handle(int(task_id))
        except Exception as exc:  # the store is unreachable: try again later (the claim decides)
            log.exception("task %s: claiming or ending it failed; retrying", task_id)
            raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries))
        log.info("task %s %s by %s", task_id, outcome, worker_id)
        return outcome

    worker_shutting_down.connect(lambda **_kw: fleet.stopping.set(), weak=False)
    queues = ",".join(queue_name(settings, f) for f in served)
    log.info("easel worker %s on %s, queues %s", worker_id, sanitized(settings.fleet.broker_url), queues)
    app.worker_main(["worker", "--pool=threads", "--concurrency=1", "--prefetch-multiplier=1", "-Q", queues,
                     "-n", f"{worker_id}@%h", f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
                     "--without-heartbeat"])
