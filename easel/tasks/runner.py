"""Running one claimed task through its lifecycle, inside a worker process.

Any executor (local processes now, Celery later) delivers task ids; :class:`Worker` claims and
runs them. A tool failure ends that task with ``pexit`` "1" and never stops the worker.
"""
from __future__ import annotations

import base64
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from easel import metrics
from easel.catalog import ModelCatalog
from easel.config import Settings
from easel.models import ModelManager
from easel.storage import LocalStorage
from easel.store import Store
from easel.tools import load_tool
from easel.tools.base import TaskKilled, ToolError

from . import lifecycle as lc

log = logging.getLogger("easel.worker")


class ServerStopping(Exception):
    """Raised at a denoising step when the worker must stop (server shutdown, or its parent process
    is gone); the task ends as failed with :data:`lifecycle.INTERRUPTED_MESSAGE`."""


class WorkerContext:
    """The ``ToolContext`` a tool receives for one task (see ``easel.tools.base``)."""

    def __init__(self, worker: "Worker", task_id: int, output_dir: Path, uploads_dir: Path):
        self.worker = worker
        self.store = worker.store
        self.models = worker.models
        self.task_id = task_id
        self.output_dir = output_dir
        self.uploads_dir = uploads_dir
        self.lines: list[str] = []
        self.error_lines: list[str] = []
        self._started_at: float | None = None

    def check_killed(self) -> None:
        if self.store.kill_requested(self.task_id):
            raise TaskKilled()

    def started(self) -> None:
        self.check_killed()
        lc.advance(self.store, self.task_id, lc.START)
        self._started_at = time.time()

    def wants_preview(self, step: int, total: int) -> bool:
        every = self.worker.settings.preview_interval
        return every > 0 and (step % every == 0 or step == total)

    def progress(self, step: int, total: int, preview: bytes | None = None) -> None:
        now = time.time()
        begin = self._started_at or now
        elapsed = now - begin
        speed = step / elapsed if elapsed > 0 else 0.0
        remaining = (total - step) / speed if speed > 0 else 0.0
        info = {"task": "Generating", "percentage": f"{100.0 * step / total:.0f}", "stepCurrent": str(step),
                "stepTotal": str(total), "speed": f"{speed:.2f}", "speedType": "it/s",
                "elapsedTime": f"{elapsed:.1f}s", "remainingTime": f"{remaining:.1f}s"}
        message = json.dumps({"type": "progressGenerate", "progressGenerate": info})
        if self.worker.should_stop():
            raise ServerStopping()
        status = {"status": lc.OUTPUT} if step == 1 else {}
        encoded = base64.b64encode(preview).decode() if preview else None
        if self.store.add_event(self.task_id, lc.OUTPUT, message, preview=encoded, progress=json.dumps(info), **status):
            raise TaskKilled()

    def log(self, line: str) -> None:
        self.lines.append(line)

    def error_line(self, line: str) -> None:
        """A stderr-like line (a library warning): stored and sent live as ``task_error``."""
        self.error_lines.append(line)
        self.store.add_event(self.task_id, lc.ERROR, line)

    def input_file(self, value: str) -> Path:
        name = value.removeprefix("upload:")
        path = (self.uploads_dir / name).resolve()
        if path.parent != self.uploads_dir.resolve() or not path.is_file():
            raise ToolError(f"uploaded file {name!r} is missing")
        return path


class _StderrCapture(logging.Handler):
    """Routes WARNING+ records of the ML libraries and Python warnings to a task's ``task_error``
    events while the task runs (a worker runs one task at a time)."""

    LOGGERS = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "torch")

    def __init__(self, ctx: WorkerContext):
        super().__init__(logging.WARNING)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ctx.error_line(f"{record.levelname}: {record.getMessage()}".strip())
        except Exception:  # a log line must never fail the task
            pass

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("default")  # each task sees its warnings, not only the process's first task
        for category in (DeprecationWarning, PendingDeprecationWarning):  # library-internal, not for users
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = lambda message, category, *_a, **_k: self.ctx.error_line(
            f"{category.__name__}: {message}")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)
        return False


class Worker:
    """Claims queued tasks from the store and runs them; keeps pipelines warm for its lifetime."""

    def __init__(self, settings: Settings, worker_id: str = "local-0"):
        self.settings = settings
        self.worker_id = worker_id
        metrics.set_worker(worker_id)
        self.store = Store(settings.database_url)
        self.catalog = ModelCatalog.load(settings.catalog_override)
        self.models = ModelManager(settings, self.catalog)
        self.storage = LocalStorage(settings)
        self.should_stop: Callable[[], bool] = lambda: False  # set by the executor

    def run_next(self) -> int | None:
        """Claim and run the oldest queued task; return its id, or None if the queue was empty."""
        task_id = lc.claim(self.store, self.worker_id)
        if task_id is not None:
            self.execute(task_id)
        return task_id

    def execute(self, task_id: int) -> None:
        """Walk an accepted task through preprocess, assign, start, outputs and postprocess."""
        task = self.store.get_task(task_id)
        workdir = Path(tempfile.mkdtemp(prefix=f"easel-{task.uuid}-", dir=self.settings.data_dir))
        ctx = WorkerContext(self, task_id, workdir, self.settings.uploads_dir / task.uuid)
        store = self.store
        try:
            tool = load_tool(task.tool)
            with _StderrCapture(ctx):
                lc.advance(store, task_id, lc.PREPROCESS_START)
                plan = tool.prepare(json.loads(task.inputs), ctx)
                lc.advance(store, task_id, lc.PREPROCESS_END)
                ctx.check_killed()
                lc.advance(store, task_id, lc.ASSIGN)
                paths = tool.run(plan, ctx)
            output, errors = "\n".join(ctx.lines), "\n".join(ctx.error_lines)
            lc.advance(store, task_id, lc.OUTPUT_FULL, message=output, debugoutput=output)
            lc.advance(store, task_id, lc.ERROR_FULL, message=errors, debugerror=errors)
            lc.advance(store, task_id, lc.END)
            lc.advance(store, task_id, lc.POSTPROCESS_START)
            store.add_outputs(task_id, [self.storage.save(task.uuid, p) for p in paths])
            lc.advance(store, task_id, lc.POSTPROCESS_END, pexit="0")
        except TaskKilled:
            lc.finish_killed(store, task_id)
        except ServerStopping:
            self._fail(task_id, lc.INTERRUPTED_MESSAGE, ctx)
        except Exception as exc:  # the worker must survive any tool failure
            if isinstance(exc, (ToolError, ValueError)):
                message = str(exc)
            else:
                message = f"{type(exc).__name__}: {exc}"
                log.exception("task %s failed", task_id)
            self._fail(task_id, message, ctx)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            metrics.device_memory()

    def _fail(self, task_id: int, message: str, ctx: WorkerContext) -> None:
        store = self.store
        output = "\n".join(ctx.lines)
        store.add_event(task_id, lc.ERROR, message)
        errors = "\n".join([*ctx.error_lines, message])
        lc.advance(store, task_id, lc.OUTPUT_FULL, message=output, debugoutput=output)
        lc.advance(store, task_id, lc.ERROR_FULL, message=errors, debugerror=errors)
        lc.advance(store, task_id, lc.END)
        lc.advance(store, task_id, lc.POSTPROCESS_START)
        lc.advance(store, task_id, lc.POSTPROCESS_END, pexit="1")
