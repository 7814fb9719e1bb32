"""``easel demo``: a server on the embedded default, and every tool's example request sent to it.

The tools and their requests come from the catalog (:attr:`easel.catalog.ToolSpec.example`): each
implemented tool with an ``example`` in its catalog file runs, a plug-in tool's included, and
the input files an example names are uploaded first, from the tool's package.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer

from easel.cli.common import console, follow_task

DEMO_READY_SECONDS = 900.0  # a loaded machine may take minutes to import torch
DEMO_STOP_SECONDS = 30.0  # an idle server stops in about 1 s; then SIGKILL, with a line saying so


def demo_tools() -> dict:
    """Tool name → :class:`easel.catalog.ToolSpec` of every implemented tool whose catalog file has
    an example request, in catalog order."""
    from easel.catalog import load_tools

    return {name: spec for name, spec in load_tools().items() if spec.module and spec.example is not None}


def demo(data_dir: Path = typer.Option(Path(".easel-demo"), help="Data directory for the demo server."),
         tool: list[str] = typer.Option([], "--tool", help="Only these tools (default: every implemented seed).")):
    """Start a server on the embedded default (SQLite, local worker, tiny models), send every
    implemented seed's example request exactly as its curl example does (uploading the input images
    it names first with POST /v1/File/Upload), and print the PNG paths per tool."""
    import httpx

    from easel.client import Client
    from easel.signing import signature
    from easel.supervise import stop_process

    examples = demo_tools()
    chosen = [t for t in examples if not tool or t in tool]
    unknown = [t for t in tool if t not in examples]
    if unknown:
        raise typer.BadParameter(f"no demo request for {', '.join(unknown)}; among: {', '.join(examples)}",
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
        _wait_ready(base, proc, log_path)
        out = subprocess.run([sys.executable, "-m", "easel", "projects", "create", "demo", "--data-dir", str(data_dir),
                              "--json"], capture_output=True, text=True, check=True)
        project = json.loads(out.stdout)
        client = Client(f"{base}/v1", project["apikey"], project["apisecret"])
        files: dict[str, Path] = {}
        for name in chosen:
            for file_name, path in examples[name].example.files.items():
                files.setdefault(file_name, path)
        for file_name in sorted(files):
            item = client.upload(file_name, files[file_name].read_bytes())
            print(f"uploaded {file_name} with File/Upload: {item['url']}", flush=True)  # whole URL: no wrapping
        for name in chosen:
            print(f"{name}: the seed's request", flush=True)
            nonce = str(int(time.time() * 1000))
            headers = {"Content-Type": "multipart/form-data", "x-api-key": project["apikey"], "x-nonce": nonce,
                       "x-signature": signature(project["apikey"], project["apisecret"], nonce)}
            t0 = time.time()
            body = json.dumps(dict(examples[name].example.request))
            answer = httpx.post(f"{base}/v1/Run/{name}", headers=headers, content=body).json()
            print(json.dumps(answer), flush=True)
            if not answer.get("result"):
                raise typer.Exit(1)
            task = follow_task(client, answer["taskid"], answer["socketaccesstoken"])
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


def _wait_ready(base: str, proc: subprocess.Popen, log_path: Path) -> None:
    """Wait for the server's /readyz (its worker has imported torch: a task sent earlier would only
    wait); exit code 1 when the server exits or is not ready within ``DEMO_READY_SECONDS``."""
    import httpx

    t0, said = time.monotonic(), False
    while True:
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
