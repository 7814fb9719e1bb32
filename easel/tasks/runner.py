"""Running one claimed task through its lifecycle, inside a worker process.

Any executor (local processes, or Celery workers of a fleet) delivers task ids; :class:`Worker`
claims and runs them. A tool failure ends that task with ``pexit`` "1" and never stops the worker.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from easel import metrics
from easel.catalog import ModelCatalog
from easel.config import Settings
from easel.diskfull import is_disk_full
from easel.images import ImageInputError
from easel.net import partfiles
from easel.weights import ModelManager
from easel.storage import create_storage, upload_key
from easel.storage.inputs import local_copy
from easel.store import Store
from easel.store.notify import Publisher
from easel.tools import load_tool
from easel.tools.base import TaskKilled, ToolError

from . import inputs as task_inputs
from . import lifecycle as lc

log = logging.getLogger("easel.worker")


def torch_thread_count(settings: Settings, shares_cpu_with_api: bool, cuda: bool, cores: int) -> int | None:
    """The CPU threads a worker process should give torch (None: torch's default).

    ``Settings.torch_threads`` when set; otherwise, for a worker on the same machine as the API
    (``shares_cpu_with_api``) and without CUDA, the ``cores`` left after one for the API divided
    among ``Settings.workers`` workers, at least 1: with every core busy in torch, the API's
    answers wait for a core and a polling client slows the denoising loop (28 % measured with 2
    threads on 2 cores, see ``docs/benchmarks.md``). With CUDA the denoiser does not run on
    those threads: torch's default.
    """
    if settings.worker.torch_threads > 0:
        return settings.worker.torch_threads
    if not shares_cpu_with_api or cuda:
        return None
    return max(1, (cores - 1) // max(1, settings.worker.workers))


def apply_torch_threads(settings: Settings, shares_cpu_with_api: bool) -> int | None:
    """Set this process's torch threads by :func:`torch_thread_count`; returns the count set (None:
    left at torch's default). Call it in a worker process before its first inference."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    threads = torch_thread_count(settings, shares_cpu_with_api, torch.cuda.is_available(), cores)
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


LOADING = lc.LOADING  # the phase from task_assign to the first step (load, or reuse when warm)


class ServerStopping(Exception):
    """Raised at a denoising step when the worker must stop (server shutdown, or its parent process
    is gone); the task ends as failed with :data:`lifecycle.INTERRUPTED_MESSAGE`."""


class TaskLost(Exception):
    """The task was ended by someone else (killed, timed out, its lease expired) or re-assigned:
    this worker stops working on it and writes nothing more for it."""


class TaskTimedOut(Exception):
    """The task ran past ``Settings.task_timeout_seconds``."""


class WorkerContext:
    """The ``ToolContext`` a tool receives for one task (see ``easel.tools.base``)."""

    def __init__(self, worker: "Worker", task_id: int, output_dir: Path, task_uuid: str, project_id: int = 0,
                 extras_requested: bool = False):
        self.worker = worker
        self.store = worker.store
        self.models = worker.models
        self.task_id = task_id
        self.project_id = project_id
        self.output_dir = output_dir
        self.task_uuid = task_uuid
        # stored inputs read from a storage without local files (S3) are downloaded here;
        # it is inside the task's scratch folder, removed when the task ends
        self.inputs_dir = output_dir / ".inputs"
        self.extras_requested = extras_requested
        self.extra_paths: list[Path] = []
        self.lines: list[str] = []
        self.error_lines: list[str] = []
        self._started_at: float | None = None
        self._download_started: float | None = None  # first "Downloading" report of this task

    def check_killed(self) -> None:
        if self.worker.heartbeat_lost.is_set():
            raise TaskLost()
        if self.worker.timed_out():
            raise TaskTimedOut()
        if self.store.kill_requested(self.task_id):
            raise TaskKilled()

    def started(self) -> None:
        self.check_killed()
        self.worker.advance(self.task_id, lc.START)
        self._started_at = time.time()

    def wants_preview(self, step: int, total: int) -> bool:
        every = self.worker.settings.worker.preview_interval
        return every > 0 and (step % every == 0 or step == total)

    def progress(self, step: int, total: int, preview: bytes | None = None, task: str = "Generate",
                 speed_type: str = "it/s", since: float | None = None, write: Callable | None = None) -> None:
        now = time.time()
        begin = since or self._started_at or now
        elapsed = now - begin
        speed = step / elapsed if elapsed > 0 else 0.0
        remaining = (total - step) / speed if speed > 0 else 0.0
        info = {"task": task, "percentage": f"{100.0 * step / total:.0f}", "stepCurrent": str(step),
                "stepTotal": str(total), "speed": f"{speed:.2f}", "speedType": speed_type,
                "elapsedTime": f"{elapsed:.1f}s", "remainingTime": f"{remaining:.1f}s"}
        message = json.dumps({"type": "progressGenerate", **info})  # Wiro's flat task_output message
        if self.worker.should_stop():
            raise ServerStopping()
        if self.worker.timed_out():
            raise TaskTimedOut()
        extra = {"preview": preview} if write is None else {}
        kill = (write or lc.progress)(self.store, self.task_id, message, info, owner=self.worker.worker_id,
                                      lease_seconds=self.worker.settings.worker.lease_seconds, **extra)
        if kill is None:
            raise TaskLost()
        if kill:
            raise TaskKilled()

    def download_progress(self, done: int, total: int) -> None:
        """Weights being downloaded for this task (bytes ``done`` of ``total``): a progress frame
        with ``task`` "Downloading"; raises as :meth:`progress` does (kill, stop, time limit)."""
        self._download_started = self._download_started or time.time()
        self.progress(done, max(total, done, 1), task="Downloading", speed_type="B/s", since=self._download_started,
                      write=lc.preprocess_progress)

    def log(self, line: str) -> None:
        self.lines.append(line)

    def input_file(self, value: str) -> Path:
        """A local file of the Run's multipart upload ``upload:<name>`` (through the storage)."""
        name = value.removeprefix("upload:")
        try:
            return local_copy(self.worker.storage, upload_key(self.task_uuid, name), self.inputs_dir, "")
        except (ImageInputError, ValueError):
            raise ToolError(f"uploaded file {name[:80]!r} is missing") from None

    def image(self, field: str, value: str):
        return task_inputs.load_image(self, field, value)

    def extra_output(self, name: str, image) -> None:
        if self.extras_requested:
            self.extra_paths.append(task_inputs.save_extra(self.output_dir, name, image))


class _StderrCapture(logging.Handler):
    """While a task runs, routes WARNING+ records of the ML libraries and Python warnings to the
    task's ``debugoutput`` (and this process's log at DEBUG), never to ``task_error``: they are
    benign for Easel's use ("No LoRA keys associated to CLIPTextModel found", "CLIPImageProcessor
    requires torchvision"), and Wiro's clients show ``task_error`` lines as errors. A task's own
    failure still ends with its message in ``task_error`` and ``debugerror``. A worker runs one
    task at a time."""

    LOGGERS = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "torch")

    def __init__(self, ctx: WorkerContext):
        super().__init__(logging.WARNING)
        self.ctx = ctx

    def note(self, line: str) -> None:
        try:
            self.ctx.log(line)
            log.debug("task %s: %s", self.ctx.task_id, line)
        except Exception:  # a log line must never fail the task
            pass

    def emit(self, record: logging.LogRecord) -> None:
        self.note(f"{record.levelname}: {record.getMessage()}".strip())

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("default")  # each task sees its warnings, not only the process's first task
        for category in (DeprecationWarning, PendingDeprecationWarning, ResourceWarning):  # library-internal
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = lambda message, category, *_a, **_k: self.note(f"{category.__name__}: {message}")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
        return False


