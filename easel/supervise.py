"""Supervising child processes: restart with backoff, stop with a deadline, die with the parent.

One :class:`Supervisor` serves every place that keeps child processes: the local executor's
worker processes (``multiprocessing``, :mod:`easel.executors.local`), ``easel serve
--api-processes N``'s API processes (:mod:`easel.cli.serve`) and ``easel worker --gpus 0,1``'s
one ``easel worker`` per GPU (``subprocess``, :mod:`easel.cli.worker`). Each keeps its children
with :meth:`Supervisor.run` (restart with backoff) until a :class:`StopRequest` (SIGTERM/SIGINT)
or its owner says stop, then :meth:`Supervisor.stop`. :func:`stop_process` stops a single child
(``easel demo``'s server) the same way: ask, wait, then SIGKILL, and say so.

Stopping is a sequence of deadlines, never an open-ended wait:

1. *ask*: the children are told to stop (an event, or SIGTERM). Idle children exit at once; a
   child that is not busy (``busy(child)`` false: starting up, idle) and has not exited after
   ``IDLE_WAIT`` seconds is sent SIGTERM (a worker still importing torch would otherwise keep an
   idle server alive for seconds).
2. *grace*: busy children get ``grace`` seconds to finish their work.
3. *abort*: ``abort()`` tells the rest to give up their work now (a worker ends its task as failed
   at the next denoising step, or its heartbeat does within a few seconds); ``abort_wait`` seconds.
4. SIGTERM, then ``KILL_WAIT`` seconds later SIGKILL, with a warning naming each child killed.

Parent death: :func:`watch_parent` runs a thread in a child process that notices within
``interval`` seconds that its parent is gone (``kill -9`` of the server) and calls back, and
:func:`parent_death_signal` asks Linux to signal a child when its parent dies (``prctl
PR_SET_PDEATHSIG``), for children that handle SIGTERM themselves (Celery's warm shutdown).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable

log = logging.getLogger("easel.supervise")

IDLE_WAIT = 0.5  # seconds an idle child may take to exit on its own after it was asked
KILL_WAIT = 2.0  # seconds between SIGTERM and SIGKILL in the last phase


class Child:
    """A child process of either kind, behind one interface: a ``multiprocessing.Process`` or a
    ``subprocess.Popen``. ``name`` is for logs; ``started`` is its ``time.monotonic()`` start."""

    def __init__(self, proc: Any, name: str):
        self.proc = proc
        self.name = name
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll() is None
        return self.proc.is_alive()

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal), None while it runs."""
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll()
        return self.proc.exitcode

    def signal(self, signum: int) -> None:
        """Send ``signum`` unless it has exited (never to a recycled pid: the child is not reaped yet)."""
        if self.alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def join(self, timeout: float) -> None:
        if isinstance(self.proc, subprocess.Popen):
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            self.proc.join(timeout)


def _wait_all(children: list[Child], deadline: float, tick: Callable[[], None] | None = None) -> None:
    while any(c.alive() for c in children) and time.monotonic() < deadline:
        if tick is not None:
            tick()
        time.sleep(0.05)


def end_children(children: list[Child], *, what: str = "process") -> list[Child]:
    """SIGTERM the children still alive, SIGKILL those alive ``KILL_WAIT`` seconds later, reap all.

    Returns:
        The children that had to be signalled (each logged with a warning).
    """
    left = [c for c in children if c.alive()]
    for c in left:
        c.signal(signal.SIGTERM)
    _wait_all(left, time.monotonic() + KILL_WAIT)
    for c in left:
        if c.alive():
            log.warning("%s %s (pid %s) did not stop after SIGTERM within %.0f s: killed with SIGKILL",
                        what, c.name, c.pid, KILL_WAIT)
            c.signal(signal.SIGKILL)
        else:
            log.warning("%s %s (pid %s) did not stop in time: ended with SIGTERM", what, c.name, c.pid)
    for c in children:
        c.join(5.0)
    return left


