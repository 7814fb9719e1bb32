"""The local executor: ``Settings.workers`` worker processes on this machine.

Workers are separate processes (``spawn``), so inference never holds the API's event loop or
GIL. A shared event wakes an idle worker as soon as a task is submitted; without it, workers poll
the store every ``Settings.poll_interval`` seconds.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal

from easel.config import Settings

from . import Executor


def _worker_main(settings: Settings, worker_id: str, wake, stop) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {worker_id} %(levelname)s %(message)s")
    from easel.tasks.runner import Worker

    worker = Worker(settings, worker_id)
    parent = mp.parent_process()
    # Stop when asked, and also when the server process is gone (killed without stopping us): an
    # orphaned worker must not keep running, claiming tasks or holding memory. A running task is
    # abandoned at its next denoising step and ends as failed ("the server stopped ...").
    worker.should_stop = lambda: stop.is_set() or (parent is not None and not parent.is_alive())
    while not worker.should_stop():
        if worker.run_next() is None:
            wake.wait(settings.poll_interval)
            wake.clear()


class LocalExecutor(Executor):
    """Runs :class:`easel.tasks.runner.Worker` loops in child processes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._ctx = mp.get_context("spawn")
        self._wake = self._ctx.Event()
        self._stop = self._ctx.Event()
        self._procs: list = []

    def start(self) -> None:
        for i in range(max(1, self.settings.workers)):
            p = self._ctx.Process(target=_worker_main, name=f"easel-worker-{i}", daemon=True,
                                  args=(self.settings, f"local-{os.getpid()}-{i}", self._wake, self._stop))
            p.start()
            self._procs.append(p)

    def submit(self, task_id: int) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for p in self._procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(2)
        self._procs.clear()
