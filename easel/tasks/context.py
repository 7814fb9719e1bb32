"""What a tool sees of the worker while it runs one task: :class:`WorkerContext` (the
``ToolContext`` of ``easel.tools.base``: progress with previews, kill checks, input files, extra
outputs), the exceptions that end the task from inside a step, and the capture of library warnings
into the task's ``debugoutput``."""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from easel.images import ImageInputError
from easel.storage import upload_key
from easel.storage.inputs import local_copy
from easel.tools.base import TaskKilled, ToolError

from . import inputs as task_inputs
from . import lifecycle as lc

if TYPE_CHECKING:  # pragma: no cover
    from .runner import Worker

log = logging.getLogger("easel.worker")


class ServerStopping(Exception):
    """Raised at a denoising step when the worker must stop (server shutdown, or its parent process
    is gone); the task ends as failed with :data:`lifecycle.INTERRUPTED_MESSAGE`."""


class TaskLost(Exception):
    """The task was ended by someone else (killed, timed out, its lease expired) or re-assigned:
    this worker stops working on it and writes nothing more for it."""


class TaskTimedOut(Exception):
    """The task ran past ``Settings.worker.task_timeout_seconds``."""


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
