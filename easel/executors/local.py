"""The local executor: ``Settings.workers`` worker processes on this machine.

Workers are separate processes (``spawn``), so inference never holds the API's event loop or
GIL. A shared event wakes an idle worker as soon as a task is submitted; without it, workers poll
the store every ``Settings.poll_interval`` seconds.

A supervisor thread watches the workers. When one dies (killed by the kernel's OOM killer, a
segfault in a CUDA kernel, ``kill -9``), the task it was running is ended as failed, with the exit
code in ``debugerror``, and a new worker takes its place, so the server never silently stops
running tasks.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading

from easel.config import Settings

from . import Executor

log = logging.getLogger("easel.executor")


def gpu_for_slot(slot: int, gpus: tuple[str, ...]) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value of worker ``slot``: the GPUs of ``Settings.gpus`` are
    dealt round-robin (two workers per GPU with ``--workers 4 --gpus 0,1``); None leaves the
    environment as it is (every worker sees every GPU and uses the first)."""
    return gpus[slot % len(gpus)] if gpus else None


def _worker_main(settings: Settings, worker_id: str, wake, stop, gpu: str | None = None) -> None:
    if gpu is not None:  # before anything imports torch in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
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

    def __init__(self, settings: Settings, supervise_interval: float = 1.0):
        self.settings = settings
        self.supervise_interval = supervise_interval
        self._ctx = mp.get_context("spawn")
        self._wake = self._ctx.Event()
        self._stop = self._ctx.Event()
        self._procs: list = []
        self._generation = 0
        self.restarts = 0
        self._supervisor: threading.Thread | None = None

    def _spawn(self, slot: int):
        self._generation += 1
        worker_id = f"local-{os.getpid()}-{slot}-{self._generation}"
        p = self._ctx.Process(target=_worker_main, name=f"easel-worker-{slot}", daemon=True,
                              args=(self.settings, worker_id, self._wake, self._stop,
                                    gpu_for_slot(slot, self.settings.gpus)))
        p.start()
        p.easel_worker_id = worker_id
        return p

    def start(self) -> None:
        self._procs = [self._spawn(i) for i in range(max(1, self.settings.workers))]
        self._supervisor = threading.Thread(target=self._supervise, name="easel-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        from easel.store import Store
        from easel.tasks import lifecycle as lc

        store = Store(self.settings.database_url)
        while not self._stop.wait(self.supervise_interval):
            for slot, p in enumerate(list(self._procs)):
                if p.is_alive() or self._stop.is_set():
                    continue
                reason = (f"The worker process running this task died (exit code {p.exitcode}: e.g. killed "
                          "for lack of memory, or a crash in native code). Submit it again.")
                failed = lc.fail_worker_tasks(store, p.easel_worker_id, reason)
                log.warning("worker %s died (exit code %s); failed tasks %s; starting a new one",
                            p.easel_worker_id, p.exitcode, failed)
                self._procs[slot] = self._spawn(slot)
                self.restarts += 1

    def submit(self, task_id: int) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        for p in self._procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(2)
        self._procs.clear()
