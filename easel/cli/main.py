"""The ``easel`` command: serve, projects, models, run, demo."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(help="Easel: a self-hostable image-generation server speaking the Wiro tool API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
projects_app = typer.Typer(help="Manage projects (API key + secret).", no_args_is_help=True)
models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(projects_app, name="projects")
app.add_typer(models_app, name="models")
console = Console()


def _settings(data_dir: Path, **kw):
    from easel.config import Settings

    return Settings.from_env(data_dir=data_dir, **kw)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    data_dir: Path = typer.Option(Path("easel-data"), help="Where the database, files and models live."),
    model_source: str = typer.Option("tiny", help="tiny (offline tiny models), hub (real weights) or random (published sizes, random weights)."),
    workers: int = typer.Option(1, help="Local worker processes; 0 = API only (workers of another "
                                        "`easel serve` on the same database run the tasks)."),
    public_url: Optional[str] = typer.Option(None, help="Base URL written into output urls (default http://HOST:PORT)."),
    gpus: Optional[str] = typer.Option(None, help="GPUs dealt round-robin to the workers, e.g. 0,1 or all "
                                                  "(one worker per GPU: --workers 2 --gpus 0,1)."),
    fetch_allow: Optional[str] = typer.Option(None, help="Comma-separated hosts/CIDRs the URL fetcher may reach "
                                                         "although private (e.g. 127.0.0.1 for local tests)."),
):
    """Run the API server and its local workers."""
    import uvicorn

    from easel.api import create_app
    from easel.executors import create_executor
    from easel.store import Store
    from easel.tasks import lifecycle

    extra = {"fetch_allow": tuple(x.strip() for x in fetch_allow.split(",") if x.strip())} if fetch_allow else {}
    if gpus:
        extra["gpus"] = tuple(x.strip() for x in gpus.split(",") if x.strip())
    settings = _settings(data_dir, model_source=model_source, workers=workers,
                         public_url=public_url or f"http://{host}:{port}", **extra)
    store = Store(settings.database_url)
    store.migrate()
    executor = None
    if workers > 0:  # only a process that owns workers may end tasks it finds mid-run
        failed = lifecycle.recover_interrupted(store)
        if failed:
            console.print(f"[yellow]{len(failed)} task(s) were mid-run when the server stopped; ended as failed: {failed}")
        executor = create_executor("local", settings)
        executor.start()
    try:
        # stop the workers in the app's shutdown: uvicorn re-raises SIGTERM after its graceful
        # shutdown, so code after uvicorn.run() may never run
        uvicorn.run(create_app(settings, executor, on_shutdown=executor.stop if executor else None),
                    host=host, port=port, log_level="warning")
    finally:
        if executor is not None:
            executor.stop()


@projects_app.command("create")
def projects_create(
    name: str,
    data_dir: Path = typer.Option(Path("easel-data")),
    auth: str = typer.Option("signature", help="signature or apikey"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Create a project and print its apikey and apisecret."""
    from easel.store import Store

    settings = _settings(data_dir)
    store = Store(settings.database_url)
    store.migrate()
    if auth not in ("signature", "apikey"):
        raise typer.BadParameter("must be 'signature' or 'apikey'", param_hint="--auth")
    p = store.create_project(name, auth)
    info = {"id": p.id, "name": p.name, "apikey": p.apikey, "apisecret": p.apisecret, "auth": p.auth_mode}
    if as_json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            console.print(f"{k}: {v}")


