"""Background upkeep run by every API process: lease expiry and the retention sweeper.

- **Leases** (every quarter of ``Settings.worker.lease_seconds``): :func:`lifecycle.expire_leases` ends
  the running tasks whose worker stopped renewing its lease (its process, container or machine
  died) or that ran past ``task_timeout_seconds``. Any number of API processes may do this at
  once: every write is conditional, so each task is ended exactly once. Then the executor's own
  upkeep (:meth:`Executor.maintain`: the Celery executor publishes queued tasks whose delivery is
  missing, e.g. one the lease rules just queued again).
- **Retention** (every ``sweep_interval_seconds``): finished tasks older than
  ``output_retention_seconds`` (0 = never, the default) lose their outputs and uploads through the
  same path as ``Task/InputOutputDelete`` (the task record stays); upload and output folders of
  no task, worker scratch folders that belong to no unfinished task, and fetched LoRAs unused for
  ``orphan_retention_seconds`` (default 7 days), are removed; the per-step events (progress with
  its preview, warnings) of tasks that ended ``event_retention_seconds`` ago (default 7 days) are
  deleted, the lifecycle events kept. Every pass, and at start-up (the first pass runs at once), the
  leftovers of work that ended are removed whatever their age (:meth:`Maintenance.remove_leftovers`):
  ``models/fetched/*.part`` downloads that no live process is writing (a worker killed mid-download;
  :mod:`easel.net.partfiles`) and the scratch folders of tasks that have ended.
- **Checkpoints** (SQLite, every :data:`CHECKPOINT_SECONDS`): the write-ahead log is copied into
  the database file by this thread (``Store.checkpoint``), not by whichever request's commit
  happens to fill it (which then waits 10-25 ms for an fsync with every other writer behind it).

Files are found through the storage (``easel.storage``: the data directory or the bucket): one
listing of ``files/`` and ``uploads/`` per sweep (grouped by task), then one store lookup per task
folder old enough to matter, so a sweep costs the same whatever the number of old tasks whose
files are already gone.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from easel.config import Settings
from easel.diskfull import DiskWatch
from easel.net import partfiles
from easel.storage import Storage, create_storage
from easel.store import Store, Task
from easel.tasks import lifecycle as lc

log = logging.getLogger("easel.maintenance")
CHECKPOINT_SECONDS = 1.0
# a worker's scratch folder: tempfile.mkdtemp(prefix=f"easel-{task.uuid}-") in the data directory
_SCRATCH = re.compile(r"^easel-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-")


class Maintenance:
    """The upkeep thread of one API process; :meth:`run_leases` and :meth:`sweep` are callable directly."""

    def __init__(self, settings: Settings, store: Store, delete_files: Callable[[Task], None],
                 storage: Storage | None = None, executor_upkeep: Callable[[], object] | None = None,
                 disk: DiskWatch | None = None):
        """``delete_files(task)`` removes a finished task's outputs and uploads (InputOutputDelete);
        ``storage`` holds the files (default: the one ``settings.storage.storage`` names);
        ``executor_upkeep()`` (the executor's ``maintain``) runs after each lease pass; ``disk``
        is told about this thread's failures, and pauses lease expiry while the disk is full."""
        self.settings = settings
        self.disk = disk
        self.store = store
        self.delete_files = delete_files
        self.storage = storage or create_storage(settings)
        self.executor_upkeep = executor_upkeep
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="easel-maintenance", daemon=True)
        self._thread.start()
        if self.store.sqlite:
            self._checkpointer = threading.Thread(target=self._checkpoints, name="easel-checkpoint", daemon=True)
            self._checkpointer.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, getattr(self, "_checkpointer", None)):
            if thread:
                thread.join(5)

    def _checkpoints(self) -> None:
        full = False
        while not self._stop.wait(CHECKPOINT_SECONDS):
            try:
                self.store.checkpoint()
            except Exception as exc:  # never let the thread die (a locked or missing database file)
                if self.disk is None or not self.disk.noticed(exc):
                    log.exception("maintenance: checkpoint failed")
                    continue
                if not full:  # once per spell of full disk, not every second
                    log.error("maintenance: checkpoint failed: the disk is full")
                full = True
            else:
                full = False

    def _loop(self) -> None:
        s = self.settings
        next_sweep = 0.0
        while True:
            for job in (self.run_leases, self.executor_upkeep,
                        self.sweep if time.monotonic() >= next_sweep else None):
                if job is None:
                    continue
                try:
                    job()
                except Exception as exc:  # never let the thread die (database briefly locked, disk full)
                    if self.disk is not None:
                        self.disk.noticed(exc)
                    log.exception("maintenance: %s failed", getattr(job, "__name__", job))
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + s.storage.sweep_interval_seconds
            if self._stop.wait(max(0.05, s.worker.lease_seconds / 4)):
                return

    def run_leases(self) -> dict[int, str]:
        """End the tasks whose lease expired (see the module doc); returns ``{task id: how}``.
        Paused while the disk is full or was within a lease period (``disk``): a worker whose
        lease renewals failed for lack of space is not gone, and ends its task itself, with the
        reason, once space returns (``Worker._fail``)."""
        s = self.settings
        if self.disk is not None and self.disk.full_within(s.worker.lease_seconds):
            log.warning("lease expiry paused: the disk is or was full within %.0f s", s.worker.lease_seconds)
            return {}
        done = lc.expire_leases(self.store, s.worker.lease_seconds, s.worker.task_timeout_seconds, s.worker.requeue_unstarted)
        if done:
            log.warning("ended tasks whose worker is gone or that ran too long: %s", done)
        return done

    def sweep(self, now: float | None = None) -> dict[str, int]:
        """One retention pass; returns how many of each kind were removed.

        Raises:
            OSError: the storage failed (the next pass retries).
        """
        s, storage = self.settings, self.storage
        now = time.time() if now is None else now
        removed = {"tasks": 0, "orphans": 0, "fetched": 0, "events": 0}
        removed["fetched"], removed["orphans"] = self.remove_leftovers()
        expire = now - s.storage.output_retention_seconds if s.storage.output_retention_seconds > 0 else None
        orphan = now - s.storage.orphan_retention_seconds if s.storage.orphan_retention_seconds > 0 else None
        done: set[str] = set()
        for area in ("files", "uploads"):
            for name, newest in list(storage.folders(area)):
                # files are written before their task ends: a folder newer than both cut-offs
                # belongs to a task that cannot be due yet (no store lookup needed)
                if name in done or newest >= max(expire or 0.0, orphan or 0.0):
                    continue
                task = self.store.task_by_uuid(name)
                if task is None:
                    if orphan is not None and newest < orphan:  # a refused or never stored Run
                        storage.delete_prefix(f"{area}/{name}/")
                        removed["orphans"] += 1
                elif expire is not None and task.status in lc.TERMINAL and _ended(task) < expire:
                    self.delete_files(task)
                    done.add(name)
                    removed["tasks"] += 1
        if s.storage.event_retention_seconds > 0:
            removed["events"] = self.store.thin_events(lc.TERMINAL, now - s.storage.event_retention_seconds,
                                                       (lc.OUTPUT, lc.ERROR))
        if orphan is not None:
            live = {t.uuid for t in self.store.tasks_in((lc.QUEUE, *lc.RUNNING))}
            for path in _children(s.core.data_dir):  # scratch folders of workers that died mid-task
                if path.name.startswith("easel-") and path.is_dir() and _mtime(path) < orphan \
                        and path.name[len("easel-"):len("easel-") + 36] not in live:
                    shutil.rmtree(path, ignore_errors=True)
                    removed["orphans"] += 1
            # fetched LoRAs (and their URL index entries): touched whenever they are used
            for obj in list(storage.list("fetched/")):
                if obj.mtime < orphan:
                    storage.delete(obj.key)
                    removed["fetched"] += obj.key.endswith((".safetensors", ".part"))
            if storage.kind != "local":  # this machine's copies of a remote storage's LoRAs
                for path in _children(s.core.models_dir / "fetched"):
                    if path.suffix in (".safetensors", ".part") and max(_mtime(path), _atime(path)) < orphan:
                        path.unlink(missing_ok=True)
                        removed["fetched"] += 1
        return removed

    def remove_leftovers(self) -> tuple[int, int]:
        """Remove what ended work left behind, whatever its age: the ``.part`` files in
        ``<data_dir>/models/fetched`` that no live process is writing (:mod:`easel.net.partfiles`)
        and the worker scratch folders (``<data_dir>/easel-<task uuid>-*``) of tasks that have
        ended (one store read per folder; a folder of an unknown task waits for the orphan
        retention in :meth:`sweep`). Returns ``(.part files, scratch folders)`` removed."""
        s = self.settings
        parts = partfiles.remove_abandoned(s.core.models_dir / "fetched", s.fetch.fetch_total_timeout_seconds)
        folders = 0
        for path in _children(s.core.data_dir):
            m = _SCRATCH.match(path.name)
            if m is None or not path.is_dir():
                continue
            task = self.store.task_by_uuid(m.group(1))
            if task is not None and task.status in lc.TERMINAL:
                shutil.rmtree(path, ignore_errors=True)
                folders += 1
        return parts, folders


def _ended(task: Task) -> float:
    """When a terminal task ended (as ``Store.ended_before`` counts it)."""
    return task.postprocessendtime or task.canceltime or task.createtime


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _atime(path: Path) -> float:
    try:
        return os.stat(path).st_atime
    except OSError:
        return 0.0
