"""Pieces of ``easel serve`` kept out of ``easel.cli.serve``: the start line and uvicorn run so
that SIGTERM/SIGINT end the process with a normal exit.

uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process dies of the
signal: nothing after ``uvicorn.run`` runs, ``multiprocessing``'s finalizers do not unlink the
workers' semaphores ("leaked semaphore objects" from the resource tracker) and open files are
reported unclosed. :class:`Server` handles the signals the same way but returns instead.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

log = logging.getLogger("easel.serve")

# seconds uvicorn waits for open connections (a WebSocket, a Prefer: wait request) after a stop
# request before it closes them; tasks themselves have Settings.worker.shutdown_grace_seconds
CONNECTIONS_GRACE = 1.0


class Server(uvicorn.Server):
    """``uvicorn.Server`` whose :meth:`run` returns after a SIGTERM/SIGINT-triggered graceful
    shutdown instead of re-raising the signal (a second SIGINT still forces the exit)."""

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("%s received: stopping (open connections get %.0f s, running tasks "
                     "EASEL_SHUTDOWN_GRACE_SECONDS)", signal.Signals(sig).name, CONNECTIONS_GRACE)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_app(app, host: str = "127.0.0.1", port: int = 8000, sockets: list | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; returns after the app's shutdown (lifespan) ran."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=CONNECTIONS_GRACE)
    server = Server(config)
    server.run(sockets=sockets)
    if server._captured_signals:
        log.info("stopped (%s)", ", ".join(signal.Signals(s).name for s in server._captured_signals))


def start_line(settings, host: str, port: int) -> str:
    """The one line ``easel serve`` logs at start: where it listens and what it runs on
    (database URL without its password)."""
    from easel.store.notify import redact

    preload = f", preload {','.join(settings.worker.preload)}" if settings.worker.preload else ""
    return (f"Easel listening on http://{host}:{port} (public URL {settings.core.public_url}); data dir "
            f"{settings.core.data_dir}; database {redact(settings.core.database_url)}; storage {settings.storage.storage}; executor "
            f"{settings.fleet.executor}; workers {settings.worker.workers}; model source {settings.weights.model_source}{preload}")
