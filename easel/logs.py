"""Logging of the server and its workers: one format, Easel's lines at ``Settings.core.log_level``,
the ML libraries' chatter at DEBUG.

- ``Settings.core.log_format``: ``text`` (``time process level logger: message``) or ``json`` (one
  object per line with ``time``, ``level``, ``logger``, ``process``, ``message`` and, on an
  exception, ``exc_info``), for log shippers.
- The ML libraries (diffusers, transformers, huggingface_hub, peft, accelerate, torch) log
  through the same handler, with every record demoted to DEBUG: their warnings ("No LoRA keys
  associated to CLIPTextModel found", "CLIPImageProcessor requires torchvision") are benign for
  Easel's use and were read as errors. Their tqdm progress bars ("Loading weights", "Writing
  model shards") are off unless the level is DEBUG. Python warnings outside a task go to DEBUG
  too; inside a task, the worker adds them to the task's ``debugoutput``
  (:mod:`easel.tasks.runner`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

LIBRARIES = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "torch", "PIL", "httpx",
             "urllib3", "filelock", "celery", "kombu", "multipart", "asyncio", "alembic", "py.warnings")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
    ``process`` (the worker id in workers), ``message``, and ``exc_info`` when there is one."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out = {"time": stamp, "level": record.levelname, "logger": record.name, "process": self.process,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class DemoteLibraries(logging.Filter):
    """A handler filter: records of :data:`LIBRARIES` become DEBUG records, kept only when
    ``debug`` (the handler's level check runs before filters, so the demotion decides here)."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in LIBRARIES or record.name == "py.warnings":
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.debug
        return True


def configure_logging(core, process: str = "") -> None:
    """Set up this process's logging from ``core`` (the :class:`easel.config.CoreSettings`:
    ``log_format``, ``log_level``); call once
    at the start of ``easel serve``, of each worker process and of ``easel worker``.

    ``process`` names the process in each line (e.g. a worker id; default ``easel-<pid>``).
    Processes that import the ML libraries also call :func:`quiet_libraries`.
    """
    process = process or f"easel-{os.getpid()}"
    level = getattr(logging, core.log_level.upper())
    handler = logging.StreamHandler(sys.stderr)
    if core.log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(DemoteLibraries(level <= logging.DEBUG))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level > logging.DEBUG else logging.DEBUG)
    logging.getLogger("easel").setLevel(level)
    for name in LIBRARIES:  # their records reach the handler above, which demotes them
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)  # Python warnings -> "py.warnings" -> DEBUG


def quiet_libraries(debug: bool = False) -> None:
    """Route diffusers' and transformers' own log handlers into the root logger (so
    :class:`DemoteLibraries` applies) and turn their and huggingface_hub's tqdm progress bars off
    unless ``debug``. Libraries that are not installed (or not importable) are skipped."""
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            lib = __import__(module, fromlist=["_"])
        except Exception:  # noqa: BLE001 - an optional library that fails to import is not ours to report
            continue
        lib.disable_default_handler()
        lib.enable_propagation()
        if not debug:
            lib.disable_progress_bar()
    if not debug:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except Exception:  # noqa: BLE001
            pass