@models_app.command("make-tiny")
def make_tiny_cmd(folder: Path, force: bool = typer.Option(False, help="Rewrite even if present.")):
    """Write the tiny random-weight models (noise images; for offline tests and demos)."""
    from easel.models.tiny import make_tiny

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

    from easel.models.fullsize import FAMILIES, SIZES, make_random

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
    """Follow a task with a live progress bar (WebSocket frames; polling if the socket fails)."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task("task_queue", total=100, info="")

        def show(status: str, progress: dict) -> None:
            info = (f"step {progress['stepCurrent']}/{progress['stepTotal']}  {progress['speed']} it/s  "
                    f"ETA {progress['remainingTime']}") if progress else None
            fields = {"info": info} if info else {}
            completed = float(progress["percentage"]) if progress else (100 if status == "task_postprocess_end" else None)
            bar.update(job, description=status, completed=completed, **fields)

        def on_event(frame: dict) -> None:
            message = frame.get("message")
            progress = message.get("progressGenerate", {}) if isinstance(message, dict) else {}
            show(frame.get("type", ""), progress)

        def on_poll(task: dict) -> None:
            show(task["status"], task.get("progress") if isinstance(task.get("progress"), dict) else {})

        try:
            for frame in client.events(tasktoken):
                on_event(frame)
        except Exception:  # no WebSocket: poll Task/Detail
            return client.wait(taskid, on_update=on_poll, poll=0.3)
        task = client.detail(taskid)
        on_poll(task)
        return task


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
               base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """The project's tasks, newest first."""
    from rich.table import Table

    tasks = _client_call(base_url, api_key, api_secret, lambda c: c.tasks(limit=limit, status=status))
    table = Table("id", "tool", "status", "pexit", "created", "outputs")
    for t in tasks:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(t["createtime"])))
        table.add_row(t["id"], f"{t['modelslugowner']}/{t['modelslugproject']}", t["status"], t["pexit"], created,
                      str(len(t["outputs"])))
    console.print(table)


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
    """Submit a Run; with --wait show progress and download the outputs."""
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
    if task["pexit"] != "0":
        console.print(f"[red]{task['status']} pexit {task['pexit']}: {task['debugerror']}")
        raise typer.Exit(1)
    for path in client.download(task, out / answer["taskid"]):
        console.print(str(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEMO_REQUEST = {  # the seed's curl body for wiro/text-to-image-sd-lora, quirks included
    "selectedModel": "", "selectedModelPrivate": "", "selectedLoraModel": [], "selectedLoraModelPrivateUrl": "",
    "prompt": "summer landscape, red color, Bokeh, the waterfall, fog over the lake, insanely detailed and "
              "intricate, hypermaximalist, elegant, ornate, hyper realistic, super detailed.",
    "negativePrompt": "", "samples": 4, "steps": 30, "scale": "7.5", "seed": "123456", "clipSkip": 4,
    "width": 512, "height": 512, "scheduler": "EulerDiscreteScheduler",
    "callbackUrl": "You can provide a callback URL; Wiro will send a POST request to it when the task is completed.",
}


@app.command()
def demo(data_dir: Path = typer.Option(Path(".easel-demo"), help="Data directory for the demo server.")):
    """Start a server on the embedded default (SQLite, local worker, tiny models), send the seed's
    request for wiro/text-to-image-sd-lora exactly as its curl example does, and print the PNG paths."""
    import httpx

    from easel.client import Client
    from easel.signing import signature

    port = _free_port()
    log = open(data_dir.parent / f"{data_dir.name}-server.log", "w") if data_dir.parent.exists() else subprocess.DEVNULL
    console.print(f"starting easel serve on 127.0.0.1:{port} (data dir {data_dir}, tiny models)")
    proc = subprocess.Popen([sys.executable, "-m", "easel", "serve", "--port", str(port), "--data-dir", str(data_dir),
                             "--model-source", "tiny"], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    console.print("[red]the server exited; see the log")
                    raise typer.Exit(1)
            time.sleep(0.2)
        out = subprocess.run([sys.executable, "-m", "easel", "projects", "create", "demo", "--data-dir", str(data_dir),
                              "--json"], capture_output=True, text=True, check=True)
        project = json.loads(out.stdout)
        nonce = str(int(time.time()))
        headers = {"Content-Type": "multipart/form-data", "x-api-key": project["apikey"], "x-nonce": nonce,
                   "x-signature": signature(project["apikey"], project["apisecret"], nonce)}
        t0 = time.time()
        answer = httpx.post(f"{base}/v1/Run/wiro/text-to-image-sd-lora", headers=headers,
                            content=json.dumps(DEMO_REQUEST)).json()
        console.print(answer)
        client = Client(f"{base}/v1", project["apikey"], project["apisecret"])
        task = _follow(client, answer["taskid"], answer["socketaccesstoken"])
        if task["pexit"] != "0":
            console.print(f"[red]task failed: {task['debugerror']}")
            raise typer.Exit(1)
        console.print(f"done in {time.time() - t0:.1f} s (tiny random model: the images are noise)")
        for path in client.download(task, data_dir / "outputs" / answer["taskid"]):
            print(path.resolve())
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
