"""``easel worker``: a fleet worker (a Celery worker, :mod:`easel.executors.celery`); with several
GPUs, one ``easel worker`` process per GPU kept by a :class:`easel.supervise.Supervisor`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from easel.cli.common import BROKER, check_storage, checked, console, csv, settings_from


def worker(
    broker: Optional[str] = BROKER,
    data_dir: Optional[Path] = typer.Option(None, help="This worker's own directory: models, scratch files (and the "
                                                       "SQLite database when no --database-url) "
                                                       "[env EASEL_DATA_DIR; default easel-data]."),
    database_url: Optional[str] = typer.Option(None, help="The fleet's database, e.g. postgresql+psycopg://easel@db/easel "
                                                          "[env EASEL_DATABASE_URL]."),
    storage: Optional[str] = typer.Option(None, help="The fleet's files: s3://bucket/prefix (see docs/storage.md) or "
                                                     "local [env EASEL_STORAGE; default local]."),
    model_source: Optional[str] = typer.Option(None, help="tiny, hub or random [env EASEL_MODEL_SOURCE; default tiny]."),
    queues: Optional[str] = typer.Option(None, help="Model families to serve, comma-separated (the "
                                                    "registered tools' families; an unknown one is refused "
                                                    "naming them) [env EASEL_QUEUES; default all]."),
    gpus: Optional[str] = typer.Option(None, help="GPU of this worker (CUDA_VISIBLE_DEVICES), e.g. 0; several (0,1 or "
                                                  "all) start one worker process per GPU [env EASEL_GPUS]."),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
    metrics_port: int = typer.Option(0, help="Serve this worker's Prometheus metrics (model loads, GPU memory, "
                                             "tasks it ended) at http://0.0.0.0:PORT/metrics; 0 = off."),
    config: Optional[Path] = typer.Option(None, help="TOML file of settings [env EASEL_CONFIG_FILE]."),
):
    """Run a fleet worker: a Celery worker that keeps models warm and runs the tasks whose ids the
    API processes publish (one task at a time; one worker per GPU; docs/deploy.md)."""
    given = {"data_dir": data_dir, "database_url": database_url, "storage": storage, "model_source": model_source,
             "queues": csv(queues), "broker_url": broker, "executor": "celery"}
    settings = settings_from(config, **given, gpus=csv(gpus))
    from easel.executors.celery import check_queues
    from easel.executors.local import expand_gpus
    from easel.store.notify import check_live

    if settings.fleet.queues:  # (the families come from the tools: imported only when asked)
        checked(check_queues, settings.fleet)
    checked(check_live, settings.live, settings.core.database_url)
    settings = settings.with_(gpus=expand_gpus(settings.worker.gpus))  # "all": every GPU torch sees
    if len(settings.worker.gpus) > 1:
        if metrics_port:
            raise typer.BadParameter("one port per process: start one `easel worker --gpus N --metrics-port P` "
                                     "per GPU instead", param_hint="--metrics-port")
        args = [f"--{k.replace('_', '-')}={v}" for k, v in (("broker", broker), ("data_dir", data_dir),
                ("database_url", database_url), ("storage", storage), ("model_source", model_source),
                ("queues", queues), ("config", config)) if v is not None]
        raise typer.Exit(per_gpu([sys.executable, "-m", "easel", "worker", f"--loglevel={loglevel}", *args],
                                 settings.worker.gpus, settings.worker.shutdown_grace_seconds + 30.0))
    if settings.worker.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.worker.gpus[0]  # before anything initialises CUDA
    from easel.executors.celery import run_worker
    from easel.store import Store

    settings.core.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # models and scratch folders
    check_storage(settings)
    Store(settings.core.database_url).migrate()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    try:
        run_worker(settings, loglevel=loglevel)
    except RuntimeError as exc:  # e.g. Celery is not installed
        console.print(f"[red]{exc}")
        raise typer.Exit(1)


def per_gpu(command: list[str], gpus: tuple[str, ...], grace: float) -> int:
    """Run ``command --gpus=G`` for each GPU ``G`` and keep them running with a
    :class:`easel.supervise.Supervisor`: a child that exits is restarted (1 s, doubling to 60 s
    while it keeps dying within 30 s); SIGTERM/SIGINT are passed on (Celery's warm shutdown: the
    task in hand finishes) and a child still running ``grace`` seconds later is killed, saying so.
    A child also gets SIGTERM from the kernel if this process dies (``PR_SET_PDEATHSIG``).

    Returns:
        0, after a requested stop.
    """
    from easel.supervise import Child, StopRequest, Supervisor, parent_death_signal

    def spawn(slot: int) -> Child:
        proc = subprocess.Popen([*command, f"--gpus={gpus[slot]}"], preexec_fn=parent_death_signal)
        return Child(proc, f"GPU {gpus[slot]}")

    stop = StopRequest()
    children = Supervisor(spawn, len(gpus), what="worker")
    children.start()
    children.run(stop.event, 0.5)  # in this (main) thread: the children's PR_SET_PDEATHSIG follows it

    def ask() -> None:
        for child in children.alive():
            child.signal(stop.signum)

    children.stop(grace, ask=ask)
    return 0