class Supervisor:
    """Keeps ``count`` child processes running, one per slot, and stops them with deadlines.

    Args:
        spawn: ``spawn(slot) -> Child`` starts the child of a slot (also to replace a dead one).
        count: how many slots.
        on_death: ``on_death(slot, child)`` is called once for a child that exited while not
            stopping (e.g. to fail the task it was running); an exception there is raised from
            :meth:`check` and the death is handled again at the next call.
        what: the children's name in logs ("worker").

    A child that exits is replaced: at once if it had lived ``SHORT_LIFE`` seconds, otherwise
    after a delay doubling from 1 s to ``max_backoff`` (a child dying of the same cause again and
    again must not spin). :meth:`check` does the watching; call it periodically from one thread.
    """

    SHORT_LIFE = 30.0

    def __init__(self, spawn: Callable[[int], Child], count: int, *, on_death: Callable[[int, Child], None] | None = None,
                 what: str = "worker", max_backoff: float = 60.0):
        self.spawn = spawn
        self.count = count
        self.on_death = on_death
        self.what = what
        self.max_backoff = max_backoff
        self.children: list[Child | None] = []
        self.restarts = 0
        self.last_death = ""
        self.stopping = False
        self._backoff: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start every slot's child."""
        with self._lock:
            self.children = [self.spawn(slot) for slot in range(self.count)]

    def alive(self) -> list[Child]:
        """The children running now."""
        return [c for c in self.children if c is not None and c.alive()]

    def next_restart_in(self) -> float:
        """Seconds until the next delayed restart (0 when none is pending)."""
        waiting = [max(0.0, t - time.monotonic()) for t in self._restart_at.values()]
        return min(waiting, default=0.0)

    def check(self) -> list[int]:
        """Handle the children that exited since the last call and restart those whose delay has
        passed. Does nothing while stopping.

        Returns:
            The slots whose child was found dead by this call.
        """
        dead = []
        with self._lock:
            if self.stopping:
                return dead
            now = time.monotonic()
            for slot, child in enumerate(list(self.children)):
                if child is None:
                    if now >= self._restart_at.get(slot, 0.0):
                        self._restart_at.pop(slot, None)
                        self.children[slot] = self.spawn(slot)
                        self.restarts += 1
                    continue
                if child.alive():
                    continue
                if self.on_death is not None:
                    self.on_death(slot, child)  # raises: handled again next time
                dead.append(slot)
                short_lived = now - child.started < self.SHORT_LIFE
                backoff = min(self.max_backoff, self._backoff.get(slot, 0.5) * 2) if short_lived else 1.0
                self._backoff[slot] = backoff
                delay = backoff if short_lived else 0.0
                self.last_death = f"{self.what} {slot} exited with code {child.exitcode}"
                log.warning("%s %s (pid %s) exited with code %s; restarting it in %.1f s", self.what, child.name,
                            child.pid, child.exitcode, delay)
                self.children[slot] = None
                if delay > 0:
                    self._restart_at[slot] = now + delay
                else:
                    self.children[slot] = self.spawn(slot)
                    self.restarts += 1
        return dead

    def run(self, until: threading.Event, interval: float = 1.0, step: Callable[[], object] | None = None) -> None:
        """Watch the children until ``until`` is set: every ``interval`` seconds call ``step()``
        (default :meth:`check`). An error there is logged and the watch goes on (a supervisor
        must outlive a locked database or a full disk); run it in the thread that owns the
        children (``PR_SET_PDEATHSIG`` follows the thread that started a child)."""
        step = step or self.check
        while not until.wait(interval):
            try:
                step()
            except Exception:
                log.exception("supervising the %s processes failed; retrying", self.what)

    def stop(self, grace: float, *, ask: Callable[[], None] | None = None, abort: Callable[[], None] | None = None,
             abort_wait: float = 5.0, busy: Callable[[Child], bool] = lambda _c: True) -> list[Child]:
        """Stop every child by the deadlines of the module's docstring; never restarts one again.

        Args:
            grace: seconds busy children get to finish their work after ``ask()``.
            ask: tells the children to stop when done (default: SIGTERM to each).
            abort: tells the children still running after ``grace`` to give up their work
                (default: nothing; they go straight to SIGTERM/SIGKILL).
            abort_wait: seconds they get after ``abort()``.
            busy: whether a child is doing work worth waiting for; one that is not is sent
                SIGTERM ``IDLE_WAIT`` s after ``ask()`` if it has not exited.

        Returns:
            The children that were sent SIGTERM or SIGKILL by this call, after they ended (their
            work, e.g. a task, was cut short and may need to be ended in the store).
        """
        with self._lock:
            self.stopping = True
            children = [c for c in self.children if c is not None]
        t0 = time.monotonic()
        signalled: list[Child] = []
        if ask is None:
            for c in children:
                c.signal(signal.SIGTERM)
        else:
            ask()

        def end_idle() -> None:
            if time.monotonic() - t0 < IDLE_WAIT:
                return
            for c in children:
                if c.alive() and c not in signalled and not busy(c):
                    log.info("%s %s is not busy and has not exited: SIGTERM", self.what, c.name)
                    signalled.append(c)
                    c.signal(signal.SIGTERM)

        _wait_all(children, t0 + max(grace, IDLE_WAIT + 0.1), end_idle)
        if abort is not None and any(c.alive() for c in children):
            log.warning("%s(s) still busy %.0f s after the stop request (the grace period): aborting their work",
                        self.what, grace)
            abort()
            _wait_all(children, time.monotonic() + abort_wait)
        signalled += [c for c in end_children(children, what=self.what) if c not in signalled]
        for c in children:
            c.join(1.0)
        return signalled


