"""Prometheus metrics that Easel's processes record (served at ``/metrics`` by ``easel.api.metrics``).

Every process (the API process and each worker process) records events into ``prometheus_client``
metrics defined here. ``easel serve`` runs prometheus_client's *multiprocess mode*: before any of
this is imported it points ``PROMETHEUS_MULTIPROC_DIR`` at ``<data_dir>/metrics/<host>-<pid>``
(``easel.cli.serve.prepare_metrics_dir``), the spawned workers inherit it, every process writes its
samples to memory-mapped files there, and ``/metrics`` sums them. Without the variable (a library
user calling ``create_app`` in-process) the metrics live in the process's default registry.

Gauges describing shared state (queue depth, running tasks) are not recorded here: the API reads
them from the store at scrape time (``easel.api.metrics.StoreCollector``).

Names follow Prometheus conventions: ``easel_`` prefix, base units, ``_seconds``, ``_bytes``,
``_total`` for counters (prometheus_client appends ``_total`` to a Counter's name).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator

from prometheus_client import Counter, Gauge, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _allocate_mmap_files() -> None:
    """Make prometheus_client's multiprocess files allocate their disk space before use.

    It grows each memory-mapped file with ``truncate``, which leaves holes; writing a sample into a
    hole when the disk is full (or a tmpfs over its size) raises SIGBUS and kills the process on
    the spot: the API process and its workers died that way on a full data disk, with nothing in
    the log (issue 21). ``posix_fallocate`` first turns that into an ``OSError`` (ENOSPC) raised by
    the metric update, which :func:`_safe` logs; the process and its request or task go on.
    Relies on ``MmapedDict``'s ``_f``/``_used``/``_capacity`` (prometheus_client 0.17-0.26);
    without them, or without ``posix_fallocate``, it leaves the class as it is."""
    from prometheus_client import mmap_dict, values

    base = mmap_dict.MmapedDict
    if not hasattr(os, "posix_fallocate") or getattr(values.MmapedDict, "easel_allocates", False):
        return

    class AllocatedMmapedDict(base):
        easel_allocates = True

        def __init__(self, filename, read_mode=False):
            if not read_mode:
                fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    if os.fstat(fd).st_size == 0:
                        try:
                            os.posix_fallocate(fd, 0, mmap_dict._INITIAL_MMAP_SIZE)
                        except OSError:
                            os.unlink(filename)  # an empty file would break /metrics' reading of the folder
                            raise
                finally:
                    os.close(fd)
            super().__init__(filename, read_mode)

        def _init_value(self, key):
            size = len(key.encode("utf-8")) + 4
            needed, capacity = self._used + size + (8 - size % 8) + 16, self._capacity
            while needed > capacity:
                capacity *= 2
            if capacity > self._capacity:
                os.posix_fallocate(self._f.fileno(), 0, capacity)
            super()._init_value(key)

    if all(hasattr(base, name) for name in ("_init_value", "read_value")):
        values.MmapedDict = AllocatedMmapedDict


if os.environ.get(MULTIPROC_ENV):
    _allocate_mmap_files()

# Tasks on these image tools take seconds to minutes: buckets from 50 ms to 30 min.
TASK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

TASKS = Counter("easel_tasks", "Tasks that reached a final state, by tool and final status "
                "(succeeded, failed, killed, cancelled)", ["tool", "status"])
QUEUE_WAIT = Histogram("easel_task_queue_wait_seconds", "Seconds from submit until a worker accepted the task "
                       "(until the cancel, for a task cancelled while queued), by tool and outcome",
                       ["tool", "outcome"], buckets=TASK_BUCKETS)
RUN_TIME = Histogram("easel_task_run_seconds", "Seconds from accept until the task ended (not observed for "
                     "tasks cancelled while queued), by tool and outcome", ["tool", "outcome"], buckets=TASK_BUCKETS)
MODEL_LOADS = Counter("easel_model_loads", "Pipelines loaded into a worker's cache (cold loads)", ["model"])
MODEL_LOAD_SECONDS = Histogram("easel_model_load_seconds", "Seconds one pipeline load took", ["model"],
                               buckets=LOAD_BUCKETS)
LORA_LOADS = Counter("easel_lora_loads", "LoRA adapters loaded into a pipeline as a new adapter")
LORA_HOTSWAPS = Counter("easel_lora_hotswaps", "LoRAs hot-swapped into a resident adapter slot (FLUX tools)")
CACHE_BYTES = Gauge("easel_pipeline_cache_bytes", "Bytes of weights held by a worker's warm-pipeline cache",
                    ["worker"], multiprocess_mode="livesum")
DEVICE_USED = Gauge("easel_device_memory_used_bytes", "Memory in use on a GPU (whole device, all processes), "
                    "as a worker saw it after its latest task", ["device"], multiprocess_mode="livemostrecent")
DEVICE_TOTAL = Gauge("easel_device_memory_total_bytes", "Total memory of a GPU", ["device"],
                     multiprocess_mode="livemostrecent")
DEVICE_ALLOCATED = Gauge("easel_device_memory_allocated_bytes", "GPU memory allocated by torch in one worker",
                         ["device", "worker"], multiprocess_mode="livesum")
WEBHOOKS = Counter("easel_webhook_deliveries", "Webhook delivery attempts by result (delivered, retry, "
                   "failed = given up, refused = URL not allowed)", ["result"])
WEBSOCKETS = Gauge("easel_websockets_open", "Open live-progress WebSocket connections",
                   multiprocess_mode="livesum")
LIVE_PUSH = Gauge("easel_live_push_connected", "1 while this API process's live-event wake-up listener is "
                  "subscribed (Redis pub/sub, PostgreSQL LISTEN, or a loopback socket on SQLite), by backend; 0 while waiters poll instead",
                  ["backend"], multiprocess_mode="livemax")
HTTP_REQUESTS = Counter("easel_http_requests", "HTTP requests by route template, method and status code",
                        ["route", "method", "status"])
HTTP_SECONDS = Histogram("easel_http_request_duration_seconds", "Seconds to answer an HTTP request, by route",
                         ["route", "method"])

_worker = {"id": "api"}
log = logging.getLogger("easel.metrics")


def _safe(fn: Callable) -> Callable:
    """Recording a metric must never fail a task or a request: errors are logged, not raised."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:
            log.warning("could not record a metric in %s", fn.__name__, exc_info=True)
    return wrapper


