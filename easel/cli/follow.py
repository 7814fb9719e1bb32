"""Following a task from the shell (``easel run --wait``, ``easel demo``): a live progress bar on
a terminal, plain lines anywhere else.

When stdout is not a terminal (a file, a pipe, CI logs), a bar that redraws itself prints nothing
until the end. :class:`Lines` prints one line per phase (each status, and each named phase of the
progress frames: "Waiting for a worker", "Loading weights", "Downloading", "Generate", "High-res
pass"...; the socket is asked for the stepless phases' frames, ``?phases=1``) and, while nothing changes,
one line every ``EVERY`` seconds, so a long wait is visibly alive.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

EVERY = 5.0  # seconds between the "still ..." lines when nothing changed (stdout not a terminal)


def progress_of(frame: dict) -> dict:
    """The progress fields of a ``task_output`` frame ({} for any other): Wiro's flat
    ``progressGenerate`` message (Easel before 0.3 nested it one level deeper)."""
    message = frame.get("message")
    if frame.get("type") != "task_output" or not isinstance(message, dict):
        return {}
    progress = message.get("progressGenerate") if isinstance(message.get("progressGenerate"), dict) else message
    return progress if {"stepCurrent", "stepTotal", "percentage"} <= set(progress) else {}


# what a task is doing in each status before its progress frames name a phase
DOING = {"task_queue": "waiting for a worker", "task_accept": "taken by a worker",
         "task_preprocess_start": "preparing: inputs, weights (downloaded on first use)",
         "task_preprocess_end": "prepared", "task_assign": "loading the pipeline (warm after the first run)",
         "task_start": "denoising", "task_end": "writing the outputs", "task_postprocess_start": "storing the outputs",
         "task_postprocess_end": "done", "task_cancel": "cancelled"}


def describe(status: str, progress: dict) -> str:
    """``status`` and, when known, the phase, step and speed of ``progress``, as one line (with
    what the task is doing, :data:`DOING`, when there is no progress yet). A stepless phase
    (``stepTotal`` "0": "Waiting for a worker", "Loading weights") shows its elapsed time; a
    download (``speedType`` "B/s") its megabytes."""
    if not progress:
        return f"{status} ({DOING[status]})" if status in DOING else status
    phase = progress.get("task") or ""
    if "stepCurrent" not in progress:
        return f"{status} {phase}".strip()
    if str(progress.get("stepTotal")) == "0":
        return f"{status} {phase} ({progress.get('elapsedTime') or '?'})".replace("  ", " ").strip()
    if progress.get("speedType") == "B/s":
        try:
            done, total, speed = (float(progress[k]) / 1e6 for k in ("stepCurrent", "stepTotal", "speed"))
        except (KeyError, TypeError, ValueError):
            pass
        else:
            return (f"{status} {phase} {done:.1f}/{total:.1f} MB ({progress.get('percentage', '?')} %) "
                    f"{speed:.1f} MB/s ETA {progress.get('remainingTime', '?')}").replace("  ", " ")
    return (f"{status} {phase} step {progress['stepCurrent']}/{progress['stepTotal']} "
            f"({progress.get('percentage', '?')} %) {progress.get('speed', '?')} {progress.get('speedType', 'it/s')} "
            f"ETA {progress.get('remainingTime', '?')}").replace("  ", " ")


class Lines:
    """Progress as plain lines on ``out``: a line when the status or the phase changes, and every
    ``every`` seconds otherwise (from a timer thread; :meth:`close` stops it)."""

    def __init__(self, out: TextIO | None = None, every: float = EVERY, clock: Callable[[], float] = time.monotonic):
        self.out = out or sys.stdout
        self.every = every
        self.clock = clock
        self.t0 = clock()
        self.key: tuple = ()
        self.text = ""
        self.last = self.t0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="easel-progress-lines", daemon=True)
        self._timer.start()

    def _print(self, text: str) -> None:
        self.last = self.clock()
        print(f"[{self.last - self.t0:6.1f} s] {text}", file=self.out, flush=True)

    def show(self, status: str, progress: dict) -> None:
        """Record the task's state; prints at once when the status or the phase changed."""
        with self._lock:
            key = (status, (progress or {}).get("task", ""))
            self.text = describe(status, progress)
            if key != self.key:
                self.key = key
                self._print(self.text)

    def _tick(self) -> None:
        while not self._done.wait(min(1.0, self.every)):
            with self._lock:
                if self.text and self.clock() - self.last >= self.every:
                    self._print(f"{self.text} (still)")

    def close(self) -> None:
        self._done.set()
        self._timer.join(2)


def follow(client, taskid: str, tasktoken: str, console, terminal: bool | None = None) -> dict:
    """Follow a task until it ends and return its Task/Detail: WebSocket frames (asking for the
    stepless phases, ``?phases=1``), or Task/Detail polling if the socket fails. On a terminal
    (``terminal`` None: whether ``console`` is one) a live bar (step, it/s, ETA); otherwise
    :class:`Lines`, a line per phase (a stepless phase's frames under the status they belong to)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if terminal is None:
        terminal = console.is_terminal
    if terminal:
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), console=console)
        bar.start()
        job = bar.add_task("task_queue", total=100, info="")

        def show(status: str, progress: dict) -> None:
            info = describe("", progress) if progress else None
            completed = float(progress["percentage"]) if progress.get("percentage") else (
                100 if status == "task_postprocess_end" else None)
            bar.update(job, description=status, completed=completed, **({"info": info} if info else {}))

        close = bar.stop
    else:
        lines = Lines()
        show, close = lines.show, lines.close
    status = ["task_queue"]  # the latest lifecycle status seen: a stepless phase frame belongs to it

    try:
        def on_event(frame: dict) -> None:
            kind = frame.get("type", "")
            if kind in ("task_error", "task_output_full", "task_error_full"):
                return  # logs, not stages
            progress = progress_of(frame)
            if kind == "task_output" and str(progress.get("stepTotal")) == "0":
                kind = status[0]  # "Waiting for a worker", "Loading weights": a phase of that status
            elif kind != "task_output":
                status[0] = kind
            show(kind, progress)

        def on_poll(task: dict) -> None:
            show(task["status"], task.get("progress") if isinstance(task.get("progress"), dict) else {})

        try:
            for frame in client.events(tasktoken, phases=True):
                on_event(frame)
        except Exception:  # no WebSocket: poll Task/Detail
            return client.wait(taskid, on_update=on_poll, poll=0.3)
        task = client.detail(taskid)
        on_poll(task)
        return task
    finally:
        close()
