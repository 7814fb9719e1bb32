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
import time

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
    from easel.tasks.runner import Worker, apply_torch_threads

    threads = apply_torch_threads(settings, shares_cpu_with_api=True)
    log.info("worker %s: %s torch threads", worker_id, threads or "default")
    worker = Worker(settings, worker_id)
    parent = mp.parent_process()
    # Stop when asked, and also when the server process is gone (killed without stopping us): an
    # orphaned worker must not keep running, claiming tasks or holding memory. A running task is
    # abandoned at its next denoising step and ends as failed ("the server stopped ..."); in a
    # long phase without steps (download, model load) the heartbeat fails it and exits.
    worker.should_stop = lambda: stop.is_set() or (parent is not None and not parent.is_alive())
    delay = settings.poll_interval
    while not worker.should_stop():
        try:
            idle = worker.run_next() is None
            delay = settings.poll_interval
        except Exception:  # e.g. the database is unreachable or the disk is full: retry, backing off
            log.exception("worker %s: claiming or ending a task failed; retrying in %.1f s", worker_id, delay)
            idle, delay = True, min(30.0, delay * 2)
        if idle:
            wake.wait(delay)
            wake.clear()


class WakeHandle(Executor):
    """What an API process that does not own the workers holds (``easel serve --api-processes N``):
    ``submit`` wakes the owner's idle workers through their shared event, and ``health`` reads the
    owner's count of live workers. Picklable to a spawned process; ``start``/``stop`` do nothing."""

    def __init__(self, wake, alive):
        self._wake = wake
        self._alive = alive

    def start(self) -> None:
        pass

    def submit(self, task_id: int) -> None:
        self._wake.set()

    def health(self) -> tuple[bool, str]:
        alive = self._alive.value
        if alive <= 0:
            return False, "no worker process is running (see the server's log)"
        return True, f"{alive} worker(s) running"

    def stop(self, timeout: float = 10.0) -> None:
        pass


class LocalExecutor(Executor):
    """Runs :class:`easel.tasks.runner.Worker` loops in child processes, supervised.

    A worker that exits (crash, OOM kill, disk-full error it could not survive) has its task
    failed with the cause and is restarted; restarts of a slot that keeps dying back off
    (1 s, doubling, at most ``MAX_BACKOFF``). While no worker is alive :meth:`health` says why.
    """

    MAX_BACKOFF = 60.0

    def __init__(self, settings: Settings, supervise_interval: float = 1.0):
        self.settings = settings
        self.supervise_interval = supervise_interval
        self._ctx = mp.get_context("spawn")
        self._wake = self._ctx.Event()
        self._stop = self._ctx.Event()
        self._alive = self._ctx.Value("i", 0)  # live workers, for WakeHandle.health in other processes
        self._procs: list = []
        self._generation = 0
        self.restarts = 0
        self._supervisor: threading.Thread | None = None
        self._store = None
        self._backoff: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}
        self.last_death = ""

    def _spawn(self, slot: int):
        self._generation += 1
        worker_id = f"local-{os.getpid()}-{slot}-{self._generation}"
        p = self._ctx.Process(target=_worker_main, name=f"easel-worker-{slot}", daemon=True,
                              args=(self.settings, worker_id, self._wake, self._stop,
                                    gpu_for_slot(slot, self.settings.gpus)))
        p.start()
        p.easel_worker_id = worker_id
        p.easel_started = time.monotonic()
        return p

    def handle(self) -> WakeHandle:
        """A :class:`WakeHandle` for API processes spawned by this one."""
        return WakeHandle(self._wake, self._alive)

    def start(self) -> None:
        self._procs = [self._spawn(i) for i in range(max(1, self.settings.workers))]
        self._alive.value = len(self._procs)
        self._supervisor = threading.Thread(target=self._supervise, name="easel-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stop.wait(self.supervise_interval):
            try:
                self.supervise_once()
            except Exception:  # the supervisor must outlive any error (database locked, disk full)
                log.exception("supervisor iteration failed; retrying")

    def supervise_once(self) -> None:
        """Fail the tasks of dead workers and restart them (with backoff). Raises on store errors;
        a dead worker whose task could not be failed yet is handled again next time."""
        from easel import metrics
        from easel.store import Store
        from easel.store.notify import Publisher
        from easel.tasks import lifecycle as lc

        if self._store is None:
            self._store = Store(self.settings.database_url, wakeups=Publisher.for_settings(self.settings))
        now = time.monotonic()
        self._alive.value = sum(1 for p in self._procs if p is not None and p.is_alive())
        for slot, p in enumerate(list(self._procs)):
            if p is None:
                if now >= self._restart_at.get(slot, 0.0) and not self._stop.is_set():
                    self._procs[slot] = self._spawn(slot)
                    self.restarts += 1
                continue
            if p.is_alive() or self._stop.is_set():
                continue
            reason = (f"The worker process running this task died (exit code {p.exitcode}: e.g. killed "
                      "for lack of memory, a crash in native code, or an error it could not survive such as "
                      "a full disk). Submit it again.")
            failed = lc.fail_worker_tasks(self._store, p.easel_worker_id, reason)
            metrics.process_dead(p.pid)
            # a worker that died soon after it started is probably dying of the same cause again
            short_lived = now - p.easel_started < 30.0
            backoff = min(self.MAX_BACKOFF, self._backoff.get(slot, 0.5) * 2) if short_lived else 1.0
            self._backoff[slot] = backoff
            self._restart_at[slot] = now + (backoff if short_lived else 0.0)
            self.last_death = f"worker {slot} exited with code {p.exitcode}"
            log.warning("worker %s died (exit code %s); failed tasks %s; restarting in %.1f s",
                        p.easel_worker_id, p.exitcode, failed, self._restart_at[slot] - now)
            self._procs[slot] = None
            if now >= self._restart_at[slot]:
                self._procs[slot] = self._spawn(slot)
                self.restarts += 1

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)``: ok while at least one worker process is alive and supervised."""
        if self._supervisor is None or not self._supervisor.is_alive():
            return False, "the worker supervisor is not running"
        alive = sum(1 for p in self._procs if p is not None and p.is_alive())
        if alive == 0:
            waiting = [max(0.0, t - time.monotonic()) for t in self._restart_at.values()]
            return False, (f"no worker process is running ({self.last_death or 'starting'}); "
                           f"next restart in {min(waiting, default=0):.0f} s")
        return True, f"{alive} worker(s) running"

    def submit(self, task_id: int) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        killed = []
        for p in self._procs:
            if p is None:
                continue
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(2)
                killed.append(p.easel_worker_id)
        self._procs.clear()
        if killed:  # their tasks would otherwise wait for their leases to expire
            from easel.store import Store
            from easel.store.notify import Publisher
            from easel.tasks import lifecycle as lc

            try:
                store = self._store or Store(self.settings.database_url, wakeups=Publisher.for_settings(self.settings))
                for worker_id in killed:
                    lc.fail_worker_tasks(store, worker_id, lc.INTERRUPTED_MESSAGE)
            except Exception:
                log.exception("could not fail the tasks of stopped workers (their leases will expire)")
