"""The local executor: ``Settings.worker.workers`` worker processes on this machine.

Workers are separate processes (``spawn``), so inference never holds the API's event loop or
GIL. A shared event wakes an idle worker as soon as a task is submitted; without it, workers poll
the store every ``Settings.worker.poll_interval`` seconds.

The workers are kept by an :class:`easel.supervise.Supervisor`. When one dies (killed by the
kernel's OOM killer, a segfault in a CUDA kernel, ``kill -9``), the task it was running is ended
as failed, with the exit code in ``debugerror``, and a new worker takes its place, so the server
never silently stops running tasks. Stopping follows the supervisor's deadlines: idle workers
exit at once, a running task gets ``Settings.worker.shutdown_grace_seconds`` to finish, then it is ended
as failed ("the server stopped") and its worker exits; a worker that does not is killed and its
task failed here. A worker whose server process is gone (``kill -9``) ends its task and exits
within about a second (:func:`easel.supervise.watch_parent`).
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time

from easel.config import Settings
from easel.supervise import Child, Supervisor, exit_now, watch_parent

from . import Executor

log = logging.getLogger("easel.executor")

# A worker's state, in a shared value its executor reads. CLAIMING (looking for a queued task) shows as
# "idle" in /readyz, but shutdown waits for it as for BUSY: a claim may be committing.
STARTING, IDLE, CLAIMING, BUSY = 0, 1, 2, 3
PARENT_GONE_GRACE = 0.7  # seconds a worker whose server died leaves its task's next step to end it


def expand_gpus(gpus: tuple[str, ...]) -> tuple[str, ...]:
    """``WorkerSettings.gpus`` as GPU indices: ``("all",)`` becomes every GPU torch sees (``("0",
    "1", ...)``, empty without CUDA; imports torch only then); any other value is returned as is."""
    if tuple(gpus) == ("all",):
        import torch

        return tuple(str(i) for i in range(torch.cuda.device_count()))
    return tuple(gpus)


def gpu_for_slot(slot: int, gpus: tuple[str, ...]) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value of worker ``slot``: the GPUs of ``Settings.worker.gpus`` are
    dealt round-robin (two workers per GPU with ``--workers 4 --gpus 0,1``); None leaves the
    environment as it is (every worker sees every GPU and uses the first)."""
    return gpus[slot % len(gpus)] if gpus else None


def _publish(info, warm: list[str]) -> None:
    """Write this worker's warm tools into its shared ``info`` buffer (JSON, read by ``ready``)."""
    data = json.dumps(warm).encode()
    if len(data) < len(info) and info.value != data:
        info.value = data


def _preload(worker, tools: tuple[str, ...], info) -> None:
    """Load the pipelines of ``tools`` (``WorkerSettings.preload``) before taking tasks; a tool that
    fails to warm up is logged and skipped."""
    from easel.tasks.preload import preload

    for tool in tools:
        if worker.should_stop():
            return
        log.info("worker %s: preloading %s", worker.worker_id, tool)
        try:
            seconds = preload(worker, tool)
        except Exception as exc:  # noqa: BLE001 - a warm-up failure must not keep the worker from tasks
            log.warning("worker %s: could not preload %s: %s: %s", worker.worker_id, tool, type(exc).__name__, exc)
            continue
        log.info("worker %s: %s is warm (%.1f s)", worker.worker_id, tool, seconds)
        worker.warm.append(tool)
        _publish(info, worker.warm)


