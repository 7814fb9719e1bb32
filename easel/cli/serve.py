"""``easel serve``: the API server and its local workers (or the API process of a fleet).

The workers are the local executor's (:mod:`easel.executors.local`); ``--api-processes N`` runs N
API processes on one listening socket, kept by a :class:`easel.supervise.Supervisor` like the
workers are. uvicorn and the graceful stop are in :mod:`easel.cli.serving`.
"""
from __future__ import annotations

import logging
import os
import sys
import socket
from pathlib import Path
from typing import Optional

import typer

from easel.cli.common import BROKER, check_storage, checked, console, csv, settings_from, sources

API_STOP_GRACE = 15.0  # seconds API processes get to finish the requests in flight after SIGTERM


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    data_dir: Optional[Path] = typer.Option(None, help="Where the database, files and models live "
                                                       "[env EASEL_DATA_DIR; default easel-data]."),
    model_source: Optional[str] = typer.Option(None, help="tiny (offline tiny models), hub (real weights) or random "
                                                          "(published sizes, random weights) "
                                                          "[env EASEL_MODEL_SOURCE; default tiny]."),
    workers: Optional[int] = typer.Option(None, help="Local worker processes; 0 = API only (workers of another "
                                                     "`easel serve` on the same database run the tasks) "
                                                     "[env EASEL_WORKERS; default 1]."),
    public_url: Optional[str] = typer.Option(None, help="Base URL written into output urls [env EASEL_PUBLIC_URL; "
                                                        "default http://HOST:PORT]."),
    gpus: Optional[str] = typer.Option(None, help="GPUs dealt round-robin to the workers, e.g. 0,1 or all "
                                                  "(one worker per GPU: --workers 2 --gpus 0,1) [env EASEL_GPUS]."),
    fetch_allow: Optional[str] = typer.Option(None, help="Comma-separated hosts/CIDRs the URL fetcher may reach "
                                                         "although private (e.g. 127.0.0.1 for local tests) "
                                                         "[env EASEL_FETCH_ALLOW]."),
    storage: Optional[str] = typer.Option(None, help="Where outputs, uploads and fetched LoRAs live: local (under the "
                                                     "data directory) or s3://bucket/prefix (endpoint, region and "
                                                     "credentials from EASEL_S3_* and the usual AWS settings) "
                                                     "[env EASEL_STORAGE; default local]."),
    executor: Optional[str] = typer.Option(None, help="local (worker processes of this server) or celery (task ids "
                                                       "go to --broker; `easel worker` processes run them; use with "
                                                       "--workers 0) [env EASEL_EXECUTOR; default local]."),
    broker: Optional[str] = BROKER,
    config: Optional[Path] = typer.Option(None, help="TOML file of settings (field = value) [env EASEL_CONFIG_FILE]. "
                                                     "Precedence: flags given > environment > this file > defaults."),
    api_processes: Optional[int] = typer.Option(None, help="API processes on this port (they share the store; the "
                                                           "local workers belong to this process) "
                                                           "[env EASEL_API_PROCESSES; default 1]."),
    preload: Optional[str] = typer.Option(None, help="Tools (OWNER/SLUG, as Tool/List names them, "
                                                     "comma-separated) whose pipelines the workers load at "
                                                     "start [env EASEL_PRELOAD]."),
):
    """Run the API server and its local workers (or, with --executor celery --workers 0, the API
    process of a fleet: docs/deploy.md)."""
    given = {"data_dir": data_dir, "model_source": model_source, "workers": workers, "public_url": public_url,
             "fetch_allow": csv(fetch_allow), "gpus": csv(gpus), "storage": storage, "executor": executor,
             "broker_url": broker, "api_processes": api_processes, "preload": csv(preload)}
    found = sources(config)
    if public_url is None and "public_url" not in found:
        given["public_url"] = f"http://{host}:{port}"
    settings = settings_from(config, **given)
    from easel.store.notify import check_live

    checked(check_live, settings.live, settings.core.database_url)  # a bad EASEL_LIVE_PUSH stops here
    if settings.fleet.executor == "celery":
        if settings.worker.workers > 0 and (workers is not None or "workers" in found):
            raise typer.BadParameter("with --executor celery this process runs no workers: give --workers 0 and "
                                     "start `easel worker` processes (docs/deploy.md)", param_hint="--workers")
        settings = settings.with_(workers=0)
    # before anything imports prometheus_client (the checks below import the tools, which record metrics)
    metrics_dir = prepare_metrics_dir(settings.core.data_dir)
    check_preload(settings)
    check_storage(settings)
    from easel.api import create_app
    from easel.cli.serving import run_app, start_line
    from easel.executors import create_executor
    from easel.logs import configure_logging
    from easel.store import SecretBox, Store
    from easel.store.notify import Publisher
    from easel.tasks import lifecycle

    configure_logging(settings.core)
    logging.getLogger("easel.serve").info(start_line(settings, host, port))
    store = Store(settings.core.database_url, wakeups=Publisher.for_settings(settings.live, settings.core.database_url),
                  secrets=SecretBox.for_settings(settings.core))  # migrate() checks that the key opens the secrets
    store.migrate()
    running = None
    # tasks whose worker's lease expired (a server that stopped); other live servers' tasks keep running
    failed = lifecycle.recover_interrupted(store, settings.worker.lease_seconds, task_timeout=settings.worker.task_timeout_seconds,
                                           requeue_unstarted=settings.worker.requeue_unstarted)
    if failed:
        console.print(f"[yellow]{len(failed)} task(s) had no live worker any more; ended: {failed}")
    if settings.fleet.executor == "celery" or settings.worker.workers > 0:
        try:
            running = create_executor(settings.fleet.executor, settings)
        except RuntimeError as exc:  # e.g. Celery is not installed
            console.print(f"[red]{exc}")
            raise typer.Exit(1)
        running.start()
    if settings.api.api_processes > 1:
        try:
            serve_processes(settings, host, port, running)
        finally:
            _stop(running, metrics_dir)
        from easel.supervise import exit_now

        exit_now(0)  # all stopped and cleaned; the interpreter's teardown took seconds here
    try:  # SIGTERM/SIGINT: uvicorn's graceful shutdown, the app's (workers stop there), then here
        run_app(create_app(settings, running, on_shutdown=lambda: _stop(running, metrics_dir)), host, port)
    finally:
        _stop(running, metrics_dir)