class StopRequest:
    """SIGTERM and SIGINT (``signals``) recorded instead of ending the process: a supervising
    parent sets its handlers with this, watches its children until :attr:`event` is set, then
    stops them (passing :attr:`signum` on where the children handle it themselves). Create it
    in the main thread (Python runs signal handlers there)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.event = threading.Event()
        self.received: list[int] = []
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.received.append(signum)
        self.event.set()

    @property
    def signum(self) -> int:
        """The first signal received (SIGTERM when none was: the stop came from elsewhere)."""
        return self.received[0] if self.received else signal.SIGTERM


def stop_process(proc: subprocess.Popen, grace: float, name: str = "process",
                 say: Callable[[str], None] | None = None) -> int | None:
    """Stop one child: SIGTERM, wait ``grace`` seconds, then SIGKILL and say so.

    Args:
        say: where to tell a person that it was killed (default: a warning in the log).

    Returns:
        Its exit code (negative: the signal that ended it).
    """
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        message = f"{name} (pid {proc.pid}) did not stop within {grace:.0f} s of SIGTERM: killed it with SIGKILL"
        (say or log.warning)(message)
        proc.kill()
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:  # in uninterruptible sleep (D state): nothing more to do
            return None


def parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent exits (``prctl
    PR_SET_PDEATHSIG``); use as ``subprocess.Popen(preexec_fn=...)`` or at a child's start.

    Note the kernel's rule: the signal comes when the *thread* that started the child exits.

    Returns:
        False where it is not available (not Linux); the caller then relies on a parent watch.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signum), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return False


def watch_parent(on_gone: Callable[[], None], interval: float = 0.2) -> threading.Thread:
    """Call ``on_gone()`` (in a daemon thread) within ``interval`` seconds of this process's
    parent dying: the parent process id changes when the orphan is re-parented (to init or a
    subreaper). ``on_gone`` should end the process."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_gone()

    thread = threading.Thread(target=watch, name="easel-parent-watch", daemon=True)
    thread.start()
    return thread


def exit_now(code: int) -> None:
    """End this (child) process at once, without the interpreter's teardown, which takes a second
    or more with torch or the API's modules loaded and which nothing of these processes needs,
    except ``multiprocessing``'s finalizers, run here: they unlink the semaphores the libraries
    made (tqdm's write lock), which the resource tracker would otherwise report as leaked at the
    server's exit. Log handlers are flushed first."""
    from multiprocessing import util

    try:
        logging.shutdown()
        util._run_finalizers(0)  # the finalizers with an exit priority: semaphores (SemLock._cleanup)
    finally:
        os._exit(code)
