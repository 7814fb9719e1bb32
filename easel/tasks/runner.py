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
from pathlib import Path
from typing import Callable, Sequence

from easel import metrics
from easel.catalog import ModelCatalog
from easel.config import Settings
from easel.diskfull import is_disk_full
from easel.malloc import release_free_heap_beyond
from easel.net import partfiles
from easel.weights import ModelManager
from easel.storage import create_storage
from easel.store import Store
from easel.store.notify import Publisher
from easel.tools import load_tool
from easel.tools.base import TaskKilled, ToolError

from . import inputs as task_inputs
from . import lifecycle as lc
from .context import ServerStopping, TaskLost, TaskTimedOut, WorkerContext, _StderrCapture  # noqa: F401 (re-exported)

log = logging.getLogger("easel.worker")


LOADING = lc.LOADING  # the phase from task_assign to the first step (load, or reuse when warm)


class Worker:
    """Claims queued tasks from the store and runs them; keeps pipelines warm for its lifetime.

    While a task runs, a heartbeat thread renews the task's lease every third of
    ``Settings.worker.lease_seconds`` (downloads and model loads make no step writes), notices when the
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

    def claim_next(self) -> int | None:
        """Claim the oldest queued task for this worker (its lease starts now); its id, or None if
        the queue was empty. Run it with :meth:`execute`."""
        return lc.claim(self.store, self.worker_id, self.settings.worker.lease_seconds, preprocess=True)

    def run_next(self) -> int | None:
        """Claim and run the oldest queued task; return its id, or None if the queue was empty."""
        task_id = self.claim_next()
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
        self.advance_through(task_id, [lc.Stage(status, message, values)])

    def advance_through(self, task_id: int, steps: Sequence[lc.Stage], outputs: list[dict] = ()) -> None:
        """Several transitions with no work between them, in one transaction, with ``outputs``
        (:func:`lifecycle.advance_through`); raises :class:`TaskLost` when one was rejected."""
        if not lc.advance_through(self.store, task_id, steps, owner=self.worker_id,
                                  lease_seconds=self.settings.worker.lease_seconds, outputs=outputs):
            raise TaskLost()

    def _closing(self, output: str, errors: str) -> list[lc.Stage]:
        """The stages between the end of inference and the outputs, written together."""
        return [lc.Stage(lc.OUTPUT_FULL, output, {"debugoutput": output}),
                lc.Stage(lc.ERROR_FULL, errors, {"debugerror": errors}),
                lc.Stage(lc.END), lc.Stage(lc.POSTPROCESS_START)]

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
                self.advance_through(task_id, [lc.Stage(lc.PREPROCESS_END),
                                               lc.Stage(lc.ASSIGN, values={"progress": json.dumps(lc.phase(LOADING))})])
                paths = tool.run(plan, ctx) + ctx.extra_paths
            ctx.check_killed()
            self.advance_through(task_id, self._closing("\n".join(ctx.lines), "\n".join(ctx.error_lines)))
            saved = self._save_outputs(task.uuid, paths)
            try:  # the outputs' rows and the last stage in one transaction: both or neither
                self.advance_through(task_id, [lc.Stage(lc.POSTPROCESS_END, values={"pexit": "0"})], outputs=saved)
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
            release_free_heap_beyond()  # the heap keeps at most 1 GiB free between tasks (easel.malloc)
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
        steps = self._closing(output, errors) + [lc.Stage(lc.POSTPROCESS_END, values={"pexit": "1", "debugerror": errors})]
        task = self.store.get_task(task_id)
        done = [stage.status for stage in steps]
        if task is not None and task.status in done:  # failed after some closing stages were written
            steps = steps[done.index(task.status) + 1:]
        if not steps:  # it has ended already (the heartbeat failed it at its time limit)
            return
        try:
            self.advance_through(task_id, steps)
        except TaskLost:
            pass
