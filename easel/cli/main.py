"""The ``easel`` command: serve, worker, projects, models, run, demo."""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from easel.cli.output import print_rows
from easel.cli.follow import follow, progress_of  # noqa: F401 - progress_of is part of this module's API

app = typer.Typer(help="Easel: a self-hostable image-generation server speaking the Wiro tool API.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
projects_app = typer.Typer(help="Manage projects (API key + secret).", no_args_is_help=True)
models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(projects_app, name="projects")
app.add_typer(models_app, name="models")
console = Console()


def prepare_metrics_dir(data_dir: Path) -> Optional[Path]:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` for this server and the workers it spawns; return the folder.

    Runs before ``prometheus_client`` is imported (it reads the variable once, at import). The
    folder is ``<data_dir>/metrics/<hostname>-<pid>``, emptied now and removed when the server
    stops; folders of this host whose server process is gone are removed. Each ``easel serve``
    therefore reports its own process tree, and several servers on one data directory never mix
    or wipe each other's samples. An operator who sets ``PROMETHEUS_MULTIPROC_DIR`` keeps that
    folder (and its clean-up) to themselves: returns None.
    """
    import os
    import shutil

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
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
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _settings(data_dir: Optional[Path], **kw):
    return _settings_from(None, data_dir=data_dir, **kw)


def _settings_from(config: Optional[Path], **kw):
    """Settings from the config file and environment, with the flags that were given on top; a
    value of the wrong type is a usage error naming the variable (no traceback)."""
    from easel.config import Settings

    try:
        return Settings.from_env(config, **kw)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _sources(config: Optional[Path]) -> dict:
    """What the config file and the environment set (:func:`easel.config.read_sources`), as
    :func:`_settings_from` reports a bad value."""
    from easel.config import read_sources

    try:
        return read_sources(config)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


_BROKER = typer.Option(None, help="Celery broker URL: redis://host:6379/0 or amqp://user:pass@host/ "
                                  "[env EASEL_BROKER_URL; default redis://127.0.0.1:6379/0].")


@app.command()
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
    broker: Optional[str] = _BROKER,
    config: Optional[Path] = typer.Option(None, help="TOML file of settings (field = value) [env EASEL_CONFIG_FILE]. "
                                                     "Precedence: flags given > environment > this file > defaults."),
    api_processes: Optional[int] = typer.Option(None, help="API processes on this port (they share the store; the "
                                                           "local workers belong to this process) "
                                                           "[env EASEL_API_PROCESSES; default 1]."),
    preload: Optional[str] = typer.Option(None, help="Tools whose pipelines the workers load at start, e.g. "
                                                     "wiro/text-to-image-sd-lora (comma-separated) [env EASEL_PRELOAD]."),
):
    """Run the API server and its local workers (or, with --executor celery --workers 0, the API
    process of a fleet: docs/deploy.md)."""
    given = {"data_dir": data_dir, "model_source": model_source, "workers": workers, "public_url": public_url,
             "fetch_allow": _csv(fetch_allow), "gpus": _csv(gpus), "storage": storage, "executor": executor, "broker_url": broker,
             "api_processes": api_processes, "preload": _csv(preload)}
    sources = _sources(config)
    if public_url is None and "public_url" not in sources:
        given["public_url"] = f"http://{host}:{port}"
    settings = _settings_from(config, **given)
    if settings.executor == "celery":
        if settings.workers > 0 and (workers is not None or "workers" in sources):
            raise typer.BadParameter("with --executor celery this process runs no workers: give --workers 0 and "
                                     "start `easel worker` processes (docs/deploy.md)", param_hint="--workers")
        settings = settings.with_(workers=0)
    check_preload(settings)
    check_storage(settings)
    metrics_dir = prepare_metrics_dir(settings.data_dir)  # before anything imports prometheus_client
    from easel.api import create_app
    from easel.cli.serving import run_app, start_line
    from easel.logs import configure_logging
    from easel.executors import create_executor
    from easel.store import SecretBox, Store
    from easel.store.notify import Publisher
    from easel.tasks import lifecycle

    configure_logging(settings)
    logging.getLogger("easel.serve").info(start_line(settings, host, port))
    workers = settings.workers
    store = Store(settings.database_url, wakeups=Publisher.for_settings(settings),
                  secrets=SecretBox.for_settings(settings))  # migrate() checks that the key opens the secrets
    store.migrate()
    executor = None
    # tasks whose worker's lease expired (a server that stopped); other live servers' tasks keep running
    failed = lifecycle.recover_interrupted(store, settings.lease_seconds, task_timeout=settings.task_timeout_seconds,
                                           requeue_unstarted=settings.requeue_unstarted)
    if failed:
        console.print(f"[yellow]{len(failed)} task(s) had no live worker any more; ended: {failed}")
    if settings.executor == "celery" or workers > 0:
        try:
            executor = create_executor(settings.executor, settings)
        except RuntimeError as exc:  # e.g. Celery is not installed
            console.print(f"[red]{exc}")
            raise typer.Exit(1)
        executor.start()
    if settings.api_processes > 1:
        try:
            _serve_processes(settings, host, port, executor)
        finally:
            _stop(executor, metrics_dir)
        from easel.supervise import exit_now

        exit_now(0)  # all stopped and cleaned; the interpreter's teardown took seconds here
    try:  # SIGTERM/SIGINT: uvicorn's graceful shutdown, the app's (workers stop there), then here
        run_app(create_app(settings, executor, on_shutdown=lambda: _stop(executor, metrics_dir)), host, port)
    finally:
        _stop(executor, metrics_dir)


def _csv(value: Optional[str]) -> Optional[tuple[str, ...]]:
    """A comma-separated flag as a tuple (None when the flag was not given)."""
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else None


@app.command()
def worker(
    broker: Optional[str] = _BROKER,
    data_dir: Optional[Path] = typer.Option(None, help="This worker's own directory: models, scratch files (and the "
                                                       "SQLite database when no --database-url) "
                                                       "[env EASEL_DATA_DIR; default easel-data]."),
    database_url: Optional[str] = typer.Option(None, help="The fleet's database, e.g. postgresql+psycopg://easel@db/easel "
                                                          "[env EASEL_DATABASE_URL]."),
    storage: Optional[str] = typer.Option(None, help="The fleet's files: s3://bucket/prefix (see docs/storage.md) or "
                                                     "local [env EASEL_STORAGE; default local]."),
    model_source: Optional[str] = typer.Option(None, help="tiny, hub or random [env EASEL_MODEL_SOURCE; default tiny]."),
    queues: Optional[str] = typer.Option(None, help="Model families to serve, comma-separated, among sd15, sdxl, flux, "
                                                    "ic-light, instantid [env EASEL_QUEUES; default all]."),
    gpus: Optional[str] = typer.Option(None, help="GPU of this worker (CUDA_VISIBLE_DEVICES), e.g. 0; several (0,1 or "
                                                  "all) start one worker process per GPU [env EASEL_GPUS]."),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
    metrics_port: int = typer.Option(0, help="Serve this worker's Prometheus metrics (model loads, GPU memory, "
                                             "tasks it ended) at http://0.0.0.0:PORT/metrics; 0 = off."),
    config: Optional[Path] = typer.Option(None, help="TOML file of settings [env EASEL_CONFIG_FILE]."),
):
    """Run a fleet worker: a Celery worker that keeps models warm and runs the tasks whose ids the
    API processes publish (one task at a time; one worker per GPU; docs/deploy.md)."""
    import os

    given = {"data_dir": data_dir, "database_url": database_url, "storage": storage, "model_source": model_source,
             "queues": _csv(queues), "broker_url": broker, "executor": "celery"}
    gpu_list = _csv(gpus)
    if gpu_list == ("all",):
        import torch

        gpu_list = tuple(str(i) for i in range(torch.cuda.device_count()))
    settings = _settings_from(config, **given, gpus=gpu_list)
    if len(settings.gpus) > 1:
        if metrics_port:
            raise typer.BadParameter("one port per process: start one `easel worker --gpus N --metrics-port P` "
                                     "per GPU instead", param_hint="--metrics-port")
        args = [f"--{k.replace('_', '-')}={v}" for k, v in (("broker", broker), ("data_dir", data_dir),
                ("database_url", database_url), ("storage", storage), ("model_source", model_source),
                ("queues", queues), ("config", config)) if v is not None]
        raise typer.Exit(_per_gpu([sys.executable, "-m", "easel", "worker", f"--loglevel={loglevel}", *args],
                                  settings.gpus, settings.shutdown_grace_seconds + 30.0))
    if settings.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpus[0]  # before anything initialises CUDA
    from easel.executors.celery import run_worker
    from easel.store import Store

    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # models and scratch folders
    check_storage(settings)
    Store(settings.database_url).migrate()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    try:
        run_worker(settings, loglevel=loglevel)
    except RuntimeError as exc:  # e.g. Celery is not installed
        console.print(f"[red]{exc}")
        raise typer.Exit(1)


def _per_gpu(command: list[str], gpus: tuple[str, ...], grace: float) -> int:
    """Run ``command --gpus G`` for each GPU and supervise them (:class:`easel.supervise.Supervisor`):
    a child that exits is restarted (1 s, doubling to 60 s while it keeps dying within 30 s);
    SIGTERM/SIGINT are passed on (Celery's warm shutdown: the task in hand finishes) and a child
    still running ``grace`` seconds later is killed, saying so. A child also gets SIGTERM from the
    kernel if this process dies (``PR_SET_PDEATHSIG``). Returns 0 after a requested stop."""
    import signal
    import threading

    from easel.supervise import Child, Supervisor, parent_death_signal

    stopping = threading.Event()
    received: list[int] = []

    def spawn(slot: int) -> Child:
        proc = subprocess.Popen([*command, f"--gpus={gpus[slot]}"], preexec_fn=parent_death_signal)
        return Child(proc, f"GPU {gpus[slot]}")

    def stop(signum, _frame) -> None:
        received.append(signum)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children = Supervisor(spawn, len(gpus), what="worker")
    children.start()
    while not stopping.wait(0.5):
        children.check()

    def ask() -> None:
        for child in children.alive():
            child.signal(received[0])

    children.stop(grace, ask=ask)
    return 0


def check_preload(settings) -> None:
    """Stop with a usage error naming the setting when ``Settings.preload`` names a tool that does
    not exist or is not implemented."""
    from easel.catalog import load_tools

    tools = load_tools()
    bad = [t for t in settings.preload if t not in tools or not tools[t].module]
    if bad:
        known = ", ".join(sorted(t for t, spec in tools.items() if spec.module))
        raise typer.BadParameter(f"unknown tool(s) {', '.join(bad)}; implemented tools: {known}",
                                 param_hint="--preload / EASEL_PRELOAD")


def check_storage(settings) -> None:
    """Stop with the reason (exit code 2) when the configured storage cannot be used, e.g. an S3
    bucket that does not exist or refuses these credentials: better at start than at the first Run."""
    from easel.storage import create_storage

    try:
        create_storage(settings).check()
    except OSError as exc:
        console.print(f"[red]Storage unusable: {exc}")
        raise typer.Exit(2) from None


def _api_process(settings, sock, executor, index: int) -> None:
    """One of ``--api-processes``: uvicorn on the parent's listening socket. Exits when the parent
    is gone (it owns the workers and the port)."""
    import multiprocessing as mp
    import os
    import signal
    import threading

    from easel.api import create_app
    from easel.cli.serving import run_app
    from easel.logs import configure_logging

    configure_logging(settings, f"easel-api-{index}")
    parent = mp.parent_process()

    def watch() -> None:
        while parent is None or parent.is_alive():
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="easel-parent-watch", daemon=True).start()
    if executor is None and settings.executor == "celery":
        from easel.executors import create_executor

        executor = create_executor("celery", settings)
        executor.start()
    # one process sends the webhooks (the others would only compete for the same leases)
    app = create_app(settings, executor, dispatch_webhooks=index == 0)
    run_app(app, sockets=[sock])
    from easel.supervise import exit_now

    exit_now(0)  # stopped: the interpreter's teardown would only delay the server's exit


def _serve_processes(settings, host: str, port: int, executor) -> None:
    """``easel serve --api-processes N``: bind the port once, run N API processes on it (spawned;
    the kernel deals connections among them), keep them running, and stop them on SIGTERM/SIGINT.

    The local workers stay in this process's executor: API processes wake them through a
    :class:`easel.executors.local.WakeHandle` (or leave tasks to the workers' polling when there
    is no local executor, ``--workers 0``).
    """
    import multiprocessing as mp
    import signal
    import socket as socketlib
    import threading

    ctx = mp.get_context("spawn")
    sock = socketlib.socket(socketlib.AF_INET6 if ":" in host else socketlib.AF_INET, socketlib.SOCK_STREAM)
    sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    # local workers are woken through a handle; a Celery executor cannot cross processes, so each
    # API process of a fleet publishes through its own (see _api_process)
    handle = executor.handle() if executor is not None and hasattr(executor, "handle") else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def spawn(index: int):
        p = ctx.Process(target=_api_process, args=(settings, sock, handle, index), name=f"easel-api-{index}",
                        daemon=False)
        p.start()
        return p

    procs = [spawn(i) for i in range(settings.api_processes)]
    try:
        while not stop.wait(1.0):
            for i, p in enumerate(procs):
                if not p.is_alive():
                    console.print(f"[yellow]API process {i} exited with code {p.exitcode}; restarting it")
                    procs[i] = spawn(i)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)
        sock.close()


def _stop(executor, metrics_dir: Optional[Path]) -> None:
    """Stop the workers, then remove this server's metrics folder (idempotent)."""
    import shutil

    if executor is not None:
        executor.stop()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@projects_app.command("create")
def projects_create(
    name: str,
    data_dir: Optional[Path] = typer.Option(None, help="[env EASEL_DATA_DIR; default easel-data]"),
    auth: str = typer.Option("signature", help="signature or apikey"),
    nonce_policy: str = typer.Option("lenient", help="Signature projects: lenient (any nonce, reusable: what "
                                                     "Wiro's own clients need) or strict (each nonce once; "
                                                     "timestamp nonces within EASEL_NONCE_WINDOW_SECONDS)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Create a project and print its apikey and apisecret."""
    from easel.store import SecretBox, Store

    settings = _settings(data_dir)
    store = Store(settings.database_url, secrets=SecretBox.for_settings(settings))
    store.migrate()
    if auth not in ("signature", "apikey"):
        raise typer.BadParameter("must be 'signature' or 'apikey'", param_hint="--auth")
    if nonce_policy not in ("lenient", "strict"):
        raise typer.BadParameter("must be 'lenient' or 'strict'", param_hint="--nonce-policy")
    p = store.create_project(name, auth, nonce_policy)
    info = {"id": p.id, "name": p.name, "apikey": p.apikey, "apisecret": p.apisecret, "auth": p.auth_mode,
            "nonce_policy": p.nonce_policy}
    if as_json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            console.print(f"{k}: {v}")


@projects_app.command("nonce-policy")
def projects_nonce_policy(
    apikey: str = typer.Argument(..., help="The project's API key."),
    policy: str = typer.Argument(..., help="lenient or strict"),
    data_dir: Path = typer.Option(Path("easel-data")),
):
    """Change a project's nonce policy (projects made before 0.3 are lenient after the upgrade)."""
    from easel.store import SecretBox, Store

    if policy not in ("lenient", "strict"):
        raise typer.BadParameter("must be 'lenient' or 'strict'", param_hint="POLICY")
    settings = _settings(data_dir)
    store = Store(settings.database_url, secrets=SecretBox.for_settings(settings))
    store.migrate()
    project = store.set_nonce_policy(apikey, policy)
    if project is None:
        console.print("[red]no project has this API key")
        raise typer.Exit(1)
    console.print(f"{project.name}: nonce policy {project.nonce_policy}")


@projects_app.command("rotate-key")
def projects_rotate_key(
    data_dir: Optional[Path] = typer.Option(None, help="[env EASEL_DATA_DIR; default easel-data]"),
    new: bool = typer.Option(False, "--new", help="First put a new key first in the key file (secret.key)."),
    drop_old: bool = typer.Option(False, "--drop-old", help="Then keep only the first key in the key file."),
):
    """Re-encrypt every project's API secret with the first operator key (docs/configuration.md)."""
    from easel.cli.keys import rotate_key

    done = rotate_key(_settings(data_dir), new=new, drop_old=drop_old)
    console.print(f"{done.projects} API secret(s) re-encrypted with the first key of {done.source}"
                  + (f"; {done.dropped} old key(s) removed from it" if done.dropped else ""), soft_wrap=True)


@models_app.command("make-tiny")
def make_tiny_cmd(folder: Path, force: bool = typer.Option(False, help="Rewrite even if present.")):
    """Write the tiny random-weight models (noise images; for offline tests and demos)."""
    from easel.synthetic.tiny import make_tiny

    for name, path in make_tiny(folder, force=force).items():
        console.print(f"{name}: {path}")


@models_app.command("make-random")
def make_random_cmd(
    folder: Path,
    family: str = typer.Option(..., help="sd15, sdxl or flux (FLUX.1-dev)."),
    size: str = typer.Option("full", help="full (published sizes) or small (same architecture, narrow layers)."),
    device: str = typer.Option("cpu", help="Where to build the weights: cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("", help="fp32, fp16 or bf16; default fp32 on CPU, bf16 for flux / fp16 otherwise on CUDA."),
    force: bool = typer.Option(False, help="Rewrite even if present."),
):
    """Write a random-weight pipeline at its family's published size (diffusers folder + LoRAs)."""
    import torch

    from easel.synthetic.fullsize import FAMILIES, SIZES, make_random

    dtypes = {"": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if family not in FAMILIES:
        raise typer.BadParameter(f"must be one of {', '.join(FAMILIES)}", param_hint="--family")
    if size not in SIZES:
        raise typer.BadParameter(f"must be one of {', '.join(SIZES)}", param_hint="--size")
    if dtype not in dtypes:
        raise typer.BadParameter("must be fp32, fp16 or bf16", param_hint="--dtype")
    path = make_random(folder, family, size, device=device, dtype=dtypes[dtype], force=force)
    console.print(f"{family}-{size}: {path}")
    console.print((path / "easel-random.json").read_text())


def _parse_params(params: list[str]) -> tuple[dict, dict]:
    values: dict = {}
    files: dict = {}
    for item in params:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r} is not name=value", param_hint="-p")
        name, value = item.split("=", 1)
        if value.startswith("@"):
            files[name] = Path(value[1:])
        else:
            values[name] = value
    return values, files


def _follow(client, taskid: str, tasktoken: str) -> dict:
    """Follow a task: a live bar on a terminal, a line per phase and every few seconds otherwise."""
    return follow(client, taskid, tasktoken, console)


tasks_app = typer.Typer(help="List and manage your tasks (uses EASEL_BASE_URL / EASEL_API_KEY / EASEL_API_SECRET).")
app.add_typer(tasks_app, name="tasks")
_BASE = typer.Option("http://127.0.0.1:8000/v1", envvar="EASEL_BASE_URL")
_KEY = typer.Option(..., envvar="EASEL_API_KEY")
_SECRET = typer.Option(None, envvar="EASEL_API_SECRET")


def _client_call(base_url: str, api_key: str, api_secret: Optional[str], fn):
    from easel.client import ApiError, Client

    try:
        return fn(Client(base_url, api_key, api_secret))
    except ApiError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1)


@tasks_app.command("list")
def tasks_list(limit: int = typer.Option(20), status: str = typer.Option("", help="Only this status."),
               as_json: bool = typer.Option(False, "--json", help="Print Task/List's task objects as JSON."),
               base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """The project's tasks, newest first (a table on a terminal; whole values, tab-separated, when
    piped)."""
    tasks = _client_call(base_url, api_key, api_secret, lambda c: c.tasks(limit=limit, status=status))
    if as_json:
        print(json.dumps(tasks, indent=2))
        return
    header = ("id", "tool", "status", "pexit", "created", "outputs")
    rows = [(t["id"], f"{t.get('modelslugowner', '')}/{t.get('modelslugproject', '')}", t["status"],
             t.get("pexit", ""), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(t.get("createtime") or 0))),
             str(len(t.get("outputs") or []))) for t in tasks]
    print_rows(console, header, rows)


@tasks_app.command("detail")
def tasks_detail(taskid: str, base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """Print a task's Task/Detail object as JSON."""
    console.print_json(json.dumps(_client_call(base_url, api_key, api_secret, lambda c: c.detail(taskid))))


@tasks_app.command("cancel")
def tasks_cancel(taskid: str, base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """Cancel a queued task."""
    task = _client_call(base_url, api_key, api_secret, lambda c: c.cancel(taskid))
    console.print(f"{taskid}: {task['status']}")


@tasks_app.command("kill")
def tasks_kill(taskid: str, base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """Kill a running task (it stops within one denoising step)."""
    task = _client_call(base_url, api_key, api_secret, lambda c: c.kill(taskid))
    console.print(f"{taskid}: {task['status']}")


@tasks_app.command("delete")
def tasks_delete(taskid: str, base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """Delete a finished task's input and output files (Task/InputOutputDelete; the record stays)."""
    _client_call(base_url, api_key, api_secret, lambda c: c.delete(taskid))
    console.print(f"{taskid}: inputs and outputs deleted")


@app.command()
def run(
    tool: str = typer.Argument(..., help="OWNER/SLUG, e.g. wiro/text-to-image-sd-lora"),
    param: list[str] = typer.Option([], "-p", "--param", help="name=value, or name=@file to upload."),
    wait: bool = typer.Option(False, "--wait", help="Follow the task and download its outputs."),
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", envvar="EASEL_BASE_URL"),
    api_key: str = typer.Option(..., envvar="EASEL_API_KEY"),
    api_secret: Optional[str] = typer.Option(None, envvar="EASEL_API_SECRET"),
    out: Path = typer.Option(Path("outputs"), help="Where --wait downloads outputs."),
):
    """Submit a Run; with --wait show progress and download the outputs. Works against Easel or
    Wiro itself: EASEL_BASE_URL=https://api.wiro.ai/v1 (the socket is then wss://socket.wiro.ai/v1)."""
    from easel.client import ApiError, Client

    client = Client(base_url, api_key, api_secret)
    values, files = _parse_params(param)
    try:
        answer = client.run(tool, values, files or None)
    except ApiError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1)
    console.print(f"taskid {answer['taskid']}  socketaccesstoken {answer['socketaccesstoken']}")
    if not wait:
        return
    task = _follow(client, answer["taskid"], answer["socketaccesstoken"])
    if task.get("pexit") != "0" or task["status"] != "task_postprocess_end":
        console.print(f"[red]{task['status']} pexit {task.get('pexit')}: {task.get('debugerror', '')}")
        raise typer.Exit(1)
    for path in client.download(task, out / answer["taskid"]):
        console.print(str(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CALLBACK_SENTENCE = "You can provide a callback URL; Wiro will send a POST request to it when the task is completed."
# Each implemented seed's own example request (its curl body, quirks included), and the files the
# request names, uploaded first with POST /v1/File/Upload as a Wiro user would.
DEMO_REQUESTS = {
    "wiro/text-to-image-sd-lora": {
        "selectedModel": "", "selectedModelPrivate": "", "selectedLoraModel": [], "selectedLoraModelPrivateUrl": "",
        "prompt": "summer landscape, red color, Bokeh, the waterfall, fog over the lake, insanely detailed and "
                  "intricate, hypermaximalist, elegant, ornate, hyper realistic, super detailed.",
        "negativePrompt": "", "samples": 4, "steps": 30, "scale": "7.5", "seed": "123456", "clipSkip": 4,
        "width": 512, "height": 512, "scheduler": "EulerDiscreteScheduler", "callbackUrl": CALLBACK_SENTENCE,
    },
    "wiro/text-to-image-flux-lora-fast": {
        "selectedLoraModel": [], "selectedLoraModelPrivateUrl": "",
        "prompt": " vintage matchbox artwork, A retro matchbox label depicting a lion roaring under a starry African "
                  "night sky, framed with decorative vintage borders and textured printing effects.",
        "steps": 20, "scale": "3.5", "samples": 1, "seed": "3572004920", "width": 1024, "height": 1024,
        "callbackUrl": CALLBACK_SENTENCE,
    },
    "Adel_AI/Comics-Factory-v1": {
        "prompt": "ComicsFact1 style. A moody, atmospheric photo-realistic shoot from the side about a silhouette of a "
                  "man walking towards a vintage car in a dimly lit industrial setting during a rainy night, with a "
                  "strong focus on the man and his vehicle. on the left side of the image, a man in a long coat and "
                  "hat is walking towards the car, carrying a briefcase. he appears to be in his mid-twenties, with "
                  "his full body visible, and his posture suggests a sense of urgency. he is wearing a hat and "
                  "carrying a suitcase, and the car is parked in front of him, casting a shadow on the wet floor. in "
                  "the background, a dilapidated building with wooden beams and beams is partially obscured by fog, "
                  "creating a mysterious atmosphere. the scene is set against a dark, foggy backdrop with a hint of "
                  "green light emanating from the windows, adding to the moody atmosphere.solo, hat, walking, full "
                  "body, indoors, suit, from side, bag, car, silhouette, window, suitcase, rain, silhouette of person, "
                  "rainy",
        "samples": 1, "steps": 20, "scale": "3.5", "seed": "93080474", "width": 1024, "height": 1024,
        "callbackUrl": CALLBACK_SENTENCE,
    },
    "wiro/ic-light-background": {
        "selectedModel": "", "selectedModelPrivate": "", "inputImageUrl": "bg-img2.png",
        "inputImage2Url": "ic-light.png", "prompt": "a woman", "negativePrompt": "bad quality", "samples": 1,
        "steps": 30, "scale": "2.0", "highres_scale": "1.5", "highres_denoise": "0.5", "seed": "123456",
        "bg_source": "Use Background Image", "callbackUrl": CALLBACK_SENTENCE,
    },
    "wiro/instant-id-controlnet-lora": {
        "selectedModel": "", "selectedModelPrivate": "", "selectedLoraModel": [], "selectedLoraModelPrivateUrl": "",
        "inputImageUrl": "input-portrait-2.jpg", "selectedControlnetModel": [],
        "prompt": "olympic athlete, standing, wearing olympics uniform, Paris background, photorealistic, realistic, "
                  "embodies the spirit of victory, captured by the official Olympic Games photographer 2024, the "
                  "image is framed through photographer Steve McCurry, 2015, used a classic 50mm lens and "
                  "illuminated by the brilliance of stadium floodlights, realistic",
        "negativePrompt": "(lowres, low quality, worst quality:1.2), (text:1.2), watermark, (frame:1.2), deformed, "
                          "ugly, deformed eyes, blur, out of focus, blurry, mutation, mutated arms, deformed cat, "
                          "deformed, photo, anthropomorphic cat, monochrome, photo, pet collar, gun, weapon, blue, 3d, "
                          "drones, drone, buildings in background, green, nsfw",
        "steps": 20, "scale": "5.0", "ip_adapter_scale": "0.8", "samples": 1, "seed": "3572004920",
        "scheduler": "DDIMScheduler", "callbackUrl": CALLBACK_SENTENCE,
    },
}


def demo_files() -> dict[str, bytes]:
    """The input images the seeds' examples name, drawn here (deterministic): ``bg-img2.png``, a
    street-like background (512×384), ``ic-light.png``, a figure on a plain backdrop (384×512), and
    ``input-portrait-2.jpg``, the same figure with a "face" the tiny face detector finds (a real
    detector needs a real photo: see docs/catalog.md, InstantID)."""
    import io

    from PIL import Image, ImageDraw

    from easel.synthetic.tiny_faces import draw_test_face

    bg = Image.new("RGB", (512, 384))
    draw = ImageDraw.Draw(bg)
    for y in range(384):  # warm sky to dark street
        t = y / 383
        draw.line([(0, y), (511, y)], fill=(int(250 - 190 * t), int(170 - 120 * t), int(90 - 40 * t)))
    for x, h in ((20, 200), (120, 260), (260, 180), (380, 240)):
        draw.rectangle([x, 384 - h, x + 90, 383], fill=(40, 40, 60))
        for wy in range(384 - h + 15, 370, 30):
            draw.rectangle([x + 15, wy, x + 30, wy + 12], fill=(255, 220, 120))
    fg = Image.new("RGB", (384, 512), (235, 235, 235))
    draw = ImageDraw.Draw(fg)
    draw.ellipse([142, 60, 242, 170], fill=(224, 180, 150))
    draw.polygon([(112, 512), (142, 200), (242, 200), (272, 512)], fill=(70, 90, 160))
    draw.ellipse([132, 40, 252, 120], fill=(60, 40, 30))
    portrait = fg.copy()
    draw_test_face(portrait, (142, 70, 242, 190), 0)
    out = {}
    for name, img in (("bg-img2.png", bg), ("ic-light.png", fg), ("input-portrait-2.jpg", portrait)):
        buf = io.BytesIO()
        img.save(buf, "JPEG" if name.endswith(".jpg") else "PNG", quality=95)
        out[name] = buf.getvalue()
    return out


@app.command()
def demo(data_dir: Path = typer.Option(Path(".easel-demo"), help="Data directory for the demo server."),
         tool: list[str] = typer.Option([], "--tool", help="Only these tools (default: every implemented seed).")):
    """Start a server on the embedded default (SQLite, local worker, tiny models), send every
    implemented seed's example request exactly as its curl example does (uploading the input images
    it names first with POST /v1/File/Upload), and print the PNG paths per tool."""
    import httpx

    from easel.catalog import load_tools
    from easel.client import Client
    from easel.signing import signature

    from easel.supervise import stop_process

    specs = load_tools()
    chosen = [t for t in DEMO_REQUESTS if (not tool or t in tool) and specs[t].module]
    unknown = [t for t in tool if t not in DEMO_REQUESTS or not specs[t].module]
    if unknown:
        raise typer.BadParameter(f"no demo request for {', '.join(unknown)}; among: {', '.join(DEMO_REQUESTS)}",
                                 param_hint="--tool")
    port = _free_port()
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    log = open(log_path, "w") if data_dir.parent.exists() else subprocess.DEVNULL
    print(f"starting easel serve on 127.0.0.1:{port} (data dir {data_dir}, tiny models; log {log_path})", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "easel", "serve", "--port", str(port), "--data-dir", str(data_dir),
                             "--model-source", "tiny"], stdout=log, stderr=subprocess.STDOUT)
    results: dict[str, list[tuple[Path, str]]] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        t0, said = time.monotonic(), False
        while True:  # /readyz: the worker has imported torch (a task sent earlier would only wait)
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
                if not said:
                    print("server up; waiting for its worker process to be ready (importing torch)", flush=True)
                    said = True
            except httpx.HTTPError:
                if proc.poll() is not None:
                    console.print(f"[red]the server exited; see {log_path}")
                    raise typer.Exit(1)
            if time.monotonic() - t0 > DEMO_READY_SECONDS:
                console.print(f"[red]the server was not ready after {DEMO_READY_SECONDS:.0f} s; see {log_path}")
                raise typer.Exit(1)
            time.sleep(0.2)
        print(f"server ready after {time.monotonic() - t0:.1f} s", flush=True)
        out = subprocess.run([sys.executable, "-m", "easel", "projects", "create", "demo", "--data-dir", str(data_dir),
                              "--json"], capture_output=True, text=True, check=True)
        project = json.loads(out.stdout)
        client = Client(f"{base}/v1", project["apikey"], project["apisecret"])
        files = demo_files()
        for name in sorted({v for t in chosen for v in DEMO_REQUESTS[t].values() if isinstance(v, str) and v in files}):
            item = client.upload(name, files[name])
            print(f"uploaded {name} with File/Upload: {item['url']}", flush=True)  # whole URL: no wrapping
        for name in chosen:
            print(f"{name}: the seed's request", flush=True)
            nonce = str(int(time.time() * 1000))
            headers = {"Content-Type": "multipart/form-data", "x-api-key": project["apikey"], "x-nonce": nonce,
                       "x-signature": signature(project["apikey"], project["apisecret"], nonce)}
            t0 = time.time()
            answer = httpx.post(f"{base}/v1/Run/{name}", headers=headers, content=json.dumps(DEMO_REQUESTS[name])).json()
            print(json.dumps(answer), flush=True)
            if not answer.get("result"):
                raise typer.Exit(1)
            task = _follow(client, answer["taskid"], answer["socketaccesstoken"])
            if task["pexit"] != "0":
                console.print(f"[red]{name} failed: {task['debugerror']}")
                raise typer.Exit(1)
            print(f"done in {time.time() - t0:.1f} s", flush=True)
            paths = client.download(task, data_dir / "outputs" / answer["taskid"])
            urls = {Path(o["name"]).name: o["url"] for o in task.get("outputs", []) if o.get("url")}
            results[name] = [(path, urls.get(path.name, "")) for path in paths]
        print("(tiny random models: the images are noise)")
        for name, outputs in results.items():
            print(f"{name}:")
            for path, url in outputs:
                print(f"  {path.resolve()}  {url}")
        sys.stdout.flush()
    finally:
        # the work is done (or failed) whatever the server's stop takes: escalate, say so, never raise
        stop_process(proc, DEMO_STOP_SECONDS, "the demo server", say=lambda m: print(m, file=sys.stderr, flush=True))


DEMO_READY_SECONDS = 900.0  # a loaded machine may take minutes to import torch
DEMO_STOP_SECONDS = 30.0  # an idle server stops in about 1 s; then SIGKILL, with a line saying so


from easel.cli import models as _models_cli  # noqa: E402  (easel models pull | list | set)

_models_cli.register(models_app, console, _settings_from)


def main() -> None:
    from easel.store.secretbox import SecretKeyError

    try:
        app()
    except SecretKeyError as exc:  # a missing or wrong operator key: what to do, not a traceback
        console.print(f"[red]API secrets: {exc}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