class Worker:
    """Claims queued tasks from the store and runs them; keeps pipelines warm for its lifetime.

    While a task runs, a heartbeat thread renews the task's lease every third of
    ``Settings.lease_seconds`` (downloads and model loads make no step writes), notices when the
    task was ended elsewhere (then the next step stops it), ends the task at
    ``task_timeout_seconds``, and, when the worker was told to stop but is stuck in a long phase
    (or its server process is gone), fails the task and exits the process.
    """

    STOP_GRACE = 3.0  # seconds a stop request may wait for the next step before the process exits

    def __init__(self, settings: Settings, worker_id: str = "local-0"):
        self.settings = settings
        self.worker_id = worker_id
        metrics.set_worker(worker_id)
        self.store = Store(settings.core.database_url, wakeups=Publisher.for_settings(settings.live, settings.core.database_url))
        self.catalog = ModelCatalog.load(settings.core.catalog_override)
        self.storage = create_storage(settings)
        self.models = ModelManager(settings, self.catalog, self.storage)
        # downloads a dead worker left half done on this machine (a fleet worker's own models dir too)
        partfiles.remove_abandoned(settings.core.models_dir / "fetched", settings.fetch.fetch_total_timeout_seconds)
        self.should_stop: Callable[[], bool] = lambda: False  # set by the executor
        self.exit_process: Callable[[int], None] = os._exit  # what the heartbeat calls when stuck while stopping
        self.heartbeat_lost = threading.Event()
        self._deadline: float | None = None
        self.current_task: int | None = None  # the task being executed, for :meth:`abandon`
        self.warm: list[str] = []  # tools preloaded or run successfully by this worker (``/readyz``)

    def abandon(self, task_id: int) -> None:
        """End ``task_id`` as failed with :data:`lifecycle.INTERRUPTED_MESSAGE` because this
        worker is stopping without finishing it (its server stopped or died); a task already
        ended elsewhere is left as it is."""
        task = self.store.get_task(task_id)
        if task is not None:
            lc.fail(self.store, task, lc.INTERRUPTED_MESSAGE, owner=self.worker_id)

    def run_next(self) -> int | None:
        """Claim and run the oldest queued task; return its id, or None if the queue was empty."""
        task_id = lc.claim(self.store, self.worker_id, self.settings.worker.lease_seconds, preprocess=True)
        if task_id is not None:
            self.execute(task_id)
        return task_id

    def run_task(self, task_id: int) -> bool:
        """Claim ``task_id`` if it is still queued and run it (a broker delivered this id).

        Returns:
            False, running nothing, when the task is no longer queued (claimed by another worker,
            cancelled, ended, or unknown): a message delivered twice runs nothing twice.
        """
        if lc.claim(self.store, self.worker_id, self.settings.worker.lease_seconds, task_id=task_id, preprocess=True) is None:
            return False
        self.execute(task_id)
        return True

    def advance(self, task_id: int, status: str, message: str = "", **values) -> None:
        """This worker's guarded transition; raises :class:`TaskLost` when it was rejected."""
        self.advance_through(task_id, [(status, message, values)])

    def advance_through(self, task_id: int, steps: list[tuple[str, str, dict]], outputs: list[dict] = ()) -> None:
        """Several transitions with no work between them, in one transaction, with ``outputs``
        (:func:`lifecycle.advance_through`); raises :class:`TaskLost` when one was rejected."""
        if not lc.advance_through(self.store, task_id, steps, owner=self.worker_id,
                                  lease_seconds=self.settings.worker.lease_seconds, outputs=outputs):
            raise TaskLost()

    def _closing(self, output: str, errors: str) -> list[tuple[str, str, dict]]:
        """The stages between the end of inference and the outputs, written together."""
        return [(lc.OUTPUT_FULL, output, {"debugoutput": output}), (lc.ERROR_FULL, errors, {"debugerror": errors}),
                (lc.END, "", {}), (lc.POSTPROCESS_START, "", {})]

    def timed_out(self) -> bool:
        return self._deadline is not None and self.store.clock.now() > self._deadline

    def _heartbeat(self, task_id: int, done: threading.Event) -> None:
        lease = self.settings.worker.lease_seconds
        renew_every = max(0.05, lease / 3)
        next_renew = time.monotonic() + renew_every
        stopping_since = None
        while not done.wait(min(0.5, renew_every)):
            try:
                if self.should_stop():
                    stopping_since = stopping_since or time.monotonic()
                    if time.monotonic() - stopping_since > self.STOP_GRACE:
                        self.abandon(task_id)
                        log.warning("task %s: stopping while in a long phase; worker exits", task_id)
                        self.exit_process(3)
                        return
                if self.timed_out():
                    task = self.store.get_task(task_id)
                    lc.fail(self.store, task, lc.TIMEOUT_MESSAGE.format(seconds=self.settings.worker.task_timeout_seconds),
                            owner=self.worker_id)
                    self.heartbeat_lost.set()
                    return
                if time.monotonic() >= next_renew:
                    next_renew = time.monotonic() + renew_every
                    if not self.store.renew_lease(task_id, self.worker_id, self.store.clock.now() + lease, lc.RUNNING):
                        self.heartbeat_lost.set()  # ended elsewhere: stop at the next step
                        return
            except Exception:  # a store hiccup must not end the heartbeat; the next beat retries
                log.exception("task %s: heartbeat failed", task_id)

    def execute(self, task_id: int) -> None:
        """Walk a claimed task (``task_preprocess_start``, see :func:`lifecycle.claim`) through
        preprocess, assign, start, outputs and postprocess."""
        task = self.store.get_task(task_id)
        try:
            workdir = Path(tempfile.mkdtemp(prefix=f"easel-{task.uuid}-", dir=self.settings.core.data_dir))
        except OSError as exc:  # e.g. the data directory is gone or full: the task ends, the worker survives
            log.error("task %s: no scratch folder in %s: %s", task_id, self.settings.core.data_dir, exc)
            lc.fail(self.store, task, f"The worker could not create its scratch folder ({exc.strerror}). Submit it "
                                      "again.", owner=self.worker_id)
            return
        self.current_task = task_id
        timeout = self.settings.worker.task_timeout_seconds
        self._deadline = (task.accepttime or self.store.clock.now()) + timeout if timeout > 0 else None
        self.heartbeat_lost.clear()
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(task_id, done), name="easel-heartbeat", daemon=True)
        beat.start()
        inputs = json.loads(task.inputs)
        ctx = WorkerContext(self, task_id, workdir, task.uuid, task.project_id,
                            task_inputs.extras_requested(inputs))
        store = self.store
        try:
            tool = load_tool(task.tool)
            with _StderrCapture(ctx):  # the claim entered task_preprocess_start (lc.claim(preprocess=True))
                self.models.sources.progress = ctx.download_progress  # weights fetched now show as "Downloading"
                try:
                    plan = tool.prepare(inputs, ctx)
                finally:
                    self.models.sources.progress = None
                ctx.check_killed()
                # Task/Detail's progress names the phase until the first step reports "Generate"
                self.advance_through(task_id, [(lc.PREPROCESS_END, "", {}),
                                               (lc.ASSIGN, "", {"progress": json.dumps(lc.phase(LOADING))})])
                paths = tool.run(plan, ctx) + ctx.extra_paths
            ctx.check_killed()
            self.advance_through(task_id, self._closing("\n".join(ctx.lines), "\n".join(ctx.error_lines)))
            saved = self._save_outputs(task.uuid, paths)
            try:  # the outputs' rows and the last stage in one transaction: both or neither
                self.advance_through(task_id, [(lc.POSTPROCESS_END, "", {"pexit": "0"})], outputs=saved)
            except BaseException:  # no output of a task that did not succeed stays behind
                self.storage.discard(task.uuid, saved)
                raise
            if task.tool not in self.warm:
                self.warm.append(task.tool)
        except TaskLost:
            log.warning("task %s was ended elsewhere; abandoned", task_id)
        except TaskKilled:
            lc.finish_killed(store, task_id, owner=self.worker_id)
        except ServerStopping:
            self._fail(task_id, lc.INTERRUPTED_MESSAGE, ctx)
        except TaskTimedOut:
            self._fail(task_id, lc.TIMEOUT_MESSAGE.format(seconds=timeout), ctx)
        except Exception as exc:  # the worker must survive any tool failure
            if is_disk_full(exc):  # the outputs (or a model, a download) could not be written
                message = ("The server's disk is full: the task could not write its files (No space left on "
                           "device). Submit it again once the operator has freed space.")
                log.error("task %s failed: the disk is full: %s", task_id, exc)
            elif isinstance(exc, (ToolError, ValueError)):
                message = str(exc)
            elif isinstance(exc, OSError) and exc.strerror:  # never show server paths (exc.filename)
                message = f"{type(exc).__name__}: {exc.strerror}"
                log.exception("task %s failed", task_id)
            else:
                message = f"{type(exc).__name__}: {exc}"
                log.exception("task %s failed", task_id)
            self._fail(task_id, self._redact(message), ctx)
        finally:
            done.set()
            self._deadline = None
            self.current_task = None
            shutil.rmtree(workdir, ignore_errors=True)
            metrics.device_memory()

    def _save_outputs(self, task_uuid: str, paths: list[Path]) -> list[dict]:
        """Store every output, or none: on a failure (disk full) the ones already stored are removed."""
        saved: list[dict] = []
        try:
            for p in paths:
                saved.append(self.storage.save(task_uuid, p))
        except BaseException:
            self.storage.discard(task_uuid, saved)
            raise
        return saved

    def _redact(self, message: str) -> str:
        """``message`` without this server's directories (a task's error is shown to its client)."""
        for root in sorted({str(self.settings.core.data_dir), tempfile.gettempdir()}, key=len, reverse=True):
            message = message.replace(root, "<server>")
        return message

    def _fail(self, task_id: int, message: str, ctx: WorkerContext) -> None:
        """End the task as failed through Wiro's closing stages; stops quietly where a stage is
        rejected (the task was ended elsewhere meanwhile). While the disk is full (the database
        refuses the write: often the very cause of the failure) it retries until space returns,
        so that the task ends with its own reason rather than as a lost lease; the API pauses
        lease expiry meanwhile (:meth:`easel.api.maintenance.Maintenance.run_leases`)."""
        self._while_disk_full(task_id, lambda: lc.log_event(self.store, task_id, lc.ERROR, message,
                                                            owner=self.worker_id))
        self._while_disk_full(task_id, lambda: self._close_failed(task_id, message, ctx))

    def _while_disk_full(self, task_id: int, write: Callable[[], object]) -> None:
        """``write()``, again every few seconds while it fails for a full disk (until the worker
        is told to stop); any other error is raised."""
        delay = 0.5
        while True:
            try:
                write()
                return
            except Exception as exc:
                if not is_disk_full(exc) or self.should_stop():
                    raise
                log.warning("task %s: the disk is full; ending the task again in %.1f s", task_id, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)

    def _close_failed(self, task_id: int, message: str, ctx: WorkerContext) -> None:
        output = "\n".join(ctx.lines)
        errors = "\n".join([*ctx.error_lines, message])
        steps = self._closing(output, errors) + [(lc.POSTPROCESS_END, "", {"pexit": "1", "debugerror": errors})]
        task = self.store.get_task(task_id)
        done = [status for status, _, _ in steps]
        if task is not None and task.status in done:  # failed after some closing stages were written
            steps = steps[done.index(task.status) + 1:]
        if not steps:  # it has ended already (the heartbeat failed it at its time limit)
            return
        try:
            self.advance_through(task_id, steps)
        except TaskLost:
            pass
