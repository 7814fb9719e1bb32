"""``easel run OWNER/SLUG -p name=value ...``: submit a Run (to Easel or to Wiro itself) and, with
``--wait``, follow it and download its outputs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from easel.cli.common import console, follow_task


def run(
    tool: str = typer.Argument(..., help="OWNER/SLUG of a registered tool (as Tool/List and the playground name it)"),
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
    values, files = parse_params(param)
    try:
        answer = client.run(tool, values, files or None)
    except ApiError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1)
    console.print(f"taskid {answer['taskid']}  socketaccesstoken {answer['socketaccesstoken']}")
    if not wait:
        return
    task = follow_task(client, answer["taskid"], answer["socketaccesstoken"])
    if task.get("pexit") != "0" or task["status"] != "task_postprocess_end":
        console.print(f"[red]{task['status']} pexit {task.get('pexit')}: {task.get('debugerror', '')}")
        raise typer.Exit(1)
    for path in client.download(task, out / answer["taskid"]):
        console.print(str(path))


def parse_params(params: list[str]) -> tuple[dict[str, str], dict[str, Path]]:
    """``-p`` values as ``(fields, files)``: ``name=value`` a text field, ``name=@path`` a file to
    upload with the Run.

    Raises:
        typer.BadParameter: an item without ``=`` (exit code 2, naming ``-p``).
    """
    values: dict[str, str] = {}
    files: dict[str, Path] = {}
    for item in params:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r} is not name=value", param_hint="-p")
        name, value = item.split("=", 1)
        if value.startswith("@"):
            files[name] = Path(value[1:])
        else:
            values[name] = value
    return values, files