def prepare_metrics_dir(data_dir: Path) -> Optional[Path]:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` for this server and the workers it spawns; return the folder.

    Runs before ``prometheus_client`` is imported (it reads the variable once, at import). The
    folder is ``<data_dir>/metrics/<hostname>-<pid>``, emptied now and removed when the server
    stops; folders of this host whose server process is gone are removed. Each ``easel serve``
    therefore reports its own process tree, and several servers on one data directory never mix
    or wipe each other's samples. An operator who sets ``PROMETHEUS_MULTIPROC_DIR`` keeps that
    folder (and its clean-up) to themselves: returns None.
    """
    import shutil

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    if "prometheus_client" in sys.modules:  # it chose its value class at import: this process's samples stay local
        logging.getLogger(__name__).warning("metrics: prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR "
                                            "was set; this process's own samples are missing from /metrics")
    root = Path(data_dir) / "metrics"
    host = socket.gethostname().replace("/", "_")
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"{host}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_preload(settings) -> None:
    """Stop with a usage error naming the setting when ``Settings.worker.preload`` names a tool that does
    not exist or is not implemented."""
    from easel.catalog import load_tools

    tools = load_tools()
    bad = [t for t in settings.worker.preload if t not in tools or not tools[t].module]
    if bad:
        known = ", ".join(sorted(t for t, spec in tools.items() if spec.module))
        raise typer.BadParameter(f"unknown tool(s) {', '.join(bad)}; implemented tools: {known}",
                                 param_hint="--preload / EASEL_PRELOAD")


def _api_process(settings, sock, executor, index: int) -> None:
    """One of ``--api-processes``: uvicorn on the parent's listening socket. Stops (SIGTERM to
    itself) when the parent is gone: it owns the workers and the port."""
    import signal

    from easel.api import create_app
    from easel.cli.serving import run_app
    from easel.logs import configure_logging
    from easel.supervise import exit_now, watch_parent

    watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM), interval=1.0)
    configure_logging(settings.core, f"easel-api-{index}")
    if executor is None and settings.fleet.executor == "celery":
        from easel.executors import create_executor

        executor = create_executor("celery", settings)
        executor.start()
    # one process sends the webhooks (the others would only compete for the same leases)
    app = create_app(settings, executor, dispatch_webhooks=index == 0)
    run_app(app, sockets=[sock])
    exit_now(0)  # stopped: the interpreter's teardown would only delay the server's exit


def serve_processes(settings, host: str, port: int, executor) -> None:
    """``easel serve --api-processes N``: bind the port once, run N API processes on it (spawned;
    the kernel deals connections among them), keep them running (a :class:`Supervisor`: one that
    exits is restarted, with backoff while it keeps dying) until SIGTERM/SIGINT, then stop them
    (SIGTERM: uvicorn finishes the requests in flight; ``API_STOP_GRACE`` s, then SIGKILL).

    The local workers stay in this process's executor: API processes wake them through a
    :class:`easel.executors.local.WakeHandle` (or leave tasks to the workers' polling when there
    is no local executor, ``--workers 0``).
    """
    import multiprocessing as mp

    from easel.supervise import Child, StopRequest, Supervisor

    ctx = mp.get_context("spawn")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    # local workers are woken through a handle; a Celery executor cannot cross processes, so each
    # API process of a fleet publishes through its own (see _api_process)
    handle = executor.handle() if executor is not None and hasattr(executor, "handle") else None
    stop = StopRequest()

    def spawn(index: int) -> Child:
        p = ctx.Process(target=_api_process, args=(settings, sock, handle, index), name=f"easel-api-{index}",
                        daemon=False)
        p.start()
        return Child(p, f"easel-api-{index}")

    processes = Supervisor(spawn, settings.api.api_processes, what="API process")
    processes.start()
    try:
        processes.run(stop.event, 1.0)
    finally:
        processes.stop(API_STOP_GRACE)
        sock.close()


def _stop(executor, metrics_dir: Optional[Path]) -> None:
    """Stop the workers, then remove this server's metrics folder (idempotent)."""
    import shutil

    if executor is not None:
        executor.stop()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