def set_worker(worker_id: str) -> None:
    """Name this process's worker (the ``worker`` label of its per-worker gauges)."""
    _worker["id"] = worker_id


def worker_label() -> str:
    return _worker["id"]


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def process_dead(pid: int) -> None:
    """Drop the live gauges of a worker process that exited (multiprocess mode only)."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def outcome(status: str, pexit: str | None, started: bool) -> str:
    """``succeeded`` / ``failed`` (ended with pexit 0 / other), ``killed`` (cancelled while
    running) or ``cancelled`` (cancelled while queued)."""
    if status == "task_cancel":
        return "killed" if started else "cancelled"
    return "succeeded" if pexit == "0" else "failed"


@_safe
def task_ended(task: Any) -> None:
    """Record a task that just reached its final state (``easel.tasks.lifecycle`` calls this once).

    Args:
        task: a ``easel.store.Task`` row: ``tool``, ``status``, ``pexit`` and the Unix-time stage
            columns ``createtime``, ``accepttime``, ``canceltime``, ``endtime``, ``postprocessendtime``.
    """
    if task is None:
        return
    started = bool(task.accepttime)
    result = outcome(task.status, task.pexit, started)
    TASKS.labels(task.tool, result).inc()
    end = task.postprocessendtime or task.canceltime or task.endtime or time.time()
    if started:
        QUEUE_WAIT.labels(task.tool, result).observe(max(0.0, task.accepttime - task.createtime))
        RUN_TIME.labels(task.tool, result).observe(max(0.0, end - task.accepttime))
    else:
        QUEUE_WAIT.labels(task.tool, result).observe(max(0.0, end - task.createtime))


@_safe
def model_loaded(key: str, seconds: float) -> None:
    """Record one pipeline load of weights ``key`` that took ``seconds``."""
    model = key[:160]
    MODEL_LOADS.labels(model).inc()
    MODEL_LOAD_SECONDS.labels(model).observe(seconds)


@_safe
def cache_bytes(used: int) -> None:
    """Bytes now held by this worker's pipeline cache."""
    CACHE_BYTES.labels(worker_label()).set(used)


@_safe
def device_memory() -> None:
    """Sample the GPU this worker uses (nothing without CUDA, or when torch is not loaded yet)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    try:
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        device = f"cuda:{index}"
        DEVICE_USED.labels(device).set(total - free)
        DEVICE_TOTAL.labels(device).set(total)
        DEVICE_ALLOCATED.labels(device, worker_label()).set(torch.cuda.memory_allocated(index))
    except Exception:  # a metric must never fail a task (e.g. a GPU in a bad state)
        pass


@_safe
def lora_loaded() -> None:
    LORA_LOADS.inc()


@_safe
def lora_hotswapped() -> None:
    LORA_HOTSWAPS.inc()


@_safe
def webhook_attempt(result: str) -> None:
    """``delivered``, ``retry``, ``failed`` (given up) or ``refused`` (URL not allowed)."""
    WEBHOOKS.labels(result).inc()


_http_children: dict = {}  # (route, method, status) -> the labelled counter and histogram (labels() costs ~10 µs)


@_safe
def http_request(route: str, method: str, status: int, seconds: float) -> None:
    key = (route, method, status)
    children = _http_children.get(key)
    if children is None:
        if len(_http_children) > 10_000:  # routes are templates, so this does not happen; never grow unbounded
            _http_children.clear()
        children = _http_children[key] = (HTTP_REQUESTS.labels(route, method, str(status)),
                                          HTTP_SECONDS.labels(route, method))
    children[0].inc()
    children[1].observe(seconds)


@_safe
def _websockets(delta: int) -> None:
    WEBSOCKETS.inc(delta)


@_safe
def live_push(backend: str, connected: bool) -> None:
    """Record whether the wake-up listener of ``backend`` (``redis``/``postgres``/``local``) is subscribed."""
    LIVE_PUSH.labels(backend).set(1 if connected else 0)


@contextlib.contextmanager
def websocket_open() -> Iterator[None]:
    """Counts one open WebSocket for the duration of the block."""
    _websockets(1)
    try:
        yield
    finally:
        _websockets(-1)
