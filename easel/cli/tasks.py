"""``easel tasks list | detail | cancel | kill | delete``: the project's tasks through the API
(EASEL_BASE_URL / EASEL_API_KEY / EASEL_API_SECRET), as any Wiro client sees them."""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

import typer

from easel.cli.common import console
from easel.cli.output import print_rows

app = typer.Typer(help="List and manage your tasks (uses EASEL_BASE_URL / EASEL_API_KEY / EASEL_API_SECRET).")
_BASE = typer.Option("http://127.0.0.1:8000/v1", envvar="EASEL_BASE_URL")
_KEY = typer.Option(..., envvar="EASEL_API_KEY")
_SECRET = typer.Option(None, envvar="EASEL_API_SECRET")


def _client_call(base_url: str, api_key: str, api_secret: Optional[str], fn: Callable):
    """``fn(client)``; an API error is printed and ends the command with exit code 1."""
    from easel.client import ApiError, Client

    try:
        return fn(Client(base_url, api_key, api_secret))
    except ApiError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1)


@app.command("list")
def list_(limit: int = typer.Option(20), status: str = typer.Option("", help="Only this status."),
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


@app.command("detail")
def detail(taskid: str, base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """Print a task's Task/Detail object as JSON."""
    console.print_json(json.dumps(_client_call(base_url, api_key, api_secret, lambda c: c.detail(taskid))))


@app.command("cancel")
def cancel(taskid: str, base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """Cancel a queued task."""
    task = _client_call(base_url, api_key, api_secret, lambda c: c.cancel(taskid))
    console.print(f"{taskid}: {task['status']}")


@app.command("kill")
def kill(taskid: str, base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """Kill a running task (it stops within one denoising step)."""
    task = _client_call(base_url, api_key, api_secret, lambda c: c.kill(taskid))
    console.print(f"{taskid}: {task['status']}")


@app.command("delete")
def delete(taskid: str, base_url: str = _BASE, api_key: str = _KEY, api_secret: Optional[str] = _SECRET):
    """Delete a finished task's input and output files (Task/InputOutputDelete; the record stays)."""
    _client_call(base_url, api_key, api_secret, lambda c: c.delete(taskid))
    console.print(f"{taskid}: inputs and outputs deleted")
