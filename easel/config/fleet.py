"""``Settings.fleet``: the executor and, for a Celery fleet, its broker and queues."""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FleetSettings:
    """How tasks reach workers (``easel.executors``).

    The queue names are checked against the registered tools' families where a worker starts
    (``easel.executors.celery.check_queues``), not here: that needs the catalog.

    Attributes:
        executor: ``local`` (worker processes of ``easel serve``) or ``celery`` (the API sends task
            ids to a broker; ``easel worker`` processes run them: ``docs/deploy.md``).
        broker_url: The Celery broker of a fleet: ``redis://host:port/db`` (default
            ``redis://127.0.0.1:6379/0``) or ``amqp://user:password@host:port/vhost`` (RabbitMQ).
        queues: Model families an ``easel worker`` serves (its Celery queues), among those the
            registered tools declare (``easel.catalog.families()``); empty = all of them.
        queue_prefix: Prefix of the fleet's queue names (``<prefix>.<family>``) and, on Redis, of
            every key the broker writes, so several fleets (or test runs) can share one broker.
        broker_visibility_timeout: Seconds a delivered, unacknowledged message stays invisible
            (Redis ``visibility_timeout``) and may stay unacknowledged (RabbitMQ per-queue
            ``x-consumer-timeout``) before the broker gives it to another worker; 0 = derived:
            ``task_timeout_seconds`` + ``lease_seconds`` + 300 (one day when there is no task
            timeout), i.e. longer than the longest task.
        broker_redeliver_seconds: An API process publishes a task id again when the task is still
            queued this long after its last publication (a message lost with a broker restart);
            a task queued again by the lease rules, or whose first publication failed, is
            published at the next maintenance pass. 0 = only those.
    """

    executor: str = "local"
    broker_url: str = "redis://127.0.0.1:6379/0"
    queues: tuple[str, ...] = field(default_factory=tuple)
    queue_prefix: str = "easel"
    broker_visibility_timeout: float = 0.0
    broker_redeliver_seconds: float = 900.0

    def __post_init__(self) -> None:
        if self.executor not in ("local", "celery"):
            raise ValueError(f"executor must be 'local' or 'celery', not {self.executor!r}")
        if self.broker_url.split("://", 1)[0] not in ("redis", "rediss", "amqp", "amqps", "pyamqp"):
            raise ValueError(f"broker_url must be a redis://, rediss://, amqp:// or amqps:// URL, not {self.broker_url!r}")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", self.queue_prefix):
            raise ValueError(f"queue_prefix must be 1 to 40 letters, digits, '_' or '-', not {self.queue_prefix!r}")