def _worker_main(settings: Settings, worker_id: str, wake, drain, stop, state, info, gpu: str | None = None) -> None:
    """A worker process: run tasks until ``drain`` (finish the task, then exit) or ``stop``
    (abandon the task at its next step) is set, or the server process is gone."""
    gone = threading.Event()
    held: dict = {}

    def parent_gone() -> None:
        # the server was killed without stopping us: an orphaned worker must not keep running,
        # claiming tasks or holding memory. The next denoising step ends the task ("the server
        # stopped ..."); in a long phase without steps (download, model load) it is ended here.
        gone.set()
        time.sleep(PARENT_GONE_GRACE)
        threading.Timer(0.5, os._exit, (3,)).start()  # whatever the store does
        worker = held.get("worker")
        if worker is not None and worker.current_task is not None:
            worker.abandon(worker.current_task)
        exit_now(3)

    watch_parent(parent_gone)  # before the imports below, which take seconds on a loaded machine
    if gpu is not None:  # before anything imports torch in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    from easel.logs import configure_logging

    configure_logging(settings.core, worker_id)
    from easel.tasks.runner import Worker  # imports torch: ready before the first Run
    from easel.tasks.threads import apply_torch_threads
    from easel.logs import quiet_libraries

    quiet_libraries(debug=settings.core.log_level.upper() == "DEBUG")

    threads = apply_torch_threads(settings.worker, shares_cpu_with_api=True)
    from easel.malloc import freeze_startup_objects, tune_allocator

    tune_allocator()  # the denoising steps reuse their memory instead of mapping it again (easel.malloc)
    log.debug("worker %s: %s torch threads", worker_id, threads or "default")
    worker = held["worker"] = Worker(settings, worker_id)
    freeze_startup_objects()  # a collection during a load walks only the load's objects
    worker.should_stop = lambda: stop.is_set() or gone.is_set()
    _preload(worker, settings.worker.preload, info)
    state.value = IDLE
    delay = settings.worker.poll_interval
    while not drain.is_set() and not worker.should_stop():
        try:
            state.value = CLAIMING
            task_id = worker.claim_next()
            idle = task_id is None
            if not idle:
                state.value = BUSY
                worker.execute(task_id)
            delay = settings.worker.poll_interval
        except Exception:  # e.g. the database is unreachable or the disk is full: retry, backing off
            log.exception("worker %s: claiming or ending a task failed; retrying in %.1f s", worker_id, delay)
            idle, delay = True, min(30.0, delay * 2)
        finally:
            state.value = IDLE
            _publish(info, worker.warm)
        if idle and not drain.is_set():
            wake.wait(delay)
            wake.clear()
    exit_now(0)


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
        self.gpus = expand_gpus(settings.worker.gpus)
        self.supervise_interval = supervise_interval
        self._ctx = mp.get_context("spawn")
        self._wake = self._ctx.Event()
        self._drain = self._ctx.Event()  # finish the task in hand, claim no more, exit
        self._stop = self._ctx.Event()  # abandon the task in hand at its next step
        self._alive = self._ctx.Value("i", 0)  # live workers, for WakeHandle.health in other processes
        self._generation = 0
        self._done = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._store = None
        self.workers = Supervisor(self._spawn, max(1, settings.worker.workers), on_death=self._on_death,
                                  what="worker", max_backoff=self.MAX_BACKOFF)

    @property
    def restarts(self) -> int:
        return self.workers.restarts

    def _spawn(self, slot: int) -> Child:
        self._generation += 1
        worker_id = f"local-{os.getpid()}-{slot}-{self._generation}"
        state = self._ctx.RawValue("i", STARTING)
        info = self._ctx.RawArray("c", 4096)  # the worker's warm tools, JSON (see _publish)
        p = self._ctx.Process(target=_worker_main, name=f"easel-worker-{slot}", daemon=True,
                              args=(self.settings, worker_id, self._wake, self._drain, self._stop, state, info,
                                    gpu_for_slot(slot, self.gpus)))
        p.start()
        child = Child(p, worker_id)
        child.state, child.info = state, info
        return child

    def handle(self) -> WakeHandle:
        """A :class:`WakeHandle` for API processes spawned by this one."""
        return WakeHandle(self._wake, self._alive)

    def start(self) -> None:
        self.workers.start()
        self._alive.value = len(self.workers.alive())
        self._supervisor = threading.Thread(target=self._supervise, name="easel-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        """The supervisor thread: :meth:`supervise_once` every ``supervise_interval`` seconds until
        :meth:`stop`, outliving its errors (database locked, disk full)."""
        self.workers.run(self._done, self.supervise_interval, step=lambda: self.supervise_once())

    def _store_(self):
        if self._store is None:
            from easel.store import Store
            from easel.store.notify import Publisher

            self._store = Store(self.settings.core.database_url, wakeups=Publisher.for_settings(self.settings.live, self.settings.core.database_url))
        return self._store

    def _on_death(self, slot: int, child: Child) -> None:
        from easel import metrics
        from easel.tasks import lifecycle as lc

        reason = (f"The worker process running this task died (exit code {child.exitcode}: e.g. killed "
                  "for lack of memory, a crash in native code, or an error it could not survive such as "
                  "a full disk). Submit it again.")
        failed = lc.fail_worker_tasks(self._store_(), child.name, reason)
        metrics.process_dead(child.pid)
        if failed:
            log.warning("worker %s died; failed its task(s) %s", child.name, failed)

    def supervise_once(self) -> None:
        """Fail the tasks of dead workers and restart them (with backoff). Raises on store errors;
        a dead worker whose task could not be failed yet is handled again next time."""
        self._alive.value = len(self.workers.alive())
        self.workers.check()

    @property
    def last_death(self) -> str:
        return self.workers.last_death

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)``: ok while at least one worker process is alive and supervised."""
        if self._supervisor is None or not self._supervisor.is_alive():
            return False, "the worker supervisor is not running"
        alive = len(self.workers.alive())
        if alive == 0:
            return False, (f"no worker process is running ({self.workers.last_death or 'starting'}); "
                           f"next restart in {self.workers.next_restart_in():.0f} s")
        return True, f"{alive} worker(s) running"

    def ready(self) -> dict:
        """``{"ready", "workers": [{"id", "state", "warm"}], "warm"}``: a worker is ready once it
        has imported torch and loaded ``Settings.worker.preload``, and waits for (or runs) tasks; a tool
        is warm in a worker once preloaded or run there (its pipelines may since have been
        evicted from the cache to make room for others')."""
        names = {STARTING: "starting", IDLE: "idle", CLAIMING: "idle", BUSY: "busy"}
        rows = []
        for c in self.workers.children:
            if c is None:
                continue
            try:
                warm = json.loads(c.info.value or b"[]")
            except ValueError:  # read while the worker wrote it: next time
                warm = []
            rows.append({"id": c.name, "state": names.get(c.state.value, "?") if c.alive() else "exited",
                         "warm": warm})
        live = [r for r in rows if r["state"] in ("idle", "busy")]
        return {"ready": bool(live), "workers": rows, "warm": sorted({t for r in live for t in r["warm"]})}

    def submit(self, task_id: int) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the workers: idle ones at once, a running task after at most ``timeout`` seconds
        (default ``Settings.worker.shutdown_grace_seconds``), then ended as failed; a worker that still
        does not exit is killed and its task failed here."""
        grace = self.settings.worker.shutdown_grace_seconds if timeout is None else timeout
        if self._supervisor is None:
            return
        busy = [c.name for c in self.workers.alive() if c.state.value == BUSY]  # running a task
        log.info("stopping %d worker(s)%s", len(self.workers.alive()),
                 f"; {len(busy)} running a task get {grace:.0f} s to finish it" if busy else "")

        def ask() -> None:
            self._drain.set()
            self._wake.set()

        def abort() -> None:
            self._stop.set()

        from easel.tasks.runner import Worker

        killed = self.workers.stop(grace, ask=ask, abort=abort, abort_wait=Worker.STOP_GRACE + 2.0,
                                   busy=lambda c: c.state.value in (CLAIMING, BUSY))
        self._done.set()
        self._supervisor.join(5)
        self._supervisor = None
        self._alive.value = 0
        if killed:  # their tasks would otherwise wait for their leases to expire
            from easel.tasks import lifecycle as lc

            try:
                for child in killed:
                    lc.fail_worker_tasks(self._store_(), child.name, lc.INTERRUPTED_MESSAGE)
            except Exception:
                log.exception("could not fail the tasks of stopped workers (their leases will expire)")
